"""`ullme encode` and `ullme join` through the real entry point, on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DEMO_CORPUS, demo_texts, run_cli

from ullme_cli.artifacts import load_embeddings
from ullme_cli.models.embedder import Embedder


def encode(tiny, corpus, out, *extra):
    return run_cli("encode", corpus, "-o", out, "--model", tiny, "--dtype", "float32", "-q", *extra)


def test_encode_writes_matrix_ids_and_meta_matching_python(tiny_llama, tmp_path):
    out = tmp_path / "emb.npy"
    result = encode(tiny_llama, DEMO_CORPUS, out)
    assert result.returncode == 0, result.stderr.decode()
    matrix, ids, meta = load_embeddings(str(out))
    assert matrix.shape == (len(ids), 32) and matrix.dtype == np.float32
    assert ids[:2] == ["d0", "d1"]
    assert meta["count"] == len(ids) and meta["pooling"] == "mean" and meta["attention"] == "bidirectional"
    expected = Embedder.load(str(tiny_llama), dtype="float32").encode(demo_texts())
    cosine = (matrix * expected).sum(1)
    assert cosine.min() >= 0.9999
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*tmp"))


def test_table_formats_give_the_vectors_of_jsonl(tiny_llama, tmp_path):
    """A parquet file and an `hf:` dataset folder are read by `datasets`; same ids and vectors as the jsonl.
    Also: with -q a run that goes well prints nothing at all on stderr."""
    from datasets import Dataset

    rows = [json.loads(line) for line in DEMO_CORPUS.read_text().splitlines()][:12]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "hub").mkdir()
    Dataset.from_list([{"_id": r["id"], "text": r["text"]} for r in rows]).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    expected = Embedder.load(str(tiny_llama), dtype="float32").encode([r["text"] for r in rows])
    for name, source in (("parquet", tmp_path / "c.parquet"), ("hf", f"hf:{tmp_path / 'hub'}")):
        result = encode(tiny_llama, source, tmp_path / f"{name}.npy")
        assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
        matrix, ids, _ = load_embeddings(str(tmp_path / f"{name}.npy"))
        assert ids == [r["id"] for r in rows]
        np.testing.assert_allclose(matrix, expected, atol=1e-5)


def test_stdin_text_and_stdout_npz_stream(tiny_llama, tmp_path):
    result = run_cli("encode", "-", "-o", "-", "--model", tiny_llama, "-q", input=b"first text\nsecond text\n")
    assert result.returncode == 0, result.stderr.decode()
    stream = tmp_path / "s.npz"
    stream.write_bytes(result.stdout)
    matrix, ids, meta = load_embeddings(str(stream))
    assert ids == ["1", "2"] and matrix.shape == (2, 32) and meta["count"] == 2


def test_out_dtypes_and_matryoshka_truncation(tiny_llama, tmp_path):
    assert encode(tiny_llama, DEMO_CORPUS, tmp_path / "f.npy").returncode == 0
    full, _, _ = load_embeddings(str(tmp_path / "f.npy"))
    for out_dtype, dtype in [("float16", np.float16), ("int8", np.int8), ("binary", np.uint8)]:
        assert encode(tiny_llama, DEMO_CORPUS, tmp_path / f"{out_dtype}.npy", "--out-dtype", out_dtype).returncode == 0
        matrix, _, meta = load_embeddings(str(tmp_path / f"{out_dtype}.npy"))
        assert matrix.dtype == dtype and meta["dtype"] == out_dtype
    int8, _, _ = load_embeddings(str(tmp_path / "int8.npy"))
    restored = int8.astype(np.float32) / 127
    cos = (restored * full).sum(1) / np.linalg.norm(restored, axis=1)
    assert cos.min() > 0.99
    binary, _, _ = load_embeddings(str(tmp_path / "binary.npy"))
    assert binary.shape[1] == 32 // 8
    assert encode(tiny_llama, DEMO_CORPUS, tmp_path / "t.npy", "--truncate-dim", "16").returncode == 0
    short, _, meta = load_embeddings(str(tmp_path / "t.npy"))
    assert short.shape[1] == 16 and meta["dim"] == 16
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)


def test_shards_joined_equal_one_run(tiny_llama, tmp_path):
    assert encode(tiny_llama, DEMO_CORPUS, tmp_path / "all.npy").returncode == 0
    for i in range(3):
        assert encode(tiny_llama, DEMO_CORPUS, tmp_path / f"s{i}.npy", "--shard", f"{i}/3").returncode == 0
    joined = run_cli("join", tmp_path / "s2.npy", tmp_path / "s0.npy", tmp_path / "s1.npy", "-o", tmp_path / "joined.npy")
    assert joined.returncode == 0, joined.stderr.decode()
    one, one_ids, _ = load_embeddings(str(tmp_path / "all.npy"))
    both, both_ids, meta = load_embeddings(str(tmp_path / "joined.npy"))
    assert both_ids == one_ids and "shard" not in meta
    np.testing.assert_allclose(both, one, atol=1e-5)
    missing = run_cli("join", tmp_path / "s0.npy", tmp_path / "s2.npy", "-o", tmp_path / "bad.npy")
    assert missing.returncode == 2 and b"missing [1]" in missing.stderr


def one_line_error(result) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, result.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("ullme: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "c.jsonl: no texts found (empty corpus)"),
        (b'{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "c.jsonl:2: malformed JSON"),
        (b'{"id": "a", "title": "only a title"}\n', "c.jsonl:1: field 'text' is missing or empty"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "c.jsonl:2: duplicate id 'a'"),
        (b'{"id": "a", "text": "\xc3\x28"}\n', "c.jsonl:1: not valid UTF-8"),
    ],
)
def test_bad_corpus_gets_one_line_error_and_exit_2(tiny_llama, tmp_path, content, expected):
    (tmp_path / "c.jsonl").write_bytes(content)
    line = one_line_error(encode(tiny_llama, tmp_path / "c.jsonl", tmp_path / "e.npy"))
    assert expected in line
    assert not (tmp_path / "e.npy").exists()


def test_other_bad_inputs_get_one_line_errors(tiny_llama, tmp_path):
    assert "nope.jsonl: file not found" in one_line_error(encode(tiny_llama, tmp_path / "nope.jsonl", tmp_path / "e.npy"))
    assert "unknown pooling 'max'" in one_line_error(encode(tiny_llama, DEMO_CORPUS, tmp_path / "e.npy", "--pooling", "max"))
    assert "--shard 3/3 is out of range" in one_line_error(encode(tiny_llama, DEMO_CORPUS, tmp_path / "e.npy", "--shard", "3/3"))
    assert "--shard must look like i/N" in one_line_error(encode(tiny_llama, DEMO_CORPUS, tmp_path / "e.npy", "--shard", "x"))
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text("{}")
    assert "model folder has no weights" in one_line_error(encode(empty_model, DEMO_CORPUS, tmp_path / "e.npy"))
    assert not (tmp_path / "e.npy").exists()


def test_sigkill_midway_then_resume_equals_uninterrupted_run(tiny_llama, tmp_path):
    texts = demo_texts() * 8  # ~4.5k texts with a small token budget: many chunks, several seconds of work
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    args = ["encode", corpus, "-o", tmp_path / "emb.npy", "--model", tiny_llama, "--dtype", "float32", "-q", "--token-budget", "256"]
    process = subprocess.Popen([sys.executable, "-m", "ullme_cli", *map(str, args)], stderr=subprocess.PIPE)
    partial = tmp_path / "emb.npy.partial"
    deadline = time.time() + 300
    while len(list(partial.glob("chunk-*.npy"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the encode finished before it could be killed; make the corpus larger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "emb.npy").exists()
    done_before = len(list(partial.glob("chunk-*.npy")))
    resumed = run_cli(*[a for a in args if a != "-q"])  # the resume is an info line, which -q hides
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"{done_before} of" in resumed.stderr.decode()
    assert not partial.exists()
    fresh = run_cli(*args[:3], tmp_path / "fresh.npy", *args[4:])
    assert fresh.returncode == 0
    a, a_ids, _ = load_embeddings(str(tmp_path / "emb.npy"))
    b, b_ids, _ = load_embeddings(str(tmp_path / "fresh.npy"))
    assert a_ids == b_ids
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("command", [[], ["encode"], ["finetune"], ["search"], ["evaluate"]])
def test_help_imports_no_heavy_library(command):
    """`ullme --help` answers fast because torch, transformers, faiss and mteb load only when a command runs, and
    the help is plain text: rich's help imports markdown_it, about 130 ms (docs/benchmarks.md, CLI start)."""
    probe = (
        "import sys\nfrom ullme_cli.cli import app\n"
        f"try:\n    app({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'faiss', 'mteb', 'datasets', 'peft', 'accelerate', 'markdown_it', 'numpy')\n"
        "print([m for m in heavy if m in sys.modules], file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "Usage" in result.stdout and result.stderr.strip().endswith("[]"), result.stderr


def test_verbose_shows_debug_lines_and_every_command_takes_quiet_and_verbose(tiny_llama, tmp_path):
    import typer

    from ullme_cli.cli import app

    (tmp_path / "c.txt").write_text("one text\nanother text\n")
    verbose = run_cli("encode", tmp_path / "c.txt", "-o", tmp_path / "v.npy", "--model", tiny_llama, "--dtype", "float32", "-v")
    assert verbose.returncode == 0 and b"loading " in verbose.stderr and b"wrote 2 x 32 float32 embeddings" in verbose.stderr
    commands = typer.main.get_command(app).commands
    assert len(commands) >= 9
    for name, command in commands.items():
        options = {o for p in command.params for o in p.opts}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, name


@pytest.mark.slow
def test_compile_gives_the_eager_vectors_and_falls_back_without_a_compiler(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:40]))
    assert encode(tiny_llama, corpus, tmp_path / "eager.npy", "--token-budget", "256").returncode == 0
    eager = load_embeddings(str(tmp_path / "eager.npy"))
    compiled = encode(tiny_llama, corpus, tmp_path / "compiled.npy", "--token-budget", "256", "--compile")
    assert compiled.returncode == 0, compiled.stderr.decode()[-2000:]
    matrix, ids, meta = load_embeddings(str(tmp_path / "compiled.npy"))
    assert ids == eager[1] and meta["fingerprint"] == eager[2]["fingerprint"]  # the same setup record
    np.testing.assert_allclose(matrix, eager[0], atol=1e-5)
    # Without a working C++ compiler inductor cannot build its kernels: a warning, then the eager vectors.
    # A new interpreter and an empty inductor cache, so that the compiler is looked up and nothing is reused.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    broken = subprocess.run([sys.executable, "-m", "ullme_cli", "encode", corpus, "-o", tmp_path / "fallback.npy", "--model", tiny_llama,
                             "--dtype", "float32", "--token-budget", "256", "--compile"], capture_output=True, env=env, timeout=600)  # fmt: skip
    assert broken.returncode == 0, broken.stderr.decode()[-2000:]
    assert b"torch.compile failed" in broken.stderr and b"encoding without it" in broken.stderr
    np.testing.assert_allclose(load_embeddings(str(tmp_path / "fallback.npy"))[0], eager[0], atol=1e-5)


def test_on_long_error_passes_a_corpus_within_max_length_unchanged_and_refuses_one_text_over(tiny_llama, tmp_path):
    """`--on-long error` changes no vector: a corpus within max_length gives the default's bytes; one text
    over it refuses the job before anything is written (tests/test_bad_inputs.py has the message)."""
    texts = demo_texts(20)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    assert encode(tiny_llama, corpus, tmp_path / "a.npy").returncode == 0
    assert encode(tiny_llama, corpus, tmp_path / "b.npy", "--on-long", "error").returncode == 0
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    corpus.write_text(corpus.read_text() + json.dumps({"id": "long", "text": "word " * 600}) + "\n")
    refused = encode(tiny_llama, corpus, tmp_path / "c.npy", "--on-long", "error")
    assert refused.returncode == 2 and b"text 'long' is longer than max_length" in refused.stderr
    assert not (tmp_path / "c.npy").exists()
