"""benchmarks/gpu.py is prepared for a GPU that CI never has: its every code path runs here at a tiny shape
on CPU (this measures nothing; the table in docs/benchmarks.md comes from a GPU run)."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_at_a_tiny_shape_on_cpu():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--shapes", "tiny", "--device", "cpu", "--texts", "48", "--batch", "2",
                             "--max-seconds", "300"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "encode ullme:" in out and "sentence-transformers float32 (batch 128)" in out, out
    for row in ("LoRA contrastive step, batch 2:", "LoRA contrastive step, batch 2, gradient checkpointing:", "LoRA grl step, batch 2:",
                "LoRA grl step, batch 2, gradient checkpointing:", "LoRA contrastive step, batch 2, padding-free:",
                "LoRA grl step, batch 2, padding-free:", "encode ullme, padding-free:"):  # fmt: skip
        assert row in out, out


@pytest.mark.slow
def test_train_step_benchmark_times_the_chosen_steps_padding_free_by_default():
    command = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--model", "small-random", "--steps", "1", "--batch", "4", "--configs", "contrastive", "grl"]
    runs = {}
    for extra in ([], ["--no-packing"]):
        result = subprocess.run(command + extra, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split() and line.split()[0] in ("contrastive", "dpo", "grl")}
        assert set(rows) == {"contrastive", "grl"}, result.stdout
        assert ("padding-free batches" if not extra else "padded batches") in result.stdout
        runs[bool(extra)] = {name: float(row[4]) for name, row in rows.items()}  # GFLOP
    assert runs[False]["contrastive"] < runs[True]["contrastive"], "packed rows run fewer FLOPs than padded ones"


def test_attention_route_benchmark_prints_both_routes_per_length():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_route.py"), "--lengths", "16", "32", "--tokens", "64", "--repeats", "1",
                             "--dtype", "float32"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["16", "32"] and all(len(row) == 7 and row[-1].endswith("x") for row in rows), result.stdout
