"""Where vectors meet, where data could run code, and what outputs look like to other users (docs/design.md §10).

Each test names the fault it pins: before the one agreement check, the one output guard and the
restricted DCP reader, each of these passed silently.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_CORPUS, demo_texts, run_cli, write_corpus

from ullme_cli.artifacts import load_embeddings
from ullme_cli.errors import UllmeError


# ---------------------------------------------------------------- §3 one agreement check
def test_index_add_refuses_vectors_made_with_another_instruction(tiny_llama, tmp_path):
    """Seen: `index --add` accepted vectors made with another instruction (0.195 apart)."""
    a = write_corpus(tmp_path / "a.jsonl", demo_texts(20), "a")
    b = write_corpus(tmp_path / "b.jsonl", demo_texts(40)[20:], "b")
    assert run_cli("encode", a, "-o", tmp_path / "a.npy", "-m", tiny_llama, "-q").returncode == 0
    assert run_cli("encode", b, "-o", tmp_path / "b.npy", "-m", tiny_llama, "-q", "--instruction", "Represent the passage").returncode == 0
    assert run_cli("index", tmp_path / "a.npy", "-o", tmp_path / "idx").returncode == 0
    added = run_cli("index", tmp_path / "b.npy", "-o", tmp_path / "idx", "--add")
    assert added.returncode == 2 and b"'instruction' is 'Instruct: Represent the passage" in added.stderr, added.stderr
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["count"] == 20


def test_mine_refuses_query_kind_corpus_embeddings(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(30))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"query": t, "positive": demo_texts(30)[i + 1]}) + "\n" for i, t in enumerate(demo_texts(6))))
    assert run_cli("encode", corpus, "-o", tmp_path / "q.npy", "-m", tiny_llama, "-q", "--kind", "query").returncode == 0
    mined = run_cli("mine", tmp_path / "t.jsonl", "--corpus", corpus, "--corpus-embeddings", tmp_path / "q.npy", "-o", tmp_path / "m.jsonl", "-m", tiny_llama, "-q")
    assert mined.returncode == 2 and b"'kind' is 'query' here but 'passage' there" in mined.stderr, mined.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_search_over_two_indexes_of_one_corpus_is_refused_not_doubled(tiny_llama, tmp_path):
    """Seen: a search over two indexes of the same corpus returned every document twice."""
    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(20))
    assert run_cli("encode", corpus, "-o", tmp_path / "c.npy", "-m", tiny_llama, "-q").returncode == 0
    for name in ("i1", "i2"):
        assert run_cli("index", tmp_path / "c.npy", "-o", tmp_path / name).returncode == 0
    twice = run_cli("search", tmp_path / "i1", tmp_path / "i2", DEMO_CORPUS.parent / "queries.jsonl", "-q")
    assert twice.returncode == 2 and b"id 'd0' is in" in twice.stderr and twice.stdout == b""


def test_an_encode_resumed_in_another_dtype_starts_over(tiny_llama, tmp_path, caplog):
    """Seen: an encode killed in bf16 and resumed with --dtype float32 mixed bf16 rows into a float32 file."""
    from ullme_cli.encoding import EncodeOptions, encode_corpus
    from ullme_cli.model_setup import Runtime, resolve_setup
    from ullme_cli.models.embedder import load_embedder

    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts() * 3)
    setup = resolve_setup(str(tiny_llama))
    bf16 = load_embedder(setup, Runtime(dtype="bfloat16", device="cpu"))
    real = bf16.encode_batch

    def killed_after_the_first_chunk(batch):
        if list((tmp_path / "e.npy.partial").glob("chunk-*.npy")):
            raise KeyboardInterrupt
        return real(batch)

    bf16.encode_batch = killed_after_the_first_chunk
    options = EncodeOptions(token_budget=256)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(str(corpus), str(tmp_path / "e.npy"), setup, options=options, show_progress=False, embedder=bf16)
    assert list((tmp_path / "e.npy.partial").glob("chunk-*.npy")), "no chunk was finished before the kill"
    with caplog.at_level(logging.WARNING, logger="ullme_cli"):
        meta = encode_corpus(str(corpus), str(tmp_path / "e.npy"), setup, Runtime(dtype="float32", device="cpu"), options, show_progress=False)
    assert "left by a job with other inputs" in caplog.text
    fresh = encode_corpus(str(corpus), str(tmp_path / "f.npy"), setup, Runtime(dtype="float32", device="cpu"), options, show_progress=False)
    assert meta["compute_dtype"] == fresh["compute_dtype"] == "float32"
    np.testing.assert_array_equal(load_embeddings(str(tmp_path / "e.npy"))[0], load_embeddings(str(tmp_path / "f.npy"))[0])


def test_agreement_names_each_key_and_older_records():
    from ullme_cli.io.agreement import SAME_JOB, SAME_SIDE, SAME_SPACE, require_agreement

    assert set(SAME_SPACE) < set(SAME_SIDE) < set(SAME_JOB)
    assert {"fingerprint", "compute_dtype", "max_length", "pooling", "normalize", "truncate_dim"} <= set(SAME_SPACE)
    record = {k: "x" for k in SAME_JOB}
    for key in SAME_JOB:
        with pytest.raises(UllmeError, match=f"'{key}'|other corpora|model files differ"):
            require_agreement({**record, key: "y"}, record, "a", "b", SAME_JOB)
    with pytest.raises(UllmeError, match="a: records no 'compute_dtype' \\(made by an older ullme\\)"):
        require_agreement({k: v for k, v in record.items() if k != "compute_dtype"}, record, "a", "b", SAME_JOB)


# ---------------------------------------------------------------- §4 no code runs from data
class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(folder: Path, marker: Path) -> Path:
    checkpoint = folder / "checkpoints" / "step-0000001"
    (checkpoint / "dcp").mkdir(parents=True)
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "names": [], "param_groups": []}))
    return checkpoint


def test_crafted_dcp_metadata_runs_no_code(tmp_path):
    """Seen: `finetune --resume` unpickled dcp/.metadata whatever the recipe said; a crafted one ran code."""
    from ullme_cli.training.sharding import read_dcp_metadata
    from ullme_cli.training.trainer import newest_complete_checkpoint

    marker = tmp_path / "ran"
    checkpoint = crafted_checkpoint(tmp_path, marker)
    with pytest.raises(UllmeError, match=r"\.metadata: names (posix|os)\.system, which DCP metadata never holds"):
        read_dcp_metadata(checkpoint / "dcp" / ".metadata")
    with pytest.raises(UllmeError, match="written with train.distributed: fsdp; resume it with the same setting, not ddp"):
        newest_complete_checkpoint(tmp_path, sharded=False)  # a ddp recipe never parses a DCP checkpoint
    assert newest_complete_checkpoint(tmp_path, sharded=True) is None  # under fsdp: refused, reported, skipped
    assert not marker.exists()


def test_real_dcp_metadata_reads_back_through_the_restricted_reader(tmp_path):
    import subprocess
    import sys

    script = f"""
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict
from ullme_cli.training.sharding import read_dcp_metadata, safe_reader
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = torch.nn.Linear(4, 3)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
optimizer.step()
state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
dcp.save(state, checkpoint_id="{tmp_path}/dcp")
ours, theirs = read_dcp_metadata(__import__("pathlib").Path("{tmp_path}/dcp/.metadata")), FileSystemReader("{tmp_path}/dcp").read_metadata()
assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.storage_data == theirs.storage_data
fresh = torch.nn.Linear(4, 3)
loaded = {{"model": fresh.state_dict()}}
dcp.load(loaded, storage_reader=safe_reader(__import__("pathlib").Path("{tmp_path}/dcp")))
assert torch.equal(loaded["model"]["weight"], model.weight.detach())
dist.destroy_process_group()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == b"ok", result.stderr.decode()[-2000:]


# ---------------------------------------------------------------- §5 modes, versions, missing pieces
def test_saved_weights_and_checkpoints_follow_the_umask(tiny_llama, tmp_path):
    """Seen: model.safetensors, adapter_model.safetensors and state.safetensors were 0600."""
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.training.trainer import save_checkpoint

    old = os.umask(0o022)
    try:
        embedder = Embedder.load(str(tiny_llama), dtype="float32", device="cpu").add_lora(r=2, alpha=4)
        embedder.save(tmp_path / "m")
        params = {n: p for n, p in embedder.model.named_parameters() if p.requires_grad}
        import torch

        save_checkpoint(tmp_path / "run", 1, params, torch.optim.AdamW(params.values()), keep=1)
    finally:
        os.umask(old)
    files = [tmp_path / "m" / "model.safetensors", tmp_path / "m" / "adapter" / "adapter_model.safetensors",
             tmp_path / "run" / "checkpoints" / "step-0000001" / "state.safetensors"]  # fmt: skip
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_a_model_folder_records_its_format_and_a_newer_one_is_refused(tiny_llama, tmp_path, caplog):
    from ullme_cli.model_setup import SETUP_FORMAT, resolve_setup
    from ullme_cli.models.embedder import Embedder

    Embedder.load(str(tiny_llama), dtype="float32", device="cpu").save(tmp_path / "m")
    setup_file = tmp_path / "m" / "ullme.json"
    values = json.loads(setup_file.read_text())
    assert values["ullme_format"] == SETUP_FORMAT
    setup_file.write_text(json.dumps({**values, "ullme_format": SETUP_FORMAT + 1}))
    with pytest.raises(UllmeError, match="field 'ullme_format' is 2; this ullme reads up to 1: upgrade ullme"):
        resolve_setup(str(tmp_path / "m"))
    setup_file.write_text(json.dumps({**values, "rope_trick": True}))
    with caplog.at_level(logging.WARNING, logger="ullme_cli"):
        Embedder.load(str(tmp_path / "m"), dtype="float32", device="cpu")  # reads ullme.json in three places
    assert caplog.text.count("ignoring keys this ullme does not know: rope_trick") == 1, caplog.text
    setup_file.write_text(json.dumps({**values, "ullme_format": SETUP_FORMAT + 1}))  # new content: checked again
    with pytest.raises(UllmeError, match="upgrade ullme"):
        resolve_setup(str(tmp_path / "m"))


def test_a_setup_naming_a_missing_latent_head_is_an_error(tiny_llama, tmp_path):
    from ullme_cli.models.embedder import Embedder

    embedder = Embedder.load(str(tiny_llama), dtype="float32", device="cpu", pooling="latent-attention")
    embedder.save(tmp_path / "m")
    (tmp_path / "m" / "latent_attention.safetensors").unlink()
    with pytest.raises(UllmeError, match="latent_attention.safetensors: missing"):
        Embedder.load(str(tmp_path / "m"), dtype="float32", device="cpu")


def test_evaluate_keeps_both_results_of_two_task_dirs_of_one_name(tiny_llama, tmp_path):
    texts = demo_texts(30)
    for n, parent in enumerate(("a", "b")):
        folder = tmp_path / parent / "set"
        (folder / "qrels").mkdir(parents=True)
        write_corpus(folder / "corpus.jsonl", texts)
        (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": texts[i + n]}) + "\n" for i in range(5)))
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i + 3 * n}\t1\n" for i in range(5)))
    result = run_cli("evaluate", "-m", tiny_llama, "--task-dir", tmp_path / "a" / "set", "--task-dir", tmp_path / "b" / "set",
                     "--output-dir", tmp_path / "res", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert sorted(summary["tasks"]) == ["a-set", "b-set"], summary
    assert summary["tasks"]["a-set"]["value"] != summary["tasks"]["b-set"]["value"]  # two sets, two scores


def test_evaluate_may_write_results_into_a_folder_that_holds_its_model(tiny_llama, tmp_path):
    """The results folder is a cache ullme adds to under its own names: holding the model is fine, lying
    inside it is not (the model's fingerprint would change)."""
    import shutil

    texts = demo_texts(20)
    shutil.copytree(tiny_llama, tmp_path / "model")
    (tmp_path / "set" / "qrels").mkdir(parents=True)
    write_corpus(tmp_path / "set" / "corpus.jsonl", texts)
    (tmp_path / "set" / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": texts[i]}) + "\n" for i in range(4)))
    (tmp_path / "set" / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i + 1}\t1\n" for i in range(4)))
    held = run_cli("evaluate", "-m", tmp_path / "model", "--task-dir", tmp_path / "set", "--output-dir", tmp_path, "-q")
    assert held.returncode == 0, held.stderr.decode()
    inside = run_cli("evaluate", "-m", tmp_path / "model", "--task-dir", tmp_path / "set", "--output-dir", tmp_path / "model" / "res", "-q")
    assert inside.returncode == 2 and b"lies inside the input" in inside.stderr


def test_the_documented_recipe_values_are_accepted_as_typed(tmp_path):
    """Seen: `--set train.mixed_precision=no` failed ("expected str, got bool"): YAML 1.1 reads `no` as false."""
    from ullme_cli.recipes import load_recipe

    (tmp_path / "r.yaml").write_text("data: {train: t.jsonl}\ntrain: {mixed_precision: no}\nlora: {enabled: true}\n")
    assert load_recipe(str(tmp_path / "r.yaml")).train.mixed_precision == "no"
    assert load_recipe(str(tmp_path / "r.yaml"), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_recipe(str(tmp_path / "r.yaml"), ["lora.enabled=false"]).lora.enabled is False
    with pytest.raises(UllmeError, match="'lora.enabled': expected bool, got str 'yes'"):
        load_recipe(str(tmp_path / "r.yaml"), ["lora.enabled=yes"])


def test_quiet_means_no_library_chatter(tiny_llama, tmp_path):
    """Seen: under -q, `datasets` still printed log lines and progress bars."""
    from datasets import Dataset

    Dataset.from_list([{"id": f"d{i}", "text": t} for i, t in enumerate(demo_texts(10))]).to_parquet(str(tmp_path / "c.parquet"))
    result = run_cli("encode", tmp_path / "c.parquet", "-o", tmp_path / "e.npy", "-m", tiny_llama, "-q")
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()


def test_a_refusal_under_torchrun_is_one_line_per_launch(tmp_path, monkeypatch):
    """Every rank of a launch reaches the same refusal; the line is printed once, not once per process."""
    import uuid

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", str(uuid.uuid4()))  # this launch (the test's forked calls share a parent)
    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(3))
    ranks = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        ranks.append(run_cli("encode", corpus, "-o", "-"))
    assert [r.returncode for r in ranks] == [2, 2]
    lines = [line for r in ranks for line in r.stderr.decode().splitlines()]
    assert lines == ["ullme: error: encode with several processes writes files: give -o a path, not -"], lines
    other = run_cli("encode", corpus, "-o", tmp_path / "e.npy", "--shard", "0/2")  # another message: printed
    assert other.returncode == 2 and other.stderr == b"ullme: error: --shard and a multi-process launch do not mix: the launch shards by rank\n"
