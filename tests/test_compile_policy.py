"""The automatic torch.compile decision (docs/design.md §7): where it may compile, when a job is long enough, the
compile time it remembers, and an encode that switches to the compiled function mid-job with the same vectors."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from ullme_cli.models import compile_policy
from ullme_cli.models.compile_policy import CompilePolicy, CompileTimes, ineligible, shape_key


def test_only_a_cpu_computing_in_fast_bf16_is_eligible():
    assert ineligible("cpu", "bfloat16", fast_bf16=True) is None
    assert "no gain" in ineligible("cpu", "float32", fast_bf16=True)
    assert "no fast bf16" in ineligible("cpu", "bfloat16", fast_bf16=False)
    assert "not measured on cuda" in ineligible("cuda", "bfloat16", fast_bf16=True)


def test_it_compiles_when_compiling_is_under_a_tenth_of_the_eager_time_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ullme_cli")
    times = CompileTimes(tmp_path)
    policy = CompilePolicy(None, "k", layers=30, times=times)
    policy.plan(1_000_000)
    assert policy.observe(10_000, 1.0) is False and not policy.decided, "under MIN_EAGER_SECONDS: keep measuring"
    # 20,000 tokens took 2 s: 980,000 left is about 98 s; a cold compile of 30 layers (60 s) is not under 9.8 s.
    assert policy.observe(10_000, 1.0) is False and policy.decided
    assert "compile: off (about 98 s of eager encoding left; compiling takes about 60 s (a cold estimate for 30 layers)" in caplog.text
    times.put("k", 5.0)  # a warm cache: the last compile of this shape took 5 s
    again = CompilePolicy(None, "k", layers=30, times=times)
    again.plan(1_000_000)
    assert again.observe(20_000, 2.0) is True and again.observe(20_000, 2.0) is False, "decided once"
    assert "its last compile of this model shape here" in caplog.text
    short = CompilePolicy(None, "k", layers=30, times=times)
    short.plan(100_000)  # about 8 s left: 5 s of compiling is not under 0.8 s
    assert short.observe(20_000, 2.0) is False
    never = CompilePolicy("fp32 here", "k", layers=30, times=times)
    never.plan(10**9)
    assert never.observe(20_000, 2.0) is False and "compile: off (fp32 here)" in caplog.text


def test_compile_times_survive_a_broken_file_and_key_by_shape_not_weights(tmp_path):
    (tmp_path / "ullme-compile-times.json").write_text("{not json")
    times = CompileTimes(tmp_path)
    assert times.get("k") is None
    times.put("k", 12.34)
    assert CompileTimes(tmp_path).get("k") == 12.3
    from transformers import LlamaConfig

    a = types.SimpleNamespace(config=LlamaConfig(hidden_size=32, num_hidden_layers=2, _name_or_path="/one"))
    b = types.SimpleNamespace(config=LlamaConfig(hidden_size=32, num_hidden_layers=2, _name_or_path="/other"))
    c = types.SimpleNamespace(config=LlamaConfig(hidden_size=64, num_hidden_layers=2))
    assert shape_key(a, "bfloat16") == shape_key(b, "bfloat16") != shape_key(c, "bfloat16") and shape_key(a, "float32") != shape_key(a, "bfloat16")


def test_a_long_enough_job_switches_to_the_compiled_function_and_records_its_time(tiny_llama, tmp_path, monkeypatch, caplog):
    """The switch itself, with torch.compile replaced by a recording stand-in (that compiling gives the
    eager vectors is tests/test_cli_encode.py's slow compile test)."""
    import torch
    from conftest import demo_texts

    from ullme_cli.models.embedder import Embedder

    caplog.set_level(logging.INFO, logger="ullme_cli")
    monkeypatch.setattr(compile_policy, "MIN_EAGER_SECONDS", 0.0)  # decide on the first batch
    compiled_calls = []

    def stand_in(fn, dynamic):
        assert dynamic is True
        return lambda batch: compiled_calls.append(len(batch.input_ids)) or fn(batch)

    monkeypatch.setattr(torch, "compile", stand_in)
    texts = demo_texts(48)
    eager = Embedder.load(str(tiny_llama), dtype="float32", device="cpu", compile=False).encode(texts, token_budget=256)
    embedder = Embedder.load(str(tiny_llama), dtype="float32", device="cpu")
    assert embedder.compile_policy is not None and embedder.compiled_embed is None
    assert embedder.compile_policy.reason_not is not None, "fp32: never compiled by the policy"
    times = CompileTimes(tmp_path)
    times.put(embedder.compile_policy.key, 0.0)  # as if compiled before: eligible jobs of any length compile
    embedder.compile_policy = CompilePolicy(None, embedder.compile_policy.key, 2, times)  # made eligible for the test
    recorded = []
    monkeypatch.setattr(times, "put", lambda key, seconds: recorded.append((key, seconds)))
    vectors = embedder.encode(texts, token_budget=256)
    assert "compile: on" in caplog.text and embedder.compiled_embed is not None
    assert 0 < sum(compiled_calls) < len(texts), "the first batch ran eagerly, the rest compiled"
    np.testing.assert_allclose(vectors, eager, atol=1e-6)
    assert len(recorded) == 1 and recorded[0][0] == embedder.compile_policy.key and recorded[0][1] > 0, "the first compiled batch's time, once"
    short = Embedder.load(str(tiny_llama), dtype="float32", device="cpu", compile=False)
    assert short.compile_policy is None, "--no-compile: no policy"


@pytest.mark.slow
def test_a_compile_traces_the_model_once_and_one_layer_for_all(tmp_path, monkeypatch):
    """Two properties that set the compile's one-time cost (docs/benchmarks.md): the model is traced once
    (floats stay constants, so Dynamo does not specialize them and trace everything again), and a deeper
    model traces no more ops (each decoder layer is a nested compile region, stamped out after the first).
    Both keep the eager vectors, gemma2's two kinds of layer included."""
    import torch
    from conftest import demo_texts
    from tiny_models import save_tiny
    from torch._dynamo.utils import counters

    from ullme_cli.models.embedder import Embedder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    texts = demo_texts(12)
    traced = {}
    for family, layers in (("llama", 2), ("llama", 4), ("gemma2", 2)):  # gemma2: a sliding and a global layer
        folder = save_tiny(tmp_path / f"{family}-{layers}", family, texts=texts, num_hidden_layers=layers)
        eager = Embedder.load(str(folder), dtype="float32", compile=False).encode(texts)
        torch._dynamo.reset()
        counters.clear()
        compiled = Embedder.load(str(folder), dtype="float32", compile=True).encode(texts)
        np.testing.assert_allclose(compiled, eager, atol=1e-5)
        assert counters["aot_autograd"]["total"] == 1, f"{family}: traced {counters['aot_autograd']['total']} times"
        traced[family, layers] = counters["stats"]["calls_captured"]
    assert traced["llama", 4] - traced["llama", 2] <= 8, traced  # a call per added layer, not its ~65 ops again
