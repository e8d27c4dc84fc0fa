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
from conftest import DEMO_CORPUS, RESOURCES, demo_texts, run_cli
from tiny_models import save_tiny

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
        "model": {"name": str(shared / "model"), "max_length": 32},
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


def shard_of_other_corpus(d: Path, shared: Path) -> None:
    other = d / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": t.upper()}) + "\n" for i, t in enumerate(demo_texts(40))))
    for name in ("s0.npy", "s0.ids.jsonl", "s0.meta.json"):
        shutil.copy(shared / name, d / name)
    result = run_cli("encode", other, "-o", d / "s1.npy", "--model", shared / "model", "--shard", "1/2", "-q")
    assert result.returncode == 0, result.stderr.decode()


def nothing(d: Path, shared: Path) -> None:
    pass


EMB = "{emb}"
CORPUS_LINE = '{"id": "a", "text": "x"}\n'
CASES = [
    # ---------------------------------------------------------------- encode: the corpus
    ("encode-missing-input", ["encode", "{d}/nope.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], nothing, "nope.jsonl: file not found"),
    ("encode-input-is-folder", ["encode", "{d}/plain", "-o", "{d}/e.npy", "-m", "{model}"], write("plain/x.txt", "x"), "is a folder, but not a `datasets` save_to_disk folder"),
    ("encode-empty-corpus", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", ""), "no texts found"),
    ("encode-malformed-json", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", CORPUS_LINE + '{"id": "b", "text": \n'), "c.jsonl:2: malformed JSON"),
    ("encode-no-text-field", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", '{"id": "a", "title": "t"}\n'), "c.jsonl:1: field 'text' is missing"),
    ("encode-duplicate-id", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", CORPUS_LINE * 2), "c.jsonl:2: duplicate id 'a'"),
    ("encode-not-utf8", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", b'{"id": "a", "text": "\xc3\x28"}\n'), "c.jsonl:1: not valid UTF-8"),
    ("encode-tsv-extra-columns", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "a\tb\tc\td\n"), "c.tsv:1: 4 tab-separated columns"),
    ("encode-tsv-no-text", ["encode", "{d}/c.tsv", "-o", "{d}/e.npy", "-m", "{model}"], write("c.tsv", "a\tok\nb\t \n"), "c.tsv:2: field 'text'"),
    ("encode-json-not-object", ["encode", "{d}/c.jsonl", "-o", "{d}/e.npy", "-m", "{model}"], write("c.jsonl", "[1, 2]\n"), "c.jsonl:1: expected a JSON object"),
    # ---------------------------------------------------------------- encode: the output
    ("encode-output-is-input", ["encode", "{d}/c.jsonl", "-o", "{d}/c.jsonl", "-m", "{model}"], write("c.jsonl", CORPUS_LINE), "is the input"),
    ("encode-output-is-folder", ["encode", "{corpus}", "-o", "{d}/out", "-m", "{model}"], write("out/keep.txt", "mine"), "is a folder; expected a file"),
    ("encode-output-under-a-file", ["encode", "{corpus}", "-o", "{d}/f/e.npy", "-m", "{model}"], write("f", "a file"), "is a file, not a folder"),
    ("encode-output-unwritable", ["encode", "{corpus}", "-o", "/proc/ullme-test/e.npy", "-m", "{model}"], nothing, "/proc/ullme-test"),
    ("encode-output-exists", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}"], write("e.npy", "old"), "exists already; pass --overwrite"),
    ("encode-sidecar-exists", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}"], write("e.meta.json", "{}"), "e.meta.json: exists already"),
    # ---------------------------------------------------------------- encode: options
    ("encode-token-budget-0", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "0"], nothing, "--token-budget must be at least 1"),
    ("encode-token-budget-negative", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "-5"], nothing, "--token-budget must be at least 1"),
    ("encode-token-budget-not-a-number", ["encode", "{corpus}", "-o", "{d}/e.npy", "-m", "{model}", "--token-budget", "many"], nothing, "'--token-budget'"),
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
    ("index-ids-longer", ["index", "{d}/e.npy", "-o", "{d}/i"], longer_ids, "ids for"),
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
    ("search-index-not-found", ["search", "{d}/none", "{corpus}"], nothing, "index folder not found"),
    ("search-queries-from-other-setup", ["search", "{idx}", "--embeddings", "{d}/e.npy"], embeddings(np.eye(2, 32), pooling="cls", kind="query"), "'pooling' is 'cls' here but 'mean' there"),
    # ---------------------------------------------------------------- mine
    ("mine-binary-corpus-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{d}/e.npy"], write("e.npy", b"\x93NUMPY garbage" * 5), "not a readable .npy file"),
    ("mine-truncated-corpus-embeddings", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--corpus-embeddings", "{d}/e.npy"],
     lambda d, s: [shutil.copy(s / n, d / n.replace("emb", "e")) for n in ("emb.ids.jsonl", "emb.meta.json")] and (d / "e.npy").write_bytes((s / "emb.npy").read_bytes()[:300]), "not a readable .npy file"),
    ("mine-output-is-training-file", ["mine", "{d}/t.jsonl", "--corpus", "{corpus}", "-o", "{d}/t.jsonl", "-m", "{model}", "--overwrite"], write("t.jsonl", '{"query": "q", "positive": "p"}\n'), "is the input"),
    ("mine-output-exists", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}"], write("m.jsonl", "old"), "exists already"),
    ("mine-range-malformed", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--range", "ten"], nothing, "--range must look like A:B"),
    ("mine-range-empty", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--range", "5:5"], nothing, "--range 5:5: need 0 <= A < B"),
    ("mine-negative-margin", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--margin", "-0.1"], nothing, "--margin must be a number of at least 0"),
    ("mine-device-bogus", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--device", "bogus"], nothing, "--device 'bogus': not a device"),
    ("mine-attention-bogus", ["mine", "{train}", "--corpus", "{corpus}", "-o", "{d}/m.jsonl", "-m", "{model}", "--attention", "sideways"], nothing, "attention"),
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
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Valid artefacts that the cases point at: a tiny model, a corpus, embeddings, an index, training rows."""
    root = tmp_path_factory.mktemp("shared")
    save_tiny(root / "model", "llama", demo_texts())
    texts = demo_texts(40)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    (root / "train.jsonl").write_text("".join(json.dumps({"query": texts[i], "positive": texts[i + 1]}) + "\n" for i in range(0, 10, 2)))
    for args in (["encode", root / "corpus.jsonl", "-o", root / "emb.npy"], ["encode", root / "corpus.jsonl", "-o", root / "s0.npy", "--shard", "0/2"]):
        result = run_cli(*args, "--model", root / "model", "-q")
        assert result.returncode == 0, result.stderr.decode()
    assert run_cli("index", root / "emb.npy", "-o", root / "idx").returncode == 0
    return root


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


def test_the_table_covers_every_command_and_at_least_60_cases():
    commands = {args[0] for _, args, _, _ in CASES}
    assert len(CASES) >= 60 and commands == {"encode", "join", "index", "search", "mine", "evaluate", "finetune"}
