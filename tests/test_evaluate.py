"""ullme evaluate: metrics reproduced independently, offline errors, cache reuse, instructions, run scoring."""

import json

import numpy as np
import pytest
from conftest import RESOURCES, SHARED_DATA, run_cli

from ullme_cli.data import read_beir_folder
from ullme_cli.errors import UllmeError
from ullme_cli.instructions import instruction_for, load_instruction_table
from ullme_cli.evaluation.runner import evaluate, resolve_tasks
from ullme_cli.model_setup import Runtime

TRECQA = RESOURCES / "trecqa-test"


@pytest.fixture(scope="module")
def trecqa_result(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(str(tiny_llama), [], [str(TRECQA)], [], str(out), runtime=Runtime("float32"), show_progress=False)[0], out


def test_retrieval_metrics_match_pytrec_eval_on_an_independent_run(tiny_llama, trecqa_result):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from ullme_cli.models.embedder import Embedder

    result, _ = trecqa_result
    data = read_beir_folder(str(TRECQA))
    embedder = Embedder.load(str(tiny_llama), dtype="float32")
    instruction = instruction_for(load_instruction_table(), "trecqa-test", "Retrieval")
    q = embedder.encode([x.text for x in data.queries], kind="query", instruction=instruction)
    d = embedder.encode([x.text for x in data.corpus], kind="passage")
    scores = q @ d.T
    run = {
        query.id: {data.corpus[j].id: float(scores[i, j]) for j in np.argsort(-scores[i])[:1000]}
        for i, query in enumerate(data.queries)
    }
    per_query = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    ndcg = np.mean([s["ndcg_cut_10"] for s in per_query.values()])
    recall = np.mean([s["recall_10"] for s in per_query.values()])
    assert result.scores["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-3)
    assert result.scores["recall_at_10"] == pytest.approx(recall, abs=1e-3)


def test_cached_results_are_reused_on_a_rerun(tiny_llama, trecqa_result):
    _, out = trecqa_result
    (path,) = out.glob("results/*/*/trecqa-test.json")
    saved = json.loads(path.read_text())
    saved["scores"]["test"][0]["ndcg_at_10"] = 0.12345  # a value only the cache can hold
    path.write_text(json.dumps(saved))
    again = evaluate(str(tiny_llama), [], [str(TRECQA)], [], str(out), runtime=Runtime("float32"), show_progress=False)[0]
    assert again.scores["ndcg_at_10"] == 0.12345


def test_a_fresh_evaluation_reports_what_a_rerun_will_read(tiny_llama, tmp_path):
    """mteb rounds the scores it saves: the first run reports the saved values too, so a rerun from the cache
    prints the same numbers."""
    first = evaluate(str(tiny_llama), [], [str(TRECQA)], [], str(tmp_path), runtime=Runtime("float32"), show_progress=False)[0]
    (path,) = tmp_path.glob("results/*/*/trecqa-test.json")
    saved = json.loads(path.read_text())["scores"]["test"][0]
    assert {m: first.scores[m] for m in ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_100")} == {m: saved[m] for m in ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_100")}
    again = evaluate(str(tiny_llama), [], [str(TRECQA)], [], str(tmp_path), runtime=Runtime("float32"), show_progress=False)[0]
    assert again.scores == first.scores


def test_another_setup_of_the_same_model_is_evaluated_not_taken_from_the_cache(tiny_llama, trecqa_result):
    from ullme_cli.models.embedder import Embedder

    result, out = trecqa_result
    causal = evaluate(str(tiny_llama), [], [str(TRECQA)], [], str(out), runtime=Runtime("float32"), show_progress=False,
                      pooling="last-token", attention="causal")[0]  # fmt: skip
    assert causal.scores["ndcg_at_10"] != result.scores["ndcg_at_10"]
    assert len(list(out.glob("results/*/*/trecqa-test.json"))) == 2
    data = read_beir_folder(str(TRECQA))
    embedder = Embedder.load(str(tiny_llama), dtype="float32", pooling="last-token", attention="causal")
    instruction = instruction_for(load_instruction_table(), "trecqa-test", "Retrieval")
    q = embedder.encode([x.text for x in data.queries], kind="query", instruction=instruction)
    d = embedder.encode([x.text for x in data.corpus], kind="passage")
    top1 = {query.id: data.corpus[int(np.argmax(q[i] @ d.T))].id for i, query in enumerate(data.queries)}
    hits = np.mean([1.0 if data.qrels[qid].get(doc, 0) > 0 else 0.0 for qid, doc in top1.items()])
    assert causal.scores["precision_at_1"] == pytest.approx(hits, abs=1e-3)


def test_local_sts_gives_spearman_of_cosines(tiny_llama, tmp_path):
    from scipy.stats import spearmanr

    from ullme_cli.evaluation.local_tasks import read_sts_file
    from ullme_cli.models.embedder import Embedder

    sts_file = SHARED_DATA / "sts" / "2013" / "FNWN.test.tsv"
    if not sts_file.exists():
        pytest.skip("../shared/data is not beside this checkout")
    result = evaluate(str(tiny_llama), [], [], [str(sts_file)], str(tmp_path), runtime=Runtime("float32"), show_progress=False)[0]
    assert result.name == "STS-2013-FNWN" and result.main_score == "cosine_spearman"
    gold, first, second = read_sts_file(str(sts_file))
    embedder = Embedder.load(str(tiny_llama), dtype="float32")
    instruction = instruction_for(load_instruction_table(), result.name, "STS")
    a = embedder.encode(first, kind="query", instruction=instruction)
    b = embedder.encode(second, kind="query", instruction=instruction)
    assert result.scores["cosine_spearman"] == pytest.approx(spearmanr((a * b).sum(1), gold).statistic, abs=1e-3)


def test_local_pairs_give_average_precision_of_cosines(tiny_llama, tmp_path):
    """`ullme evaluate --pairs`: MSRP-style labelled pairs scored as mteb's PairClassification (cosine AP)."""
    from sklearn.metrics import average_precision_score

    from ullme_cli.evaluation.local_tasks import read_pair_file
    from ullme_cli.models.embedder import Embedder

    source = SHARED_DATA / "msrp" / "msr-para-test.tsv"
    if not source.exists():
        pytest.skip("../shared/data is not beside this checkout")
    rows = [line.split("\t") for line in source.read_text(encoding="utf-8-sig").splitlines()[1:81]]
    pairs = tmp_path / "msrp.tsv"
    pairs.write_text("".join(f"{r[0]}\t{r[3]}\t{r[4]}\n" for r in rows))
    result = evaluate(str(tiny_llama), [], [], [], str(tmp_path / "res"), runtime=Runtime("float32"), show_progress=False, pair_files=[str(pairs)])[0]
    assert result.name.startswith("Pairs-") and result.name.endswith("-msrp") and result.main_score == "cosine_ap"
    labels, first, second = read_pair_file(str(pairs), "label")
    embedder = Embedder.load(str(tiny_llama), dtype="float32")
    instruction = instruction_for(load_instruction_table(), result.name, "PairClassification")
    a = embedder.encode(first, kind="query", instruction=instruction)
    b = embedder.encode(second, kind="query", instruction=instruction)
    assert result.scores["cosine_ap"] == pytest.approx(average_precision_score(labels, (a * b).sum(1)), abs=1e-3)


def test_study_data_builder_counts_and_keeps_held_out_pairs_out(tmp_path):
    import importlib.util

    if not (SHARED_DATA / "sick").exists():
        pytest.skip("../shared/data is not beside this checkout")
    spec = importlib.util.spec_from_file_location("build_study_data", RESOURCES.parent.parent / "scripts" / "build_study_data.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    counts = builder.build(SHARED_DATA, tmp_path / "study", max_rows_per_task=1300)
    with pytest.raises(UllmeError, match="exists already"):  # an existing output is replaced only on request
        builder.build(SHARED_DATA, tmp_path / "study")
    msrp = counts["train"]["msrp"]
    assert (msrp["rows"], msrp["available"]) == (1300, 4814) and counts["train"]["sick"]["rows"] == counts["train"]["sick"]["available"]
    tmp_path = tmp_path / "study"
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == counts["train_rows"] == sum(t["rows"] for t in counts["train"].values())
    for task, numbers in counts["train"].items():  # the per-task sources of recipes/multitask/mixture.yaml
        assert len((tmp_path / f"train-{task}.jsonl").read_text().splitlines()) == numbers["rows"]
    assert {r["instruction"] for r in rows} == set(builder.INSTRUCTIONS.values())
    assert {(r["instruction"], r["generation_instruction"]) for r in rows} == set(zip(builder.INSTRUCTIONS.values(), builder.GENERATION_INSTRUCTIONS.values()))
    assert counts["sick_test_pairs"] == 4927 and counts["msrp_test_pairs"] == 1725
    trained = {(r["query"], p) for r in rows for p in r["positive"] + r["negative"]}
    for path in ("sick-test.sts.tsv", "msrp-test.pairs.tsv"):
        held_out = {tuple(line.split("\t")[1:3]) for line in (tmp_path / path).read_text().splitlines()}
        assert not held_out & trained and not {(b, a) for a, b in held_out} & trained, path


def test_instruction_lookup_prefers_task_then_type_and_can_be_overridden(tmp_path):
    table = load_instruction_table()
    assert instruction_for(table, "SciFact", "Retrieval").startswith("Given a scientific claim")
    assert instruction_for(table, "MyLocalSet", "Retrieval") == table["types"]["Retrieval"]
    assert instruction_for(table, "Anything", "UnknownType") == ""
    override = tmp_path / "mine.yaml"
    override.write_text("tasks:\n  SciFact: Find evidence\n")
    assert instruction_for(load_instruction_table(str(override)), "SciFact", "Retrieval") == "Find evidence"
    override.write_text("prompts: {}\n")
    with pytest.raises(UllmeError, match="expected mappings 'tasks' and/or 'types'"):
        load_instruction_table(str(override))


def test_unknown_task_name_suggests_close_matches():
    with pytest.raises(UllmeError, match="unknown task or benchmark 'SciFcat'; did you mean 'SciFact'"):
        resolve_tasks(["SciFcat"])
    result = run_cli("evaluate", "--tasks", "NFCorpuss")
    assert result.returncode == 2 and b"did you mean 'NFCorpus'" in result.stderr


def test_offline_hub_task_fails_with_one_line_per_missing_dataset(tmp_path):
    result = run_cli("evaluate", "--tasks", "SciFact,NFCorpus", "--output-dir", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("ullme: error: SciFact: dataset") and "ullme evaluate --prefetch --tasks SciFact" in lines[0]
    assert lines[1].startswith("NFCorpus: dataset") and "Traceback" not in result.stderr.decode()


def test_search_run_is_scored_like_pytrec_eval(tiny_llama, tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    assert run_cli("encode", TRECQA / "corpus.jsonl", "-o", tmp_path / "c.npy", "--model", tiny_llama, "-q").returncode == 0
    assert run_cli("index", tmp_path / "c.npy", "-o", tmp_path / "idx").returncode == 0
    searched = run_cli("search", tmp_path / "idx", TRECQA / "queries.jsonl", "-k", "100", "--format", "trec", "-o", tmp_path / "run.trec", "-q")
    assert searched.returncode == 0, searched.stderr.decode()
    scored = run_cli("evaluate", "--run", tmp_path / "run.trec", "--qrels", TRECQA / "qrels" / "test.tsv")
    assert scored.returncode == 0, scored.stderr.decode()
    ours = json.loads(scored.stdout)["scores"]
    with open(tmp_path / "run.trec") as f:
        run = pytrec_eval.parse_run(f)
    qrels = read_beir_folder(str(TRECQA)).qrels
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert ours["ndcg_at_10"] == pytest.approx(np.mean([s["ndcg_cut_10"] for s in per_query.values()]), abs=1e-4)


def test_mteb_evaluate_on_an_ullme_model_gives_the_ullme_evaluate_score(tiny_llama, trecqa_result, tmp_path):
    """`mteb.evaluate(ullme.load(folder), tasks)`: the Embedder is an mteb encoder as it is, with its own meta."""
    import mteb
    from mteb.models import EncoderProtocol

    import ullme_cli as ullme
    from ullme_cli.evaluation.local_tasks import beir_retrieval_task
    from ullme_cli.models.mteb_face import MtebEncoder

    result, _ = trecqa_result
    embedder = ullme.load(str(tiny_llama), dtype="float32")
    assert isinstance(embedder, EncoderProtocol) and isinstance(MtebEncoder(embedder), EncoderProtocol)
    meta = embedder.mteb_model_meta
    assert (meta.name, meta.embed_dim, meta.max_tokens) == (f"ullme/{tiny_llama.name}", embedder.dim, embedder.setup.max_length)
    assert meta.revision and meta.revision != ullme.load(str(tiny_llama), dtype="float32", pooling="last-token").mteb_model_meta.revision
    results = mteb.evaluate(embedder, [beir_retrieval_task(str(TRECQA))], cache=None, show_progress_bar=False)
    scores = results.task_results[0].scores["test"][0]
    assert scores["ndcg_at_10"] == pytest.approx(result.scores["ndcg_at_10"], abs=1e-6)


def test_the_one_private_mteb_function_still_scores_a_run_as_tested(tmp_path):
    """evaluate --run uses mteb._evaluators.retrieval_metrics (no public equivalent): fail loudly if mteb moves it.

    Hand-computed: q1 finds its relevant d1 at rank 2 of 2, so nDCG@10 = 1/log2(3) and MRR@10 = 1/2."""
    from ullme_cli.evaluation.runner import score_run

    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d2 1 0.9 t\nq1 Q0 d1 2 0.5 t\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    scores = score_run(str(run), str(qrels))
    assert scores["ndcg_at_10"] == pytest.approx(1 / np.log2(3), abs=1e-5)
    assert scores["mrr_at_10"] == pytest.approx(0.5, abs=1e-5)
    assert scores["recall_at_1"] == 0 and scores["recall_at_10"] == 1


def test_the_mteb_model_meta_carries_what_the_leaderboard_reads(tiny_llama, tmp_path):
    """Validated by mteb's own ModelMeta (pydantic), with the size, framework and training-data fields filled."""
    from mteb.models import ModelMeta

    import ullme_cli as ullme

    embedder = ullme.load(str(tiny_llama), dtype="float32")
    meta = ModelMeta.model_validate(embedder.mteb_model_meta.model_dump())
    assert meta.n_parameters == sum(p.numel() for p in embedder.model.parameters())
    assert meta.memory_usage_mb == pytest.approx(meta.n_parameters * 4 / 2**20, abs=0.1)
    assert meta.framework == ["Sentence Transformers", "PyTorch"] and meta.open_weights and meta.use_instructions
    assert meta.similarity_fn_name.value == "cosine" and meta.embed_dim == embedder.dim and meta.max_tokens == embedder.setup.max_length
    assert meta.reference is None and meta.training_datasets is None  # a local, untrained folder: nothing to name
    from ullme_cli.models.mteb_face import model_meta

    embedder.training = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data": {"train": "hf:sentence-transformers/msmarco:train"}}
    meta = model_meta(embedder)
    assert meta.reference == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta.adapted_from == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.training_datasets == {"sentence-transformers/msmarco"}
    embedder.training["data"] = {"train": "qa.jsonl, hf:nli/snli:train", "sources": ["runs/qa.jsonl", "hf:nli/snli:train"]}  # a mixture
    assert model_meta(embedder).training_datasets == {"qa.jsonl", "nli/snli"}
