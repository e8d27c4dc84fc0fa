"""Outputs you can trust: each test here shows a case where an earlier ullme gave output that looked right
and was wrong (mixed weights, mixed jobs, stale caches), and that it now gives the right output or refuses."""

import json
from ullme_cli.models.loading import adapter_files
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import DEMO_CORPUS, RESOURCES, demo_texts, run_cli, write_corpus
from safetensors.torch import load_file, save_file

from ullme_cli.artifacts import load_embeddings
from ullme_cli.fingerprints import folder_fingerprint


def start_encode(corpus, out, model, *extra):
    args = [sys.executable, "-m", "ullme_cli", "encode", str(corpus), "-o", str(out), "--model", str(model), "-q", "--token-budget", "256", *extra]
    # A test runner started in the background may ignore SIGINT, and children inherit that: give it back.
    restore_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(args, stderr=subprocess.PIPE, preexec_fn=restore_ctrl_c), args


def wait_for_chunks(process, partial, count, timeout=300):
    deadline = time.time() + timeout
    while len(list(partial.glob("chunk-*.npy"))) < count and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the encode finished before it could be interrupted; make the corpus larger"


def other_weights(model, seed: int = 1):
    """Replace the model's weights in place with another random model's of the same shapes (same file size)."""
    other = load_file(model / "model.safetensors")
    generator = np.random.default_rng(seed)
    import torch

    save_file({k: v + torch.from_numpy(generator.normal(0, 0.05, v.shape).astype(np.float32)) for k, v in other.items()},
              model / "model.safetensors", metadata={"format": "pt"})  # fmt: skip


def test_ctrl_c_keeps_chunks_and_a_resume_after_new_weights_starts_over(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    corpus = write_corpus(tmp_path / "big.jsonl", demo_texts() * 6)
    process, args = start_encode(corpus, tmp_path / "e.npy", model)
    wait_for_chunks(process, tmp_path / "e.npy.partial", 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.decode().strip().splitlines() == ["ullme: interrupted; run the same command again to resume"]
    assert list((tmp_path / "e.npy.partial").glob("chunk-*.npy")) and not (tmp_path / "e.npy").exists()

    other_weights(model)  # the same path, the same size, other weights: an earlier ullme resumed and mixed them
    resumed = run_cli(*args[3:])
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"left by a job with other inputs" in resumed.stderr and b"resuming" not in resumed.stderr
    fresh = run_cli("encode", corpus, "-o", tmp_path / "fresh.npy", "--model", model, "-q", "--token-budget", "256")
    assert fresh.returncode == 0
    a, _, meta = load_embeddings(str(tmp_path / "e.npy"))
    b, _, _ = load_embeddings(str(tmp_path / "fresh.npy"))
    np.testing.assert_array_equal(a, b)
    assert meta["fingerprint"] == folder_fingerprint(model)


def test_a_second_writer_of_the_same_output_fails_at_once(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "big.jsonl", demo_texts() * 24)
    assert run_cli("--version").returncode == 0  # a cold test process would spend seconds importing, while the first writer finishes
    process, _ = start_encode(corpus, tmp_path / "e.npy", tiny_llama)
    try:
        wait_for_chunks(process, tmp_path / "e.npy.partial", 1)
        second = run_cli("encode", corpus, "-o", tmp_path / "e.npy", "--model", tiny_llama, "-q", "--pooling", "cls")
        assert second.returncode == 2
        assert b"another ullme process is writing this output" in second.stderr
    finally:
        process.kill()
        process.wait()
    assert not (tmp_path / "e.npy").exists()


def test_same_size_replacement_changes_the_model_fingerprint(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = folder_fingerprint(folder)
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=times)  # even with the old modification time put back
    assert folder_fingerprint(folder) != first
    (folder / "README.md").write_text("a model card changes no vector")
    assert folder_fingerprint(folder) == folder_fingerprint(folder)
    with pytest.raises(FileNotFoundError):  # a missing folder is not an empty one
        folder_fingerprint(folder.parent / "no-such-model")


def test_search_refuses_a_model_changed_since_indexing_and_works_from_another_folder(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    work = tmp_path / "work"
    work.mkdir()
    # A relative model path: the manifest must record it absolutely, for searches run from elsewhere.
    assert run_cli("encode", DEMO_CORPUS, "-o", "e.npy", "--model", "../model", "-q", cwd=work).returncode == 0
    assert run_cli("index", "e.npy", "-o", "idx", cwd=work).returncode == 0
    manifest = json.loads((work / "idx" / "manifest.json").read_text())
    assert manifest["model"] == str(model)
    queries = RESOURCES / "demo" / "queries.jsonl"
    elsewhere = run_cli("search", work / "idx", queries, "-k", "3", "-q", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr.decode()
    other_weights(model)
    changed = run_cli("search", work / "idx", queries, "-q")
    assert changed.returncode == 2 and b"the model files differ" in changed.stderr


def test_search_refuses_passage_vectors_or_another_instruction_as_queries(tiny_llama, tmp_path):
    args = ["--model", tiny_llama, "-q", "--query-instruction", "Find the answer"]
    assert run_cli("encode", DEMO_CORPUS, "-o", tmp_path / "p.npy", *args).returncode == 0
    assert run_cli("index", tmp_path / "p.npy", "-o", tmp_path / "idx").returncode == 0
    queries = RESOURCES / "demo" / "queries.jsonl"
    as_passages = run_cli("search", tmp_path / "idx", "--embeddings", tmp_path / "p.npy")
    assert as_passages.returncode == 2 and b"'kind' is 'passage' here but 'query' there" in as_passages.stderr
    assert run_cli("encode", queries, "-o", tmp_path / "q.npy", *args, "--kind", "query", "--instruction", "Something else").returncode == 0
    other = run_cli("search", tmp_path / "idx", "--embeddings", tmp_path / "q.npy")
    assert other.returncode == 2 and b"'instruction' is" in other.stderr and b"Something else" in other.stderr
    # the same queries are right for a search that names their instruction
    named = run_cli("search", tmp_path / "idx", "--embeddings", tmp_path / "q.npy", "--instruction", "Something else")
    assert named.returncode == 0, named.stderr.decode()
    assert run_cli("encode", queries, "-o", tmp_path / "q2.npy", *args, "--kind", "query").returncode == 0
    right = run_cli("search", tmp_path / "idx", "--embeddings", tmp_path / "q2.npy")
    assert right.returncode == 0 and b"warning" not in right.stderr


def test_mine_encodes_again_when_the_corpus_texts_change_under_the_same_ids(tiny_llama, tmp_path):
    texts = demo_texts(60)
    corpus = write_corpus(tmp_path / "corpus.jsonl", texts, "p")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": texts[i], "positive": texts[i + 1]}) + "\n" for i in range(0, 20, 2)))
    args = ["mine", train, "--corpus", corpus, "-o", tmp_path / "mined.jsonl", "--model", tiny_llama, "--negatives", "3", "-q", "--overwrite"]
    assert run_cli(*args).returncode == 0
    write_corpus(corpus, [t.upper() + " !" for t in texts], "p")
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr.decode()
    assert b"reusing corpus embeddings" not in again.stderr and b"stale" in again.stderr
    negatives = {n for row in map(json.loads, (tmp_path / "mined.jsonl").read_text().splitlines()) for n in row["negative"]}
    assert negatives and all(n.endswith(" !") for n in negatives)  # drawn from the edited texts


def beir(folder, qrels):
    texts = demo_texts(30)
    (folder / "qrels").mkdir(parents=True)
    write_corpus(folder / "corpus.jsonl", texts)
    write_corpus(folder / "queries.jsonl", texts[:5], "q")
    (folder / "qrels" / "test.tsv").write_text("".join(f"q{q}\td{d}\t1\n" for q, d in qrels))


def test_evaluate_cache_is_keyed_by_task_content_and_model_weights(tiny_llama, tmp_path):
    beir(tmp_path / "a" / "t1", [(q, q) for q in range(5)])  # each query's own text: easy
    beir(tmp_path / "b" / "t1", [(q, 29 - q) for q in range(5)])  # other qrels, same folder name
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    from ullme_cli.evaluation.runner import evaluate as run_evaluate  # in process: mteb loads once

    def evaluate(task) -> float:
        return run_evaluate(str(model), [], [str(task)], [], str(tmp_path / "res"), show_progress=False)[0].scores["ndcg_at_10"]

    a, b = evaluate(tmp_path / "a" / "t1"), evaluate(tmp_path / "b" / "t1")
    assert a != b
    assert evaluate(tmp_path / "a" / "t1") == a  # the same content and weights: reused
    other_weights(model)
    assert evaluate(tmp_path / "a" / "t1") != a  # new weights at the same path: evaluated again


def test_evaluate_scores_judged_queries_of_a_run_and_says_how_many_were_skipped(tmp_path):
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 2.0 x\nq1 Q0 d2 2 1.0 x\nq2 Q0 d1 1 2.0 x\n")
    (tmp_path / "qrels.tsv").write_text("q1\td1\t1\n")
    result = run_cli("evaluate", "--run", tmp_path / "run.trec", "--qrels", tmp_path / "qrels.tsv")
    assert result.returncode == 0, result.stderr.decode()
    assert b"1 of 2 queries have no judgements" in result.stderr
    assert json.loads(result.stdout)["scores"]["ndcg_at_10"] == 1.0


def test_index_overwrite_replaces_only_an_index_folder_and_folders_follow_the_umask(tiny_llama, tmp_path):
    assert run_cli("encode", DEMO_CORPUS, "-o", tmp_path / "e.npy", "--model", tiny_llama, "-q").returncode == 0
    assert run_cli("index", tmp_path / "e.npy", "-o", tmp_path / "idx").returncode == 0
    assert stat.S_IMODE((tmp_path / "idx").stat().st_mode) == 0o777 & ~current_umask()
    again = run_cli("index", tmp_path / "e.npy", "-o", tmp_path / "idx", "--overwrite", "--factory", "HNSW16")
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["factory"] == "HNSW16"


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_resume_falls_back_past_a_broken_checkpoint_and_tolerates_a_torn_metrics_line(tiny_llama, tmp_path):
    recipe = {
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "data": {"train": str(RESOURCES / "trecqa-train" / "train.jsonl")},
        "train": {"steps": 4, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 1, "keep_checkpoints": 3},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("finetune", tmp_path / "r.yaml", "-q").returncode == 0
    run = tmp_path / "run"
    finished = load_file(adapter_files(run / "model") / "adapter_model.safetensors")
    state = run / "checkpoints" / "step-0000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # a torn write
    (run / "checkpoints" / ".step-0000005.staging-x1").mkdir()  # what a kill mid-checkpoint leaves
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # a torn last line
    resumed = run_cli("finetune", tmp_path / "r.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"skipping a broken checkpoint" in resumed.stderr and b"step-0000003 (step 3)" in resumed.stderr
    assert not list((run / "checkpoints").glob(".*staging*"))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    again = load_file(adapter_files(run / "model") / "adapter_model.safetensors")
    for name, tensor in finished.items():
        np.testing.assert_allclose(again[name].numpy(), tensor.numpy(), atol=1e-6)


def test_fp16_trains_with_a_loss_scaler_whose_state_makes_resume_exact(tiny_llama, tmp_path):
    """fp16 autocast runs on CPU here, so the scaler's logic (skipped overflow steps, the scale in the
    checkpoint) is tested for real; a GPU run is the same code with device 'cuda'."""
    recipe = {
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "data": {"train": str(RESOURCES / "trecqa-train" / "train.jsonl")},
        "loss": {"strategy": "grl"},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 1, "keep_checkpoints": 8,
                  "mixed_precision": "fp16", "grad_cache_chunk": 2, "learning_rate": 1e-2},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("finetune", tmp_path / "r.yaml", "-q").returncode == 0
    run = tmp_path / "run"
    scales = [json.loads((c / "trainer_state.json").read_text())["grad_scaler"]["scale"] for c in sorted((run / "checkpoints").glob("step-*"))]
    assert scales[0] < 65536 and scales[-1] == scales[-2]  # overflowing steps shrank the scale, then steps applied
    finished = load_file(adapter_files(run / "model") / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in finished.items() if "lora_B" in n)  # some steps were taken
    for later in ("step-0000007", "step-0000008"):
        shutil.rmtree(run / "checkpoints" / later)
    shutil.rmtree(run / "model")
    resumed = run_cli("finetune", tmp_path / "r.yaml", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr.decode()
    again = load_file(adapter_files(run / "model") / "adapter_model.safetensors")
    for name, tensor in finished.items():
        np.testing.assert_array_equal(again[name].numpy(), tensor.numpy())
