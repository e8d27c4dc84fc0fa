"""Bad input, command by command, through the real CLI: each case must end with exit status 2, one line on
stderr that names the problem, no traceback, no new file, and every file that was there byte-identical.

A case is (name, arguments, preparation, expected text). The arguments may name `{model}`, `{corpus}`,
`{emb}`, `{idx}`, `{train}` (shared, valid artefacts made once) and `{d}` (the case's own folder, where the
preparation writes the bad input).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import RESOURCES, demo_texts, run_cli

from ullme_cli.artifacts import save_embeddings


def write(relative: str, content: str | bytes):
    def prepare(d: Path, shared: Path) -> None:
        path = d / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return prepare


def copy_model(d: Path, shared: Path) -> Path:
    shutil.copytree(shared / "model", d / "model")
    return d / "model"


def model_without(name: str):
    def prepare(d: Path, shared: Path) -> None:
        (copy_model(d, shared) / name).unlink()

    return prepare


def truncated_weights(d: Path, shared: Path) -> None:
    weights = copy_model(d, shared) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def broken_config(d: Path, shared: Path) -> None:
    (copy_model(d, shared) / "config.json").write_text('{"model_type": "llama", ')


def pickled_adapter(d: Path, shared: Path) -> None:
    (copy_model(d, shared) / "adapter").mkdir()
    (d / "model" / "adapter" / "adapter_config.json").write_text("{}")
    (d / "model" / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")


def embeddings(matrix, ids=None, **meta_changes):
    def prepare(d: Path, shared: Path) -> None:
        meta = json.loads((shared / "emb.meta.json").read_text())
        rows = ids if ids is not None else [f"r{i}" for i in range(len(matrix))]
        save_embeddings(str(d / "e.npy"), np.asarray(matrix, dtype=np.float32), rows, {**meta, **meta_changes})

    return prepare


def raw_npy(array):
    def prepare(d: Path, shared: Path) -> None:
        np.save(d / "e.npy", np.asarray(array, dtype=np.float32))
        (d / "e.ids.jsonl").write_text("".join(f'"r{i}"\n' for i in range(len(array))))
        meta = json.loads((shared / "emb.meta.json").read_text())
        (d / "e.meta.json").write_text(json.dumps({**meta, "count": len(array)}))

    return prepare


def replaced_vectors(d: Path, shared: Path) -> None:
    """A crash after emb.npy was replaced but before its sidecars: new vectors, old ids and meta."""
    for name in ("emb.npy", "emb.ids.jsonl", "emb.meta.json"):
        shutil.copy(shared / name, d / name.replace("emb", "e"))
    matrix = np.load(d / "e.npy")
    np.save(d / "e.npy", matrix[::-1].copy())


def longer_ids(d: Path, shared: Path) -> None:
    for name in ("emb.npy", "emb.ids.jsonl", "emb.meta.json"):
        shutil.copy(shared / name, d / name.replace("emb", "e"))
    with open(d / "e.ids.jsonl", "a") as f:
        f.write('"extra"\n')


def index_copy(change):
    def prepare(d: Path, shared: Path) -> None:
        shutil.copytree(shared / "idx", d / "idx")
        change(d / "idx")

    return prepare


def with_checkpoint(d: Path, shared: Path) -> None:
    (d / "run" / "checkpoints" / "step-0000001").mkdir(parents=True)
    (d / "recipe.yaml").write_text(recipe_text(d, shared))


def recipe_text(d: Path, shared: Path, **changes) -> str:
    import yaml

    recipe = {
        "output_dir": str(d / "run"),
        "model": {"name": str(shared / "model"), "max_length": 64},  # room for the default query instruction (51 tiny tokens)
        "data": {"train": str(shared / "train.jsonl")},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        recipe.setdefault(section, {})[name] = value
    return yaml.safe_dump(recipe)


def recipe(**changes):
    def prepare(d: Path, shared: Path) -> None:
        (d / "recipe.yaml").write_text(recipe_text(d, shared, **changes))

    return prepare


def recipe_over(row: str, **changes):
    """A recipe whose training data is the one jsonl `row` (written to t.jsonl)."""

    def prepare(d: Path, shared: Path) -> None:
        (d / "t.jsonl").write_text(row + "\n")
        (d / "recipe.yaml").write_text(recipe_text(d, shared, data__train=str(d / "t.jsonl"), **changes))

    return prepare


def shard_of_other_corpus(d: Path, shared: Path) -> None:
    other = d / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": t.upper()}) + "\n" for i, t in enumerate(demo_texts(40))))
    for name in ("s0.npy", "s0.ids.jsonl", "s0.meta.json"):
        shutil.copy(shared / name, d / name)
    result = run_cli("encode", other, "-o", d / "s1.npy", "--model", shared / "model", "--shard", "1/2", "-q")
    assert result.returncode == 0, result.stderr.decode()


def nothing(d: Path, shared: Path) -> None:
    pass


def model_setup(**changes):
    """A copy of the shared model whose ullme.json says `changes`."""

    def prepare(d: Path, shared: Path) -> None:
        folder = copy_model(d, shared)
        path = folder / "ullme.json"
        values = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**values, **changes}))

    return prepare


def parquet(rows: list[dict], name: str = "c.parquet"):
    def prepare(d: Path, shared: Path) -> None:
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(d / name))

    return prepare


def saved_dataset(rows: list[dict], name: str = "ds"):
    def prepare(d: Path, shared: Path) -> None:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(d / name))

    return prepare


def exported(extra: dict[str, str | bytes]):
    """An exported copy of the shared model, with files added or replaced."""

    def prepare(d: Path, shared: Path) -> None:
        folder = copy_model(d, shared)
        for relative, content in extra.items():
            (folder / relative).write_bytes(content if isinstance(content, bytes) else content.encode())

    return prepare


def run_folder(lines: list[str] | bytes):
    def prepare(d: Path, shared: Path) -> None:
        (d / "run").mkdir()
        (d / "run" / "metrics.jsonl").write_bytes(lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode())

    return prepare


def empty_parquet(d: Path, shared: Path) -> None:
    """A valid parquet file with a text column and no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), str(d / "c.parquet"))


def symlink_loop(d: Path, shared: Path) -> None:
    (d / "loop").symlink_to(d / "loop")


def streamed_csv(d: Path, shared: Path) -> None:
    (d / "t.csv").write_text("query,positive\nq,p\nr,s\n")
    (d / "recipe.yaml").write_text(recipe_text(d, shared).replace(f"train: {shared / 'train.jsonl'}", f"sources: [{{path: {d / 't.csv'}, stream: true}}]"))


def adapter_on_missing_base(d: Path, shared: Path) -> None:
    """An adapter-only folder whose base was moved away after training."""
    folder = d / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(d / "moved-base")}))
    (folder / "ullme.json").write_text(json.dumps({"ullme_format": 1, "base": {"model": str(d / "moved-base"), "fingerprint": "0123456789abcdef" * 4}}))


def beir_folder(qrels: str, queries: str = '{"_id": "q1", "text": "x"}\n'):
    def prepare(d: Path, shared: Path) -> None:
        (d / "t" / "qrels").mkdir(parents=True)
        (d / "t" / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"}\n')
        (d / "t" / "queries.jsonl").write_text(queries)
        (d / "t" / "qrels" / "test.tsv").write_text(qrels)

    return prepare


EMB = "{emb}"
CORPUS_LINE = '{"id": "a", "text": "x"}\n'
CASES = [
    # ---------------------------------------------------------------- encode: the corpus
    ("encode-missing-input", ["encode", "{d}/nope.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], nothing, "nope.jsonl: file not found"),
    ("encode-input-is-folder", ["encode", "{d}/plain", "-o", "{d}/e.npy", "-m", "{model}"], write("plain/x.txt", "x"), "is a folder, but not a `datasets` save_to_disk folder"),
    ("encode-empty-corpus", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", ""), "no texts found"),
    ("encode-on-long-error", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}", "--max-length", "16", "--on-long", "error"],
     write("c.jsonl", '{"id": "short", "text": "a b"}\n{"id": "long-one", "text": "' + "word " * 40 + '"}\n'), "text 'long-one' is longer than max_length 16 tokens (1 text(s) over"),
    ("encode-on-long-unknown", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}", "--on-long", "chunk"], write("c.jsonl", CORPUS_LINE), "--on-long must be one of truncate, error"),
    ("encode-malformed-json", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", CORPUS_LINE + '{"id": "b", "text": \n'), "c.jsonl:2: malformed JSON"),
    ("encode-no-text-field", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", '{"id": "a", "title": "t"}\n'), "c.jsonl:1: field 'text' is missing"),
    ("encode-duplicate-id", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", CORPUS_LINE * 2), "c.jsonl:2: duplicate id 'a'"),
    ("encode-not-utf8", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", b'{"id": "a", "text": "\xc3\x28"}\n'), "c.jsonl:1: not valid UTF-8"),
    ("encode-tsv-extra-columns", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "a\tb\tc\td\n"), "c.tsv:1: 4 tab-separated columns"),
    ("encode-tsv-no-text", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "a\tok\nb\t \n"), "c.tsv:2: field 'text'"),
    ("encode-json-not-object", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", "[1, 2]\n"), "c.jsonl:1: expected a JSON object"),
    ("encode-chunk-overlap-as-large", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--chunk-tokens", "16", "--chunk-overlap", "16"], nothing,
     "--chunk-overlap must be at least 0 and below --chunk-tokens (16), got 16"),
    ("encode-chunk-above-max-length", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--max-length", "32", "--chunk-tokens", "64"], nothing,
     "--chunk-tokens 64 is above the model's max_length 32"),
    ("encode-chunk-no-room", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--max-length", "32", "--chunk-tokens", "32"], nothing,
     "instruction and special tokens, which leave room for 31 of max_length 32; use --chunk-tokens 31 or less"),
    ("encode-chunk-tokens-0", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--chunk-tokens", "0"], nothing, "--chunk-tokens must be at least 1"),
    ("encode-chunk-overlap-alone", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--chunk-overlap", "4"], nothing, "--chunk-overlap 4 needs --chunk-tokens"),
    ("encode-chunk-pool-unknown", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--chunk-tokens", "16", "--chunk-pool", "max"], nothing,
     "--chunk-pool must be one of none, mean, got 'max'"),
    # ---------------------------------------------------------------- encode: the output
    ("encode-output-is-input", ["encode", "{d}/c.jsonl", "-o", "{d}/c.jsonl", "-m", "{model}"], write("c.jsonl", CORPUS_LINE), "is the input"),
    ("encode-output-is-folder", ["encode", "{corpus}", "-o", "{d}/out", "-m", "{model}"], write("out/keep.txt", "mine"), "is a folder; expected a file"),
    ("encode-output-under-a-file", ["encode", "{corpus}", "-o", "{d}/f/e.npy", "-m", "{model}"], write("f", "a file"), "is a file, not a folder"),
    ("encode-output-unwritable", ["encode", "{corpus}", "-o", "/proc/ullme-test/e.npy", "-m", "{model}"], nothing, "/proc/ullme-test: No such file or directory"),
    ("encode-output-exists", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}"], write("e.npy", "old"), "exists already; pass --overwrite"),
    ("encode-sidecar-exists", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}"], write("e.meta.json", "{}"), "e.meta.json: exists already"),
    # ---------------------------------------------------------------- encode: options
    ("encode-token-budget-0", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "0"], nothing, "--token-budget must be at least 1"),
    ("encode-token-budget-negative", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "-5"], nothing, "--token-budget must be at least 1"),
    ("encode-token-budget-not-a-number", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "many"], nothing, "Invalid value for '--token-budget'"),
    ("encode-truncate-dim-0", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--truncate-dim", "0"], nothing, "--truncate-dim must be at least 1"),
    ("encode-truncate-dim-too-large", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--truncate-dim", "999"], nothing, "--truncate-dim must be between 1 and 32"),
    ("encode-unknown-pooling", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--pooling", "max"], nothing, "unknown pooling 'max'"),
    ("encode-unknown-attention", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--attention", "sideways"], nothing, "unknown attention mode 'sideways'"),
    ("encode-unknown-kind", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--kind", "doc"], nothing, "--kind must be one of"),
    ("encode-unknown-out-dtype", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--out-dtype", "int4"], nothing, "unknown --out-dtype 'int4'"),
    ("encode-unknown-dtype", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--dtype", "float8"], nothing, "unknown dtype 'float8'"),
    ("encode-unknown-format", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--input-format", "xml"], nothing, "unknown input format 'xml'"),
    ("encode-shard-out-of-range", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--shard", "3/3"], nothing, "--shard 3/3 is out of range"),
    ("encode-shard-malformed", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--shard", "x"], nothing, "--shard must look like i/N"),
    ("encode-max-length-1", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--max-length", "1"], nothing, "max_length must be at least 2"),
    ("encode-unknown-option", ["encode", "{corpus}", "-o", "{d}/e.npy", "--bogus"], nothing, "No such option: --bogus"),
    ("encode-device-bogus", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--device", "bogus"], nothing, "--device 'bogus': not a device"),
    ("encode-device-cuda-without-gpu", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--device", "cuda"], nothing, "no CUDA GPU is available"),
    # ---------------------------------------------------------------- encode: the model
    ("encode-model-not-found", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/no-model"], nothing, "model folder not found"),
    ("encode-model-without-weights", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_without("model.safetensors"), "has no weights"),
    ("encode-model-without-tokenizer", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_without("tokenizer.json"), "cannot load the tokenizer"),
    ("encode-truncated-weights", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], truncated_weights, "cannot load the model from this folder"),
    ("encode-broken-config", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], broken_config, "config.json: not valid JSON"),
    ("encode-pickled-adapter", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], pickled_adapter, "loads adapters from safetensors only"),
    ("encode-broken-setup-file", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/m"], write("m/ullme.json", "{oops"), "ullme.json: not valid JSON"),
    # ---------------------------------------------------------------- join
    ("join-other-corpus", ["join", "{d}/s0.npy", "{d}/s1.npy", "-o", "{d}/j.npy"], shard_of_other_corpus, "a shard of another corpus"),
    ("join-not-a-shard", ["join", EMB, "-o", "{d}/j.npy"], nothing, "not a shard"),
    ("join-missing-shard", ["join", "{shared}/s0.npy", "-o", "{d}/j.npy"], nothing, "missing [1]"),
    ("join-output-exists", ["join", "{shared}/s0.npy", "-o", "{d}/j.npy"], write("j.npy", "old"), "exists already"),
    # ---------------------------------------------------------------- index: the embeddings
    ("index-1d-array", ["index", "{d}/e.npy", "-o", "{d}/i"], raw_npy(np.ones(8)), "expected a 2-D matrix"),
    ("index-3d-array", ["index", "{d}/e.npy", "-o", "{d}/i"], raw_npy(np.ones((2, 2, 2))), "expected a 2-D matrix"),
    ("index-corrupt-npz", ["index", "{d}/e.npz", "-o", "{d}/i"], write("e.npz", b"PK\x03\x04 broken zip"), "not an ullme embeddings stream"),
    ("index-binary-npy", ["index", "{d}/e.npy", "-o", "{d}/i"], write("e.npy", b"\x00\x01garbage" * 10), "not a readable .npy file"),
    ("index-nan-vector", ["index", "{d}/e.npy", "-o", "{d}/i"], embeddings([[0.6, 0.8], [np.nan, 1.0]], dim=2), "has NaN or infinite values"),
    ("index-inf-vector", ["index", "{d}/e.npy", "-o", "{d}/i"], embeddings([[np.inf, 0.0]], dim=2), "has NaN or infinite values"),
    ("index-duplicate-ids", ["index", "{d}/e.npy", "-o", "{d}/i"], embeddings(np.eye(2), ids=["a", "a"], dim=2), "id 'a' appears more than once"),
    ("index-ids-longer", ["index", "{d}/e.npy", "-o", "{d}/i"], longer_ids, "41 ids for 40 embeddings"),
    ("index-files-not-one-unit", ["index", "{d}/e.npy", "-o", "{d}/i"], replaced_vectors, "do not belong together"),
    ("index-missing-sidecars", ["index", "{d}/e.npy", "-o", "{d}/i"], lambda d, s: np.save(d / "e.npy", np.eye(2, dtype=np.float32)), "e.ids.jsonl: missing"),
    ("index-query-embeddings", ["index", "{d}/e.npy", "-o", "{d}/i"], embeddings(np.eye(2), kind="query", dim=2), "these are query embeddings"),
    ("index-bad-meta-json", ["index", "{d}/e.npy", "-o", "{d}/i"], lambda d, s: (raw_npy(np.eye(2))(d, s), (d / "e.meta.json").write_text("{")), "e.meta.json: not valid JSON"),
    # ---------------------------------------------------------------- index: the output
    ("index-output-exists", ["index", EMB, "-o", "{d}/idx"], index_copy(lambda i: None), "an index exists here already"),
    ("index-foreign-file", ["index", EMB, "-o", "{d}/idx", "--overwrite"], index_copy(lambda i: (i / "notes.txt").write_text("mine")), "files that ullme did not write (notes.txt)"),
    ("index-add-to-non-index", ["index", EMB, "-o", "{d}/plain", "--add"], write("plain/x.txt", "x"), "not an ullme index folder"),
    ("index-bad-factory", ["index", EMB, "-o", "{d}/i", "--factory", "Nonsense42"], nothing, "--factory 'Nonsense42'"),
    ("index-bad-metric", ["index", EMB, "-o", "{d}/i", "--metric", "cosine"], nothing, "unknown --metric 'cosine'"),
    ("index-output-is-file", ["index", EMB, "-o", "{d}/f"], write("f", "a file"), "is a file; expected a folder"),
    # ---------------------------------------------------------------- search
    ("search-aggregate-unknown", ["search", "{idx}", "{corpus}", "--aggregate", "mean"], nothing, "--aggregate must be one of max, sum, got 'mean'"),
    ("search-chunk-depth-0", ["search", "{idx}", "{corpus}", "--chunk-depth", "0"], nothing, "--chunk-depth must be at least 1"),
    ("search-chunk-map-tampered", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "manifest.json").write_text(
        (i / "manifest.json").read_text().replace('"metric"', '"chunk_map_checksum": "0", "metric"'))), "idx/chunks.jsonl: missing"),
    ("search-truncated-index", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "index.faiss").write_bytes((i / "index.faiss").read_bytes()[:100])), "not a readable FAISS index"),
    ("search-empty-index", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "index.faiss").write_bytes(b"")), "not a readable FAISS index"),
    ("search-missing-ids", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "ids.jsonl").unlink()), "ids.jsonl: missing"),
    ("search-bad-manifest", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "manifest.json").write_text("{")), "manifest.json: not valid JSON"),
    ("search-manifest-without-setup", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "manifest.json").write_text('{"metric": "ip"}')), "field 'factory' is missing"),
    ("search-ids-short", ["search", "{d}/idx", "{corpus}"], index_copy(lambda i: (i / "ids.jsonl").write_text('"d0"\n')), "1 ids for"),
    ("search-output-is-folder", ["search", "{idx}", "{corpus}", "-o", "{d}"], nothing, "is a folder; expected a file"),
    ("search-output-exists", ["search", "{idx}", "{corpus}", "-o", "{d}/run.jsonl"], write("run.jsonl", "old"), "exists already"),
    ("search-output-is-input", ["search", "{idx}", "{d}/q.jsonl", "-o", "{d}/q.jsonl", "--overwrite"], write("q.jsonl", CORPUS_LINE), "is the input"),
    ("search-k-0", ["search", "{idx}", "{corpus}", "-k", "0"], nothing, "-k must be at least 1"),
    ("search-bad-format", ["search", "{idx}", "{corpus}", "--format", "xml"], nothing, "unknown --format 'xml'"),
    ("search-nprobe-0", ["search", "{idx}", "{corpus}", "--nprobe", "0"], nothing, "--nprobe must be at least 1"),
    ("search-backend-unknown", ["search", "{idx}", "{corpus}", "--backend", "tensorrt"], nothing, "--backend must be one of auto, torch, onnx"),
    ("search-backend-onnx-over-torch-folder", ["search", "{idx}", "{corpus}", "--backend", "onnx"], nothing, "this folder is not an ONNX export"),
    ("mine-backend-unknown", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--backend", "tensorrt"], nothing, "--backend must be one of"),
    ("evaluate-max-length-1", ["evaluate", "-m", "{model}", "--task-dir", "{trecqa}", "--output-dir", "{d}/res", "--max-length", "1"], nothing, "max_length must be at least 2"),
    ("serve-dtype-unknown", ["serve", "{model}", "--dtype", "float8"], nothing, "unknown dtype 'float8'"),
    ("search-index-not-found", ["search", "{d}/none", "{corpus}"], nothing, "index folder not found"),
    ("search-queries-from-other-setup", ["search", "{idx}", "--embeddings", "{d}/e.npy"], embeddings(np.eye(2, 32), pooling="cls", kind="query"), "'pooling' is 'cls' here but 'mean' there"),
    # ---------------------------------------------------------------- mine
    ("mine-binary-corpus-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{d}/e.npy"], write("e.npy", b"\x93NUMPY garbage" * 5), "not a readable .npy file"),
    ("mine-truncated-corpus-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{d}/e.npy"],
     lambda d, s: [shutil.copy(s / n, d / n.replace("emb", "e")) for n in ("emb.ids.jsonl", "emb.meta.json")] and (d / "e.npy").write_bytes((s / "emb.npy").read_bytes()[:300]), "not a readable .npy file"),
    ("mine-chunk-tokens-with-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{emb}",
     "--chunk-tokens", "16"], nothing, "--chunk-tokens applies when mine encodes the corpus"),
    ("mine-chunk-overlap-as-large", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--chunk-tokens", "8", "--chunk-overlap", "9"],
     nothing, "--chunk-overlap must be at least 0 and below --chunk-tokens (8), got 9"),
    ("mine-output-is-training-file", ["mine", "{d}/t.jsonl", "--corpus", "{corpus}", "-o", "{d}/t.jsonl", "-m", "{model}", "--overwrite"], write("t.jsonl", '{"query": "q", "positive": "p"}\n'), "is the input"),
    ("mine-output-exists", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}"], write("m.jsonl", "old"), "exists already"),
    ("mine-range-malformed", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--range", "ten"], nothing, "--range must look like A:B"),
    ("mine-range-empty", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--range", "5:5"], nothing, "--range 5:5: need 0 <= A < B"),
    ("mine-negative-margin", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--margin", "-0.1"], nothing, "--margin must be a number of at least 0"),
    ("mine-device-bogus", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--device", "bogus"], nothing, "--device 'bogus': not a device"),
    ("mine-attention-bogus", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--attention", "sideways"], nothing, "unknown attention mode 'sideways'"),
    ("mine-negatives-0", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--negatives", "0"], nothing, "--negatives must be at least 1"),
    ("mine-bad-training-row", ["mine", "{d}/t.jsonl", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}"], write("t.jsonl", '{"query": "q"}\n'), "t.jsonl:1: field 'positive' is missing"),
    # ---------------------------------------------------------------- evaluate
    ("evaluate-run-without-qrels", ["evaluate", "--run", "{d}/r.trec"], write("r.trec", "q 0 d 1 1.0 x\n"), "--run and --qrels go together"),
    ("evaluate-bad-run-line", ["evaluate", "--run", "{d}/r.trec", "--qrels", "{d}/q.tsv"], lambda d, s: (write("r.trec", "q Q0 d\n")(d, s), write("q.tsv", "q\td\t1\n")(d, s)), "r.trec:1: expected a TREC run line"),
    ("evaluate-bad-qrels-score", ["evaluate", "--run", "{d}/r.trec", "--qrels", "{d}/q.tsv"], lambda d, s: (write("r.trec", "q Q0 d 1 1.0 x\n")(d, s), write("q.tsv", "q\td\t1\nq\te\thigh\n")(d, s)), "q.tsv:2: field 'score' must be an integer"),
    ("evaluate-missing-task-dir", ["evaluate", "-m", "{model}", "--task-dir", "{d}/none", "--output-dir", "{d}/res"], nothing, "task folder not found"),
    ("evaluate-device-cuda-without-gpu", ["evaluate", "-m", "{model}", "--task-dir", "{trecqa}", "--output-dir", "{d}/res", "--device", "cuda"], nothing, "no CUDA GPU is available"),
    ("evaluate-no-task", ["evaluate", "-m", "{model}", "--output-dir", "{d}/res"], nothing, "name --tasks, --task-dir, --sts or --pairs"),
    # ---------------------------------------------------------------- finetune
    ("finetune-deepspeed", ["finetune", "{d}/recipe.yaml", "--set", "train.distributed=deepspeed"], recipe(), "DeepSpeed is not supported: use fsdp"),
    ("finetune-fsdp-with-eval", ["finetune", "{d}/recipe.yaml", "--set", "train.distributed=fsdp", "--set", "eval.task_dir={trecqa}"], recipe(), "not run under train.distributed: fsdp"),
    ("finetune-distill-without-teacher-scores", ["finetune", "{d}/recipe.yaml"], recipe(loss__weights={"contrastive": 1, "distill": 1}), "no training row carries pos_scores"),
    ("finetune-matryoshka-not-increasing", ["finetune", "{d}/recipe.yaml"], recipe(loss__matryoshka_dims=[16, 8]), "'loss.matryoshka_dims' must be increasing"),
    ("finetune-matryoshka-bad-size", ["finetune", "{d}/recipe.yaml"], recipe(loss__matryoshka_dims=[0, "full"]), "must list sizes of at least 1"),
    ("finetune-matryoshka-weights-count", ["finetune", "{d}/recipe.yaml"], recipe(loss__matryoshka_dims=[8, "full"], loss__matryoshka_weights=[1]), "needs one weight per dim (2)"),
    ("finetune-matryoshka-above-the-model", ["finetune", "{d}/recipe.yaml"], recipe(loss__matryoshka_dims=[8, 4096]), "4096 is above the model's"),
    ("finetune-dry-run-without-a-config", ["finetune", "{d}/recipe.yaml", "--dry-run"], recipe(model__name="nobody/no-such-model"), "config cannot be read here"),
    ("finetune-bad-template", ["finetune", "{d}/recipe.yaml"], recipe(model__template="paper"), "'model.template' must be one of"),
    ("finetune-matryoshka-without-contrastive", ["finetune", "{d}/recipe.yaml"], recipe(loss__strategy="sft", loss__matryoshka_dims=[8]), "has none of them"),
    ("finetune-teacher-scores-count", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": ["p"], "pos_scores": [0.5, 0.4]}'),
     "t.jsonl:1: field 'pos_scores' has 2 scores for 1 positives"),
    ("finetune-teacher-scores-not-numbers", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": ["p"], "negative": ["n"], "neg_scores": ["high"]}'),
     "t.jsonl:1: field 'neg_scores' must be a list of numbers"),
    ("mine-teacher-not-found", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--teacher", "{d}/none"], nothing, "not found"),
    ("finetune-recipe-not-found", ["finetune", "{d}/none.yaml"], nothing, "none.yaml: file not found"),
    ("finetune-invalid-yaml", ["finetune", "{d}/recipe.yaml"], write("recipe.yaml", "model: [unclosed\n"), "not valid YAML"),
    ("finetune-top-level-list", ["finetune", "{d}/recipe.yaml"], write("recipe.yaml", "- a\n- b\n"), "a recipe is a mapping of sections"),
    ("finetune-unknown-key", ["finetune", "{d}/recipe.yaml"], recipe(train__stepz=3), "unknown key 'train.stepz'"),
    ("finetune-all-weights-zero", ["finetune", "{d}/recipe.yaml"], recipe(loss__weights={"contrastive": 0, "kl": 0}), "are all 0"),
    ("finetune-negative-weight", ["finetune", "{d}/recipe.yaml"], recipe(loss__weights={"contrastive": -1}), "'loss.weights.contrastive' must be a number of at least 0"),
    ("finetune-lora-r-0", ["finetune", "{d}/recipe.yaml"], recipe(lora__r=0), "'lora.r' must be at least 1"),
    ("finetune-lora-dropout-1", ["finetune", "{d}/recipe.yaml"], recipe(lora__dropout=1.0), "'lora.dropout' must be at least 0 and below 1"),
    ("finetune-negative-weight-decay", ["finetune", "{d}/recipe.yaml"], recipe(train__weight_decay=-0.1), "'train.weight_decay' must be at least 0"),
    ("finetune-negative-max-grad-norm", ["finetune", "{d}/recipe.yaml"], recipe(train__max_grad_norm=-1), "'train.max_grad_norm' must be at least 0"),
    ("finetune-bad-set", ["finetune", "{d}/recipe.yaml", "--set", "train.steps"], recipe(), "--set expects section.key=value"),
    ("finetune-checkpoints-without-resume", ["finetune", "{d}/recipe.yaml"], with_checkpoint, "pass --resume to continue it"),
    ("finetune-bad-training-row", ["finetune", "{d}/recipe.yaml", "--set", "data.train={d}/t.jsonl"], lambda d, s: (recipe()(d, s), write("t.jsonl", "{bad\n")(d, s)), "t.jsonl:1: malformed JSON"),
    # ---------------------------------------------------------------- the readers: csv, parquet, save_to_disk, hf:, aliases
    ("encode-csv-no-text", ["encode", "{d}/c.csv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.csv", "id,text\na,x\nb,\n"), "c.csv:3: field 'text' is missing"),
    ("encode-csv-extra-values", ["encode", "{d}/c.csv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.csv", "id,text\na,x,y\n"), "c.csv:2: 3 comma-separated values; the header names 2"),
    ("encode-csv-unclosed-quote", ["encode", "{d}/c.csv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.csv", 'id,text\na,"x\n'), "c.csv:2: malformed csv (unexpected end of data)"),
    ("encode-csv-duplicate-id", ["encode", "{d}/c.csv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.csv", "id,text\n001,x\n001,y\n"), "c.csv:3: duplicate id '001'"),
    ("encode-csv-not-utf8", ["encode", "{d}/c.csv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.csv", b"id,text\na,\xc3\x28\n"), "c.csv:2: not valid UTF-8"),
    ("encode-parquet-no-text", ["encode", "{d}/c.parquet", "-o", "{d}/e.npy", "-m", "{model}"], parquet([{"id": "a", "body": "x"}]), "c.parquet: row 1: field 'text' is missing"),
    ("encode-parquet-not-parquet", ["encode", "{d}/c.parquet", "-o", "{d}/e.npy", "-m", "{model}"], write("c.parquet", "not parquet"), "cannot read it as parquet"),
    ("encode-parquet-bool-id", ["encode", "{d}/c.parquet", "-o", "{d}/e.npy", "-m", "{model}"], parquet([{"id": True, "text": "x"}]), "field 'id' must be a string"),
    ("encode-dataset-no-text", ["encode", "{d}/ds", "-o", "{d}/e.npy", "-m", "{model}"], saved_dataset([{"id": "a", "body": "x"}]), "ds: row 1: field 'text' is missing"),
    ("encode-dataset-duplicate-id", ["encode", "{d}/ds", "-o", "{d}/e.npy", "-m", "{model}"], saved_dataset([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]), "ds: row 2: duplicate id 'a'"),
    ("encode-hf-offline", ["encode", "hf:nobody/no-such-set", "-o", "{d}/e.npy", "-m", "{model}"], nothing, "hf:nobody/no-such-set: cannot load this dataset"),
    ("encode-stdin-parquet", ["encode", "-", "-o", "{d}/e.npy", "-m", "{model}", "--input-format", "parquet"], nothing, "stdin holds jsonl, tsv, text or csv"),
    ("encode-tsv-header-alias-clash", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "id\t_id\ttext\na\tb\tx\n"), "fields 'id' and '_id' name the same thing"),
    ("encode-jsonl-alias-clash", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", '{"id": "a", "docid": "b", "text": "x"}\n'), "c.jsonl:1: fields 'id' and 'docid'"),
    ("encode-tsv-header-only", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "\ufeffid\ttext\n"), "no texts found"),
    ("mine-alias-clash", ["mine", "{d}/t.jsonl", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}"], write("t.jsonl", '{"query": "q", "anchor": "r", "positive": "p"}\n'), "t.jsonl:1: fields 'query' and 'anchor'"),
    ("mine-positive-alias-clash", ["mine", "{d}/t.jsonl", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}"], write("t.jsonl", '{"query": "q", "positive": "p", "pos": "o"}\n'), "fields 'positive' and 'pos'"),
    # ---------------------------------------------------------------- the model folder
    ("encode-newer-model-format", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_setup(ullme_format=99), "field 'ullme_format' is 99; this ullme reads up to 1"),
    ("encode-model-format-not-a-number", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_setup(ullme_format="one"), "field 'ullme_format' is 'one'"),
    ("encode-latent-head-missing", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_setup(pooling="latent-attention"), "latent_attention.safetensors: missing"),
    ("encode-setup-bad-pooling", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/model"], model_setup(pooling="max"), "unknown pooling 'max'"),
    ("encode-setup-is-a-list", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/m"], write("m/ullme.json", "[1]"), "ullme.json: expected a JSON object"),
    # ---------------------------------------------------------------- encode: outputs that are inputs
    ("encode-output-inside-model", ["encode", "{corpus}", "-o", "{model}/e.npy", "-m", "{model}"], nothing, "lies inside the input"),
    ("encode-output-inside-dataset", ["encode", "{d}/ds", "-o", "{d}/ds/e.npy", "-m", "{model}"], saved_dataset([{"id": "a", "text": "x"}]), "lies inside the input"),
    ("encode-sidecar-is-input", ["encode", "{d}/e.ids.jsonl", "-o", "{d}/e.npy", "-m", "{model}", "--overwrite"], write("e.ids.jsonl", CORPUS_LINE), "is the input"),
    # ---------------------------------------------------------------- join
    ("join-output-is-shard", ["join", "{shared}/s0.npy", "-o", "{shared}/s0.npy", "--overwrite"], nothing, "is the input"),
    ("join-shard-not-found", ["join", "{d}/none.npy", "-o", "{d}/j.npy"], nothing, "none.npy: file not found"),
    ("join-shard-sidecars-missing", ["join", "{d}/e.npy", "-o", "{d}/j.npy"], lambda d, s: np.save(d / "e.npy", np.eye(2, dtype=np.float32)), "e.ids.jsonl: missing"),
    ("join-shard-is-folder", ["join", "{d}/sub", "-o", "{d}/j.npy"], write("sub/x", "x"), "is a folder, expected an embeddings file"),
    ("join-same-shard-twice", ["join", "{shared}/s0.npy", "{shared}/s0.npy", "-o", "{d}/j.npy"], nothing, "expected shards 0..1 once each"),
    ("join-output-is-folder", ["join", "{shared}/s0.npy", "-o", "{d}/out"], write("out/x", "x"), "is a folder; expected a file"),
    # ---------------------------------------------------------------- index: options that cannot apply, trained-from
    ("index-trained-from-with-metric", ["index", EMB, "-o", "{d}/i", "--trained-from", "{idx}", "--metric", "l2"], nothing, "--metric does not apply with --trained-from"),
    ("index-trained-from-with-factory", ["index", EMB, "-o", "{d}/i", "--trained-from", "{idx}", "--factory", "Flat"], nothing, "--factory does not apply with --trained-from"),
    ("index-add-with-factory", ["index", EMB, "-o", "{d}/idx", "--add", "--factory", "HNSW32"], index_copy(lambda i: None), "--factory does not apply with --add"),
    ("index-add-with-trained-from", ["index", EMB, "-o", "{d}/idx", "--add", "--trained-from", "{idx}"], index_copy(lambda i: None), "--add and --trained-from do not mix"),
    ("index-trained-from-is-output", ["index", EMB, "-o", "{d}/idx", "--trained-from", "{d}/idx", "--overwrite"], index_copy(lambda i: None), "is the input"),
    ("index-trained-from-not-index", ["index", EMB, "-o", "{d}/i", "--trained-from", "{d}/plain"], write("plain/x.txt", "x"), "not an ullme index folder"),
    ("index-add-same-corpus", ["index", EMB, "-o", "{d}/idx", "--add"], index_copy(lambda i: None), "this corpus (the same ids and texts) is in the index"),
    ("index-add-other-instruction", ["index", "{d}/e.npy", "-o", "{d}/idx", "--add"], lambda d, s: (index_copy(lambda i: None)(d, s), embeddings(np.eye(2, 32), instruction="Other: ", corpus_fingerprint="x")(d, s)), "'instruction' is 'Other: ' here"),
    ("index-add-other-compute-dtype", ["index", "{d}/e.npy", "-o", "{d}/idx", "--add"], lambda d, s: (index_copy(lambda i: None)(d, s), embeddings(np.eye(2, 32), compute_dtype="float16", corpus_fingerprint="x")(d, s)), "'compute_dtype' is 'float16' here"),
    ("index-meta-without-compute-dtype", ["index", "{d}/e.npy", "-o", "{d}/i"], lambda d, s: embeddings(np.eye(2, 32))(d, s) or _drop_meta_key(d / "e.meta.json", "compute_dtype"), "its meta has no 'compute_dtype'"),
    ("index-output-inside-trained-from", ["index", EMB, "-o", "{idx}/sub", "--trained-from", "{idx}"], nothing, "lies inside the input"),
    ("index-add-user-files", ["index", EMB, "-o", "{d}/idx", "--add"], index_copy(lambda i: (i / "notes.txt").write_text("mine")), "did not write (notes.txt)"),
    # ---------------------------------------------------------------- search
    ("search-two-indexes-one-corpus", ["search", "{idx}", "{d}/idx", "{corpus}"], index_copy(lambda i: None), "id 'd0' is in"),
    ("search-output-inside-index", ["search", "{idx}", "{corpus}", "-o", "{idx}/ids.jsonl", "--overwrite"], nothing, "lies inside the input"),
    ("search-passage-embeddings-as-queries", ["search", "{idx}", "--embeddings", EMB], nothing, "'kind' is 'passage' here but 'query' there"),
    ("search-queries-other-instruction", ["search", "{idx}", "--embeddings", "{d}/e.npy"], embeddings(np.eye(2, 32), kind="query", instruction="Other: "), "'instruction' is 'Other: ' here"),
    ("search-queries-other-dtype", ["search", "{idx}", "{corpus}", "--dtype", "float16"], nothing, "'compute_dtype' is 'float16' here but"),
    ("search-no-queries", ["search", "{idx}"], nothing, "give at least one index folder before QUERIES"),
    # ---------------------------------------------------------------- mine: its controls
    ("mine-max-score-nan", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--max-score", "nan"], nothing, "--max-score must be a finite number"),
    ("mine-relative-margin-1", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--relative-margin", "1"], nothing, "--relative-margin must be at least 0 and below 1"),
    ("mine-margin-nan", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--margin", "nan"], nothing, "--margin must be a number of at least 0"),
    ("mine-range-beyond-corpus", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--range", "1000:"], nothing, "--range starts at rank 1000, but"),
    ("mine-seed-negative", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--sample", "--seed", "-1"], nothing, "--seed must be between 0 and 2^32-1"),
    ("mine-seed-without-sample", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--seed", "3"], nothing, "--seed applies to --sample only"),
    ("mine-query-corpus-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{d}/e.npy"], embeddings(np.eye(40, 32), kind="query"), "'kind' is 'query' here but 'passage' there"),
    ("mine-output-inside-model", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{model}/m.jsonl", "-m", "{model}"], nothing, "lies inside the input"),
    ("mine-output-is-corpus", ["mine", "{train}", "--corpus", "{d}/c.jsonl", "-o", "{d}/c.jsonl", "-m", "{model}", "--overwrite"], write("c.jsonl", CORPUS_LINE), "is the input"),
    # ---------------------------------------------------------------- export
    ("serve-public-host-without-key", ["serve", "{model}", "--host", "0.0.0.0"], nothing, "--insecure-public"),
    ("serve-key-variable-unset", ["serve", "{model}", "--api-key-env", "ULLME_TEST_UNSET_KEY"], nothing, "ULLME_TEST_UNSET_KEY"),
    ("serve-on-long-unknown", ["serve", "{model}", "--on-long", "chunk"], nothing, "--on-long must be one of truncate, error, mean, got 'chunk'"),
    ("serve-truncate-and-on-long-mean", ["serve", "{model}", "--truncate", "--on-long", "mean"], nothing, "--truncate and --on-long mean disagree"),
    ("serve-port-out-of-range", ["serve", "{model}", "--port", "70000"], nothing, "--port must be between 1 and 65535"),
    ("serve-no-inputs-allowed", ["serve", "{model}", "--max-inputs", "0"], nothing, "--max-inputs must be at least 1"),
    ("serve-zero-timeout", ["serve", "{model}", "--timeout", "0"], nothing, "--timeout must be above 0"),
    ("serve-index-not-found", ["serve", "{model}", "--index", "{d}/none"], nothing, "index folder not found"),
    ("serve-index-of-another-setup", ["serve", "{model}", "--index", "{idx}", "--max-length", "16"], nothing, "max_length"),
    ("serve-model-not-found", ["serve", "{d}/none"], nothing, "not found"),
    ("plot-by-source-without-sources", ["plot", "{d}/run", "-o", "{d}/p.png", "--by-source"], write("run/metrics.jsonl", '{"step": 1, "loss": 1.0}\n'),
     "no step of these runs recorded a data source"),
    ("export-not-found", ["export", "{d}/none", "-o", "{d}/out"], nothing, "model folder not found"),
    ("export-output-exists", ["export", "{model}", "-o", "{d}/out"], write("out/x.txt", "x"), "exists already"),
    ("export-overwrite-user-files", ["export", "{model}", "-o", "{d}/out", "--overwrite"], write("out/notes.txt", "mine"), "has no .ullme-files record"),
    ("export-output-inside-model", ["export", "{model}", "-o", "{model}/exported"], nothing, "lies inside the input"),
    ("export-output-is-model", ["export", "{d}/model", "-o", "{d}/model", "--overwrite"], copy_model, "is the input"),
    ("export-training-truncated", ["export", "{d}/model", "-o", "{d}/out"], exported({"training.json": '{"recipe": "x", '}), "training.json: not valid JSON"),
    ("export-training-is-a-list", ["export", "{d}/model", "-o", "{d}/out"], exported({"training.json": "[1, 2]"}), "training.json: expected a JSON object"),
    ("export-output-is-a-file", ["export", "{model}", "-o", "{d}/f"], write("f", "x"), "is a file; expected a folder"),
    ("export-newer-format", ["export", "{d}/model", "-o", "{d}/out"], model_setup(ullme_format=2), "this ullme reads up to 1"),
    # ---------------------------------------------------------------- plot
    ("plot-metrics-without-step", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder(['{"loss": 1.0}', '{"loss": 0.5}']), "metrics.jsonl:1: field 'step' is missing"),
    ("plot-metrics-only-step", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder(['{"step": 1}', '{"step": 2}']), "no metric to plot (only 'step')"),
    ("plot-metrics-not-an-object", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder(['{"step": 1, "loss": 1}', "[1, 2]", '{"step": 2, "loss": 1}']), "metrics.jsonl:2: expected a JSON object"),
    ("plot-metrics-not-utf8", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder(b'{"step": 1, "loss": 1}\n{"step": 2, "note": "\xc3\x28"}\n'), "metrics.jsonl: not valid UTF-8"),
    ("plot-metrics-torn-middle", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder(['{"step": 1, "loss": 1}', '{"step": 2, "lo', '{"step": 3, "loss": 1}']), "metrics.jsonl:2: not valid JSON"),
    ("plot-run-not-found", ["plot", "{d}/none", "-o", "{d}/c.png"], nothing, "not found (a finetune output_dir holds metrics.jsonl)"),
    ("plot-empty-metrics", ["plot", "{d}/run", "-o", "{d}/c.png"], run_folder([]), "holds no steps yet"),
    ("plot-output-is-metrics", ["plot", "{d}/run", "-o", "{d}/run/metrics.jsonl", "--overwrite"], run_folder(['{"step": 1, "loss": 1}']), "is the input"),
    ("plot-output-exists", ["plot", "{d}/run", "-o", "{d}/c.png"], lambda d, s: (run_folder(['{"step": 1, "loss": 1}'])(d, s), write("c.png", "old")(d, s)), "exists already"),
    # ---------------------------------------------------------------- evaluate: judgements, names, outputs
    ("evaluate-qrels-unknown-docs", ["evaluate", "-m", "{model}", "--task-dir", "{d}/t", "--output-dir", "{d}/res"], beir_folder("q1\td9\t1\nq1\td1\t1\n"), "1 of 2 judged document ids are not in corpus.jsonl (first: 'd9')"),
    ("evaluate-qrels-unknown-queries", ["evaluate", "-m", "{model}", "--task-dir", "{d}/t", "--output-dir", "{d}/res"], beir_folder("q7\td1\t1\n"), "1 of 1 judged query ids are not in queries.jsonl"),
    ("evaluate-same-task-dir-twice", ["evaluate", "-m", "{model}", "--task-dir", "{trecqa}", "--task-dir", "{trecqa}", "--output-dir", "{d}/res"], nothing, "given twice"),
    ("evaluate-output-inside-model", ["evaluate", "-m", "{model}", "--task-dir", "{trecqa}", "--output-dir", "{model}/res"], nothing, "lies inside the input"),
    ("evaluate-missing-qrels", ["evaluate", "-m", "{model}", "--task-dir", "{d}/t", "--output-dir", "{d}/res"], lambda d, s: (beir_folder("q1\td1\t1\n")(d, s), (d / "t" / "qrels" / "test.tsv").unlink()), "qrels/test.tsv: missing"),
    # ---------------------------------------------------------------- finetune: the recipe and its outputs
    ("finetune-recipe-inside-output", ["finetune", "{d}/run/recipe.yaml"], lambda d, s: ((d / "run").mkdir(), (d / "run" / "recipe.yaml").write_text(recipe_text(d, s))), "holds the input"),
    ("finetune-output-inside-model", ["finetune", "{d}/recipe.yaml", "--set", "output_dir={model}/run"], recipe(), "lies inside the input"),
    ("finetune-bad-mixed-precision", ["finetune", "{d}/recipe.yaml", "--set", "train.mixed_precision=fp8"], recipe(), "'train.mixed_precision' must be no, bf16 or fp16"),
    ("finetune-yes-is-not-a-bool", ["finetune", "{d}/recipe.yaml", "--set", "lora.enabled=yes"], recipe(), "'lora.enabled': expected bool, got str 'yes'"),
    ("finetune-data-alias-clash", ["finetune", "{d}/recipe.yaml", "--set", "data.train={d}/t.jsonl"], lambda d, s: (recipe()(d, s), write("t.jsonl", '{"query": "q", "question": "r", "positive": "p"}\n')(d, s)), "fields 'query' and 'question'"),
    ("finetune-output-holds-a-source", ["finetune", "{d}/recipe.yaml"], lambda d, s: (write("run/src.jsonl", (s / "train.jsonl").read_text())(d, s),
     (d / "recipe.yaml").write_text(recipe_text(d, s).replace(f"train: {s / 'train.jsonl'}", f"sources: [{d / 'run' / 'src.jsonl'}]"))), "holds the input"),
    # ---------------------------------------------------------------- numbers that are not finite (design.md §11)
    ("finetune-learning-rate-inf", ["finetune", "{d}/recipe.yaml", "--set", "train.learning_rate=.inf"], recipe(), "'train.learning_rate': must be a finite number, got inf"),
    ("finetune-dry-run-learning-rate-nan", ["finetune", "{d}/recipe.yaml", "--dry-run", "--set", "train.learning_rate=.nan"], recipe(), "'train.learning_rate': must be a finite number, got nan"),
    ("finetune-temperature-nan", ["finetune", "{d}/recipe.yaml"], recipe(loss__temperature=float("nan")), "'loss.temperature': must be a finite number, got nan"),
    ("finetune-weight-inf", ["finetune", "{d}/recipe.yaml", "--set", "loss.weights.contrastive=.inf"], recipe(), "'loss.weights.contrastive': must be a finite number"),
    ("finetune-matryoshka-weight-nan", ["finetune", "{d}/recipe.yaml", "--set", "loss.matryoshka_dims=[8, full]", "--set", "loss.matryoshka_weights=[1, .nan]"], recipe(),
     "'loss.matryoshka_weights[1]': must be a finite number"),
    ("finetune-teacher-score-infinity", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": "p", "pos_scores": [Infinity]}', loss__weights={"distill": 1.0}),
     "t.jsonl:1: field 'pos_scores'[0] is inf; teacher scores must be finite"),
    ("finetune-teacher-score-nan", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": "p", "negative": ["n"], "neg_scores": [NaN]}', loss__weights={"distill": 1.0}),
     "t.jsonl:1: field 'neg_scores'[0] is nan"),
    ("finetune-teacher-score-overflow", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": "p", "pos_scores": [1e400]}', loss__weights={"distill": 1.0}),
     "field 'pos_scores'[0] is inf"),
    ("serve-timeout-nan", ["serve", "{model}", "--timeout", "nan"], nothing, "--timeout must be above 0 and at most 86400, got nan"),
    ("serve-timeout-inf", ["serve", "{model}", "--timeout", "inf"], nothing, "--timeout must be above 0 and at most 86400, got inf"),
    ("serve-max-wait-nan", ["serve", "{model}", "--max-wait-ms", "nan"], nothing, "--max-wait-ms must be 0 or more"),
    # ---------------------------------------------------------------- text cut away or duplicated without a word
    ("encode-instruction-fills-max-length", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--kind", "query", "--max-length", "32",
     "--query-instruction", "Given a question about the world and its history " * 6], nothing, "leaving"),
    ("search-instruction-fills-max-length", ["search", "{idx}", "{d}/q.jsonl", "--instruction", "Given a question about the world and its history " * 20],
     write("q.jsonl", '{"id": "q1", "text": "hello"}\n'), "raise --max-length or shorten the instruction"),
    ("finetune-source-smaller-than-batch", ["finetune", "{d}/recipe.yaml"], recipe_over('{"query": "q", "positive": "p"}'), "1 training row(s), fewer than train.batch_size 2"),
    ("search-trec-query-id-with-space", ["search", "{idx}", "{d}/q.jsonl", "--format", "trec", "-o", "{d}/run.trec"], write("q.jsonl", '{"id": "q 1", "text": "hello"}\n'),
     "query id 'q 1' is empty or holds whitespace"),
    # ---------------------------------------------------------------- the rest of the audit's list
    ("encode-lone-surrogate", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "text": "bad \\ud800"}\n'),
     "c.jsonl:2: field 'text' holds a lone surrogate (U+D800 at character 4)"),
    ("encode-empty-output", ["encode", "{corpus}", "-o", "", "-m", "{model}"], nothing, "the output path is empty"),
    ("encode-output-symlink-loop", ["encode", "{corpus}", "-o", "{d}/loop", "-m", "{model}"], symlink_loop, "symbolic links form a loop"),
    ("encode-zero-row-parquet", ["encode", "{d}/c.parquet", "-o", "{d}/e.npy", "-m", "{model}"], empty_parquet, "no texts found"),
    ("finetune-stream-csv", ["finetune", "{d}/recipe.yaml"], streamed_csv, "streaming reads jsonl files only"),
    ("encode-adapter-base-moved", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{d}/adapter"], adapter_on_missing_base,
     "this adapter-only folder's base model"),
    ("finetune-dcp-checkpoint-under-ddp", ["finetune", "{d}/recipe.yaml", "--resume"], lambda d, s: (recipe()(d, s), (d / "run" / "checkpoints" / "step-0000001" / "dcp").mkdir(parents=True)), "written with train.distributed: fsdp"),
]


@pytest.fixture(scope="module")
def shared(artefacts) -> Path:
    return artefacts  # conftest.py: valid artefacts that the cases point at


def _drop_meta_key(path: Path, key: str) -> None:
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, args, prepare, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(shared, tmp_path, name, args, prepare, expected):
    prepare(tmp_path, shared)
    places = {"model": shared / "model", "corpus": shared / "corpus.jsonl", "emb": shared / "emb.npy", "idx": shared / "idx",
              "train": shared / "train.jsonl", "shared": shared, "d": tmp_path, "trecqa": RESOURCES / "trecqa-test"}  # fmt: skip
    before = snapshot(tmp_path, shared)
    result = run_cli(*[a.format(**places) for a in args])
    stderr = result.stderr.decode()
    lines = stderr.strip().splitlines()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("ullme: error: ") and expected in lines[0], lines[0]
    assert snapshot(tmp_path, shared) == before, "a failed command changed or left files"


def test_the_table_covers_every_command_and_at_least_150_cases():
    """The commands come from the Typer app: a new command without rows fails here."""
    from ullme_cli.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {args[0] for _, args, _, _ in CASES}
    assert commands - covered == set(), f"commands without bad-input rows: {sorted(commands - covered)}"
    assert len(CASES) >= 150, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES), "two rows share a name"
