"""scripts/multitask_study.py end to end on a tiny model: every arm (LLM2Vec's two stages too), the held-out
values per item, the paired bootstrap, the report section beside the first study's, and the resume; and its
per-item values average to what `ullme evaluate` scores for the same model and sets."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, RESOURCES, run_cli

SICK = [("4.8", "A man is playing a guitar .", "A man plays the guitar ."), ("1.2", "A cat sleeps .", "Stocks fell sharply today ."),
        ("2.5", "A woman is cooking .", "A woman is eating ."), ("3.6", "Kids play soccer .", "Children are playing football ."),
        ("1.0", "The sun is hot .", "He bought a new car ."), ("4.1", "A dog runs .", "A dog is running ."),
        ("3.9", "A boy reads a book .", "A child is reading ."), ("0.8", "The lake is calm .", "A man sells fruit ."),
        ("4.5", "Two men are talking .", "Two men are having a talk .")]  # fmt: skip (9 rows: a batch of 8 holds distinct rows)
MSRP = [("1", "He said no .", "He refused ."), ("0", "Prices rose .", "The team won ."), ("1", "It rained .", "There was rain ."),
        ("0", "She left early .", "Birds can fly ."), ("1", "They agreed .", "They reached a deal .")]  # fmt: skip


def study_data(folder):
    folder.mkdir()
    rows = [{"query": q, "positive": [p], "negative": [n], "instruction": "Retrieve a match", "generation_instruction": "Paraphrase: "}
            for (_, q, p), (_, _, n) in zip(SICK, SICK[1:] + SICK[:1])]  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, pairs in (("sick-test.sts.tsv", SICK), ("sick-trial.sts.tsv", SICK), ("msrp-test.pairs.tsv", MSRP)):
        (folder / name).write_text("".join("\t".join(p) + "\n" for p in pairs))
    (folder / "counts.json").write_text(json.dumps({"train": {"sick": {"rows": len(rows), "available": len(rows)}}, "train_rows": len(rows)}))


@pytest.mark.slow
def test_multitask_study_runs_every_arm_reports_intervals_and_resumes(tiny_llama, tmp_path):
    data, shared = tmp_path / "data", tmp_path / "shared"
    study_data(data)
    (shared / "sts" / "2099").mkdir(parents=True)
    (shared / "sts" / "2099" / "tiny.test.tsv").write_text("".join("\t".join(p) + "\n" for p in SICK))
    report = tmp_path / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text("# Results\n\n<!-- section: first-study -->\nThe first study, kept.\n<!-- end of section: first-study -->\n")
    command = [sys.executable, str(REPO / "scripts" / "multitask_study.py"), "--model", str(tiny_llama), "--steps", "3", "--mntp-steps", "1",
               "--seeds", "0", "--dev-every", "2", "--bootstrap", "50", "--no-reference", "--max-pairs", "0", "--data", str(data),
               "--shared", str(shared), "--runs", str(tmp_path / "runs"), "--report", str(report)]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    text = report.read_text()
    assert text.startswith("# Results\n\n<!-- section: first-study -->\nThe first study, kept.\n")  # the first study stays as it was
    for row in ("| base (no fine-tuning) |", "| contrastive |", "| GRL |", "| GRL without DPO |", "| GRL without KL |", "| LLM2Vec (MNTP → contrastive) |",
                "| GRL − contrastive (1 seed) |", "| GRL − LLM2Vec (MNTP → contrastive) (1 seed) |", "**Status:** complete", "**Does GRL help here?**"):  # fmt: skip
        assert row in text, row
    assert first.stderr.count("$ ullme finetune") == 6  # 5 arms and the MNTP stage
    runs = tmp_path / "runs"
    dev = [json.loads(line) for line in (runs / "grl-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dev if "eval_sts_spearman" in r] == [2, 3]  # seed 0 scores the dev set during training
    stage_two = json.loads((runs / "llm2vec-seed0" / "model" / "training.json").read_text())
    assert str(runs / "llm2vec-mntp-seed0" / "model") in stage_two["recipe"]  # LLM2Vec's contrastive stage starts from the merged MNTP model
    # A second run trains and evaluates nothing again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ ullme" not in again.stderr and "evaluating" not in again.stderr
    assert report.read_text() == text
    # --report-only writes the same report from what is there, and leaves out a run whose evaluation is gone.
    (runs / "eval" / "grl-no-kl-seed0.json").unlink()
    partial = subprocess.run(command + ["--report-only"], capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0 and "$ ullme" not in partial.stderr and "evaluating" not in partial.stderr
    assert "partial — missing: GRL without KL seed 0" in report.read_text()

    # The study's per-item values average to `ullme evaluate`'s scores for the same model and sets.
    values = json.loads((runs / "eval" / "contrastive-seed0.json").read_text())["values"]
    out = run_cli("evaluate", "--model", runs / "contrastive-seed0" / "model", "--task-dir", RESOURCES / "trecqa-test", "--sts", data / "sick-test.sts.tsv",
                  "--pairs", data / "msrp-test.pairs.tsv", "--output-dir", tmp_path / "eval", "-q")  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    tasks = json.loads(out.stdout)["tasks"]
    from ullme_cli.evaluation.local_tasks import task_name_for

    sts_name, pairs_name = (task_name_for(str(data / f)) for f in ("sick-test.sts.tsv", "msrp-test.pairs.tsv"))
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score

    gold_sts = [float(p[0]) for p in SICK]
    labels = [int(p[0]) for p in MSRP]
    assert np.mean(values["TREC QA test"][0]) == pytest.approx(tasks["trecqa-test"]["ndcg_at_10"], abs=1e-4)
    assert spearmanr(values["SICK test"][0], gold_sts).statistic == pytest.approx(tasks[f"STS-{sts_name}"]["value"], abs=1e-4)
    assert average_precision_score(labels, values["MSRP test"][0]) == pytest.approx(tasks[f"Pairs-{pairs_name}"]["value"], abs=1e-4)


def test_bootstrap_average_precision_equals_sklearn_on_resamples_with_ties():
    sys.path.insert(0, str(REPO / "scripts"))
    from multitask_study import average_precision_rows
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 40), np.round(rng.normal(size=40), 1)  # rounded: ties across items too
    picks = rng.integers(0, 40, (200, 40))  # resamples repeat items, so tied scores with equal labels
    expected = [average_precision_score(labels[row], scores[row]) if labels[row].any() else 0.0 for row in picks]
    assert np.allclose(average_precision_rows(labels[picks], scores[picks]), expected, atol=1e-12)
