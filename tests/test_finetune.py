"""ullme finetune: recipe validation, every strategy end to end on a tiny model, resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import REPO, RESOURCES, run_cli

from ullme_cli.errors import UllmeError
from ullme_cli.recipes import load_recipe

TRAIN = RESOURCES / "trecqa-train" / "train.jsonl"


def write_recipe(tmp_path, model_name, name="r.yaml", **sections):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_name), "max_length": 64},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(TRAIN), "negatives_per_query": 2},
        "loss": {"strategy": "grl"},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "learning_rate": 1e-3},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"stepz": 3}}, "unknown key 'train.stepz'"),
        ({"train": {"steps": "many"}}, "'train.steps': expected int"),
        ({"train": {"steps": 0}}, "'train.steps' must be at least 1"),
        ({"loss": {"strategy": "magic"}}, "'loss.strategy' must be one of"),
        ({"loss": {"weights": {"contrastive": 1, "telepathy": 2}}}, "'loss.weights.telepathy' is not a loss component"),
        ({"loss": {"kl_direction": "sideways"}}, "'loss.kl_direction'"),
        ({"model": {"pooling": "max"}}, "'model.pooling' must be one of"),
        ({"lora": {"enabled": False}, "loss": {"strategy": "dpo"}}, "'loss.reference_free' must be true for DPO without LoRA"),
        ({"train": {"warmup_steps": 10}}, "'train.warmup_steps' must be between 0 and train.steps (3)"),
        ({"train": {"grad_cache_chunk": 2}, "loss": {"strategy": "simcse"}}, "'train.grad_cache_chunk' GradCache covers"),
        ({"train": {"mixed_precision": "fp8"}}, "'train.mixed_precision' must be no, bf16 or fp16"),
        ({"eval": {"every": -1}}, "'eval.every' must be 0"),
        ({"eval": {"task": "x"}}, "unknown key 'eval.task'"),
    ],
)
def test_bad_recipes_name_the_key_and_the_file(tmp_path, change, message):
    path = write_recipe(tmp_path, "m", **change)
    with pytest.raises(UllmeError) as error:
        load_recipe(str(path))
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UllmeError, match="bad.yaml:.*not valid YAML"):
        load_recipe(str(bad))
    result = run_cli("finetune", tmp_path / "none.yaml")
    assert result.returncode == 2 and b"none.yaml: file not found" in result.stderr


def test_set_overrides_and_print_recipe(tmp_path):
    path = write_recipe(tmp_path, "m")
    result = run_cli("finetune", path, "--set", "train.steps=7", "--set", "loss.tau_kl=0.2", "--print-recipe")
    assert result.returncode == 0, result.stderr.decode()
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["steps"] == 7 and printed["loss"]["tau_kl"] == 0.2
    bad = run_cli("finetune", path, "--set", "train.steps=-1", "--print-recipe")
    assert bad.returncode == 2 and b"'train.steps' must be at least 1" in bad.stderr


SHIPPED_RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "study").glob("*.yaml"))


def test_every_shipped_recipe_is_valid():
    for path in SHIPPED_RECIPES:
        recipe = load_recipe(str(path))
        assert os.path.exists(recipe.data.train), path


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_two_steps(tiny_llama, tmp_path, path):
    """Each shipped recipe as it stands (data, loss, LoRA, GradCache, precision), on the tiny model for 2 steps."""
    out = tmp_path / "run"
    overrides = ["--set", f"model.name={tiny_llama}", "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", f"output_dir={out}"]
    result = run_cli("finetune", path, *overrides, "-q")
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "model" / "ullme.json").exists()


@pytest.mark.parametrize("strategy", ["contrastive", "simcse", "mntp", "sft", "dpo", "grl"])
def test_each_strategy_trains_and_the_result_encodes(tiny_llama, tmp_path, strategy):
    path = write_recipe(tmp_path, tiny_llama, loss={"strategy": strategy})
    result = run_cli("finetune", path, "-q")
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    encoded = run_cli("encode", "-", "-o", tmp_path / "e.npy", "--model", tmp_path / "run" / "model", "-q", input=b"a question ?\n")
    assert encoded.returncode == 0, encoded.stderr.decode()


def test_grad_cache_training_runs_end_to_end(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, train={"grad_cache_chunk": 2})
    result = run_cli("finetune", path, "-q")
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


def test_grl_metrics_show_all_three_components_moving(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, train={"steps": 6})
    assert run_cli("finetune", path, "-q").returncode == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for component in ("contrastive", "dpo", "kl"):
        values = [r[component] for r in rows]
        assert max(values) - min(values) > 1e-4, (component, values)


def test_mix_of_components_by_weight(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, loss={"strategy": "contrastive", "weights": {"contrastive": 1.0, "sft": 0.3}})
    assert run_cli("finetune", path, "-q").returncode == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(row["contrastive"] + 0.3 * row["sft"], rel=1e-5)


def test_existing_run_needs_resume(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama)
    assert run_cli("finetune", path, "-q").returncode == 0
    again = run_cli("finetune", path, "-q")
    assert again.returncode == 2 and b"pass --resume" in again.stderr


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_llama, tmp_path):
    steps = 70
    killed = write_recipe(tmp_path, tiny_llama, "killed.yaml", train={"steps": steps, "checkpoint_every": 10, "learning_rate": 1e-4})
    args = [sys.executable, "-m", "ullme_cli", "finetune", str(killed), "-q"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-0000030")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_cli("finetune", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"resuming from" in resumed.stderr and b"lr_scheduler.step()" not in resumed.stderr  # no spurious warning
    fresh_dir = tmp_path / "fresh"
    fresh = write_recipe(fresh_dir.parent, tiny_llama, "fresh.yaml", output_dir=str(fresh_dir), train={"steps": steps, "checkpoint_every": 10, "learning_rate": 1e-4})
    assert run_cli("finetune", fresh, "-q").returncode == 0
    a = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (fresh_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-5)


def test_resume_refuses_checkpoints_trained_from_other_data_or_settings(tiny_llama, tmp_path):
    """A resume checks by content what the checkpoint was trained from: the same path with other rows in it,
    or another learning rate, is refused with the difference named; the same inputs resume."""
    data = tmp_path / "train.jsonl"
    data.write_text(TRAIN.read_text())
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": str(data)}, train={"steps": 4, "checkpoint_every": 2})
    first = run_cli("finetune", recipe, "-q")
    assert first.returncode == 0, first.stderr.decode()
    (tmp_path / "run" / "model").rename(tmp_path / "finished")  # as if killed after the step-4 checkpoint
    rows = TRAIN.read_text().splitlines()
    data.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # same rows, other order: other batches
    other_data = run_cli("finetune", recipe, "--resume")
    assert other_data.returncode == 2 and b"trained from other inputs than this run (data differ)" in other_data.stderr
    data.write_text(TRAIN.read_text())
    other_lr = write_recipe(tmp_path, tiny_llama, "lr.yaml", data={"train": str(data)}, train={"steps": 4, "checkpoint_every": 2, "learning_rate": 5e-4})
    refused = run_cli("finetune", other_lr, "--resume")
    assert refused.returncode == 2 and b"(train.learning_rate differ)" in refused.stderr, refused.stderr.decode()
    same = run_cli("finetune", recipe, "--resume")
    assert same.returncode == 0 and b"resuming from" in same.stderr, same.stderr.decode()


def test_resume_of_a_finished_run_checks_its_inputs_and_writes_nothing(tiny_llama, tmp_path):
    """`--resume` on a finished run is a no-op when its last checkpoint was trained from the same inputs, is
    refused when they differ (same path, other rows), and never replaces a finished model it cannot check."""
    from ullme_cli.fingerprints import folder_fingerprint

    data = tmp_path / "train.jsonl"
    data.write_text(TRAIN.read_text())
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": str(data)}, train={"steps": 2, "checkpoint_every": 2})
    assert run_cli("finetune", recipe, "-q").returncode == 0
    model = tmp_path / "run" / "model"
    before = folder_fingerprint(str(model)), model.stat().st_mtime_ns
    same = run_cli("finetune", recipe, "--resume")
    assert same.returncode == 0 and b"nothing to do" in same.stderr, same.stderr.decode()
    assert (folder_fingerprint(str(model)), model.stat().st_mtime_ns) == before
    rows = TRAIN.read_text().splitlines()
    data.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")
    other = run_cli("finetune", recipe, "--resume")
    assert other.returncode == 2 and b"(data differ)" in other.stderr, other.stderr.decode()
    data.write_text(TRAIN.read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    unchecked = run_cli("finetune", recipe, "--resume")
    assert unchecked.returncode == 2 and b"no checkpoint that says what it was trained from" in unchecked.stderr
    assert folder_fingerprint(str(model)) == before[0]


def test_packed_training_follows_the_padded_run(tiny_llama, tmp_path):
    """`train.packing: true` (padding-free batches) trains the same run: the same losses step by step, to
    float32 noise, and a resume may switch it (it does not change what a step computes)."""
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        recipe = write_recipe(tmp_path, tiny_llama, f"p{packing}.yaml", output_dir=str(out), model={"name": str(tiny_llama), "max_length": 64, "dtype": "float32"},
                              lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, train={"steps": 4, "packing": packing})  # fmt: skip
        result = run_cli("finetune", recipe, "-q")
        assert result.returncode == 0, result.stderr.decode()
        runs[packing] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for padded, packed in zip(runs[False], runs[True]):
        for key in ("loss", "contrastive", "dpo", "kl"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), (key, padded, packed)
    assert "packing" in __import__("ullme_cli.training.trainer", fromlist=["x"]).RESUME_FREE_SETTINGS


def write_beir(folder, passages: dict[str, str], queries: dict[str, str], qrels: dict[str, str]):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in passages.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels.items()))


def test_evaluation_every_n_steps_is_logged_and_leaves_training_unchanged(tiny_llama, tmp_path):
    from conftest import demo_texts

    texts = demo_texts(30)
    eval_dir = tmp_path / "evalset"
    write_beir(eval_dir, {f"d{i}": t for i, t in enumerate(texts)}, {f"q{i}": texts[i][:40] for i in range(5)}, {f"q{i}": f"d{i}" for i in range(5)})
    sts = tmp_path / "dev.sts.tsv"
    sts.write_text("".join(f"{i % 6}\t{texts[i][:50]}\t{texts[i + 1][:50]}\n" for i in range(12)))
    eval_section = {"task_dir": str(eval_dir), "sts": str(sts), "every": 2}
    with_eval = write_recipe(tmp_path, tiny_llama, "a.yaml", output_dir=str(tmp_path / "a"), train={"steps": 4}, eval=eval_section)
    plain = write_recipe(tmp_path, tiny_llama, "b.yaml", output_dir=str(tmp_path / "b"), train={"steps": 4})
    for path in (with_eval, plain):
        result = run_cli("finetune", path, "-q")
        assert result.returncode == 0, result.stderr.decode()
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in a if "eval_ndcg_at_10" in r]
    assert evaluated == [2, 4]
    assert all(0.0 <= r["eval_ndcg_at_10"] <= 1.0 and 0.0 <= r["eval_recall_at_10"] <= 1.0 for r in a if "eval_ndcg_at_10" in r)
    assert [r["step"] for r in a if -1.0 <= r.get("eval_sts_spearman", 2.0) <= 1.0] == [2, 4]  # the STS dev signal too
    assert list((tmp_path / "a" / "eval").rglob("evalset.json"))  # mteb's own result files, per step
    # Evaluating in between changes nothing about the training itself.
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-6)


@pytest.mark.parametrize("key", ["task_dir", "sts"])
def test_a_missing_eval_set_fails_before_training(tiny_llama, tmp_path, key):
    path = write_recipe(tmp_path, tiny_llama, eval={key: str(tmp_path / "nowhere")})
    result = run_cli("finetune", path, "-q")
    assert result.returncode == 2 and b"nowhere" in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_autocast_trains(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, train={"mixed_precision": "bf16", "steps": 4})
    result = run_cli("finetune", path, "-q")
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["mixed_precision"] == "bf16"


def test_each_step_draws_a_positive_and_negatives_from_the_whole_lists():
    import torch

    from ullme_cli.data import TrainingExample
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    example = TrainingExample(query="q", positives=["p0", "p1", "p2"], negatives=["n0", "n1", "n2", "n3"])
    step = StepLoss(None, LossSection(), negatives_per_query=2)
    draws = [step.candidates([example], torch.Generator().manual_seed(0)) for _ in range(2)]
    assert draws[0] == draws[1]  # same generator state, same draw: resume stays exact
    generator = torch.Generator().manual_seed(1)
    seen_positives, seen_negatives = set(), set()
    for _ in range(60):
        (positive,), (negatives,) = step.candidates([example], generator)
        assert len(set(negatives)) == 2 and positive not in negatives
        seen_positives.add(positive)
        seen_negatives.update(negatives)
    assert seen_positives == {"p0", "p1", "p2"} and seen_negatives == {"n0", "n1", "n2", "n3"}
