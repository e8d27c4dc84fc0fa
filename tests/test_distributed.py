"""Real multi-process runs on CPU (gloo): gathered InfoNCE equals the full batch, and a 2-process finetune
under `accelerate launch` equals one process with the global batch."""

import gc
from ullme_cli.models.loading import adapter_files
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from conftest import REPO, RESOURCES, run_cli
from safetensors.torch import load_file

from ullme_cli.data import read_training_examples
from ullme_cli.losses import InfoNCELoss

TRAIN = RESOURCES / "trecqa-train" / "train.jsonl"

WORLD, PER_RANK, DIM = 2, 3, 8


def batch():
    g = torch.Generator().manual_seed(0)
    make = lambda n: F.normalize(torch.randn(n, DIM, generator=g), dim=-1)  # noqa: E731
    return make(WORLD * PER_RANK), make(WORLD * PER_RANK), make(WORLD * PER_RANK)


def worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    q, p, n = (x[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_() for x in batch())
    loss = InfoNCELoss(0.05)(q, p, n)
    loss.backward()
    np.save(f"{folder}/loss{rank}.npy", loss.detach().numpy())
    for name, t in (("q", q), ("p", p), ("n", n)):
        np.save(f"{folder}/{name}{rank}.npy", t.grad.numpy())
    # Gloo's worker threads can still hold the autograd all-gather's buffers; tearing down while a peer is
    # mid-collective aborts the process at exit ("terminate called without an active exception", about one
    # run in three). Drop the tensors, wait for the peer, then destroy.
    del q, p, n, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_the_full_batch(tmp_path):
    port = free_port()
    mp.spawn(worker, args=(str(tmp_path), port), nprocs=WORLD, join=True)
    q, p, n = (x.clone().requires_grad_() for x in batch())
    full = InfoNCELoss(0.05, gather=False)(q, p, n)
    full.backward()
    losses = [float(np.load(tmp_path / f"loss{r}.npy")) for r in range(WORLD)]
    assert abs(np.mean(losses) - full.item()) < 1e-5
    # Each rank's loss backpropagates through the gather into every rank's inputs: the sum of the
    # per-rank losses is WORLD times the full-batch mean, so each gradient is WORLD times the full one.
    for name, tensor in (("q", q), ("p", p), ("n", n)):
        grads = np.concatenate([np.load(tmp_path / f"{name}{r}.npy") for r in range(WORLD)])
        np.testing.assert_allclose(grads, WORLD * tensor.grad.numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_process_finetune_equals_one_process_with_the_global_batch(tiny_llama, tmp_path):
    """Two processes under torchrun (accelerate picks up MULTI_CPU with gloo) against one process with twice the batch."""
    # One positive and one negative per row: every draw is forced, so both runs score the same candidates.
    examples, _ = read_training_examples(str(TRAIN))
    rows = [{"query": ex.query, "positive": ex.positives[:1], "negative": ex.negatives[:1]} for ex in examples[:12]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "output_dir": str(tmp_path / name),
            "model": {"name": str(tiny_llama), "max_length": 64},
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(train), "negatives_per_query": 1},
            "loss": {"strategy": "grl"},
            "train": {"steps": 3, "batch_size": batch_size, "warmup_steps": 1, "learning_rate": 1e-3},
        }))  # fmt: skip
        return path

    one = run_cli("finetune", recipe("one", 4), "-q")
    assert one.returncode == 0, one.stderr.decode()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "ullme_cli", "finetune", str(recipe("two", 2)), "-q"]  # fmt: skip
    two = subprocess.run(command, cwd=REPO, capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "contrastive", "dpo", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-4, atol=1e-5, err_msg=key)
    weights_one = load_file(adapter_files(tmp_path / "one" / "model") / "adapter_model.safetensors")
    weights_two = load_file(adapter_files(tmp_path / "two" / "model") / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    """A port nothing listens on now. Ports derived from the test worker's pid collided across the two workers
    (adjacent pids, offsets one apart), and a torchrun then joined another test's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "ullme_cli", *map(str, args)]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, timeout=600)


@pytest.mark.slow
def test_two_process_encode_killed_then_relaunched_equals_one_process(tiny_llama, tmp_path):
    """A real SIGKILL of torchrun and both workers mid-encode; the same command again resumes each rank from
    its own finished chunks, and rank 0 joins files equal to one process's (same ids and order)."""
    import time

    from conftest import demo_texts

    from ullme_cli.artifacts import load_embeddings

    corpus = tmp_path / "big.jsonl"
    # Long enough that both ranks are mid-encode at once: with 6 copies (about 4 s per rank at one thread) a rank
    # that started a few seconds late on the loaded CI machine found the other one finished (seen [0, 0], status 0).
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(demo_texts() * 24)))
    args = ["encode", corpus, "-o", tmp_path / "two.npy", "--model", tiny_llama, "--token-budget", "256"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "ullme_cli", *map(str, args), "-q"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, start_new_session=True)
    parts = tmp_path / "two.npy.parts"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        chunks = [len(list(parts.glob(f"part-0000{r}-of-00002.npy.partial/chunk-*.npy"))) for r in (0, 1)]
        if min(chunks) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, (f"the encode ended (status {process.returncode}) before it could be killed; seen {chunks}, "
                                    f"{sorted(p.name for p in tmp_path.rglob('*'))[:20]}: " + process.stderr.read().decode()[-2000:])  # fmt: skip
    kill_process_tree(process)
    assert not (tmp_path / "two.npy").exists()
    again = torchrun(*args)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert again.stderr.count(b"chunks already encoded") == 2, again.stderr.decode()[-3000:]  # both ranks resumed
    assert run_cli("encode", corpus, "-o", tmp_path / "one.npy", "--model", tiny_llama, "--token-budget", "256", "-q").returncode == 0
    a, a_ids, a_meta = load_embeddings(str(tmp_path / "one.npy"))
    b, b_ids, b_meta = load_embeddings(str(tmp_path / "two.npy"))
    assert a_ids == b_ids and not parts.exists()
    assert (a * b).sum(1).min() > 0.99999
    assert a_meta["processes"] == 1 and b_meta["processes"] == 2 and "shard" not in b_meta
    assert b_meta["corpus_fingerprint"] == a_meta["corpus_fingerprint"] and b_meta["fingerprint"] == a_meta["fingerprint"]


def test_a_finished_part_is_reused_only_for_the_same_job(tiny_llama, tmp_path):
    """What a relaunched multi-process encode checks before it takes a part as done: the instruction given
    on the command line counts, as do the setup, the model files and the corpus."""
    from conftest import DEMO_CORPUS

    from ullme_cli.encoding import EncodeOptions, _finished_part
    from ullme_cli.model_setup import Runtime
    from ullme_cli.model_setup import resolve_setup

    part = tmp_path / "e.npy.parts" / "part-00000-of-00002.npy"
    assert run_cli("encode", DEMO_CORPUS, "-o", part, "--model", tiny_llama, "--shard", "0/2", "-q").returncode == 0
    setup = resolve_setup(str(tiny_llama))
    assert _finished_part(part, str(DEMO_CORPUS), setup, Runtime(), EncodeOptions(), "0/2")
    assert not _finished_part(part, str(DEMO_CORPUS), setup, Runtime(), EncodeOptions(instruction="Represent this passage"), "0/2")
    assert not _finished_part(part, str(DEMO_CORPUS), setup.replace(pooling="cls"), Runtime(), EncodeOptions(), "0/2")
    assert not _finished_part(part, str(DEMO_CORPUS), setup, Runtime(), EncodeOptions(), "1/2")


def forced_rows(tmp_path) -> Path:
    """One positive and one negative per row: every draw is forced, so runs of any process count score the same."""
    examples, _ = read_training_examples(str(TRAIN))
    rows = [{"query": ex.query, "positive": ex.positives[:1], "negative": ex.negatives[:1]} for ex in examples[:16]]
    train = tmp_path / "forced.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train


def fsdp_recipe(tmp_path, tiny, name: str, batch_size: int, distributed: str, lora: bool = True, **train) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / name),
        "model": {"name": str(tiny), "max_length": 64},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(forced_rows(tmp_path)), "negatives_per_query": 1},
        "loss": {"strategy": "grl", **({} if lora else {"reference_free": True})},
        "train": {"steps": 3, "batch_size": batch_size, "warmup_steps": 1, "learning_rate": 1e-3, "distributed": distributed, **train},
    }))  # fmt: skip
    return path


def final_weights(run: Path, lora: bool) -> dict:
    return load_file(adapter_files(run / "model") / "adapter_model.safetensors") if lora else load_file(run / "model" / "model.safetensors")


def assert_same_training(a: Path, b: Path, lora: bool = True) -> None:
    """Losses step by step and the final weights of two runs, to float tolerance."""
    ra = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for key in ("loss", "contrastive", "dpo", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rb], [r[key] for r in ra], rtol=1e-4, atol=1e-5, err_msg=key)
    wa, wb = final_weights(a, lora), final_weights(b, lora)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_with_the_global_batch(tiny_llama, tmp_path, lora=True):
    """fully_shard on 2 CPU processes (gloo) against one unsharded process with twice the batch, with LoRA,
    gradient checkpointing and GradCache.
    Full fine-tuning is compared the same way in the kill-and-resume test below."""
    one = run_cli("finetune", fsdp_recipe(tmp_path, tiny_llama, "one", 4, "ddp", lora), "-q")
    assert one.returncode == 0, one.stderr.decode()
    # The sharded side also recomputes activations and runs GradCache: both are exact, so nothing changes.
    sharded = fsdp_recipe(tmp_path, tiny_llama, "two", 2, "fsdp", lora, gradient_checkpointing=True, grad_cache_chunk=2)
    two = torchrun("finetune", sharded, "-q")
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step-0000003" / "dcp" / ".metadata").is_file()
    assert_same_training(tmp_path / "one", tmp_path / "two", lora)


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torch elastic starts them in sessions of their own), and wait until
    all are gone, so that their output lock is released."""
    import psutil  # accelerate's dependency

    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        member.kill()
    psutil.wait_procs(family, timeout=60)
    process.wait()
    if process.stderr:
        process.stderr.close()


@pytest.mark.slow
def test_fsdp_kill_then_resume_is_exact_on_two_processes_and_on_one(tiny_llama, tmp_path):
    """Full fine-tuning: 2 FSDP processes, SIGKILL after a checkpoint, then --resume on 2 processes and (from a
    copy) on 1 process with the same global batch: both equal one unsharded, uninterrupted process."""
    import shutil
    import time

    steps = {"steps": 40, "checkpoint_every": 5, "learning_rate": 1e-4}
    killed = fsdp_recipe(tmp_path, tiny_llama, "killed", 2, "fsdp", lora=False, **steps)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "ullme_cli", "finetune", str(killed), "-q"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-0000010").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "training finished (or failed) before it could be killed: " + process.stderr.read().decode()[-2000:]
    kill_process_tree(process)
    # The same killed run, resumed on 1 process with the same global batch (DCP reshards the checkpoint).
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-one")
    on_one = fsdp_recipe(tmp_path, tiny_llama, "killed-one", 4, "fsdp", lora=False, **steps)
    resumed_two = torchrun("finetune", killed, "--resume")
    assert resumed_two.returncode == 0, resumed_two.stderr.decode()[-3000:]
    assert b"resuming from" in resumed_two.stderr
    resumed_one = run_cli("finetune", on_one, "--resume", "-q")
    assert resumed_one.returncode == 0, resumed_one.stderr.decode()
    reference = run_cli("finetune", fsdp_recipe(tmp_path, tiny_llama, "reference", 4, "ddp", lora=False, **steps), "-q")
    assert reference.returncode == 0, reference.stderr.decode()
    assert_same_training(tmp_path / "reference", tmp_path / "killed", lora=False)
    assert_same_training(tmp_path / "reference", tmp_path / "killed-one", lora=False)


def test_accelerate_fsdp_config_maps_onto_the_recipe_options():
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml`: the config loads, and its FSDP plugin's
    options become the recipe's (the launch itself needs GPUs: not run here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ullme_cli.recipes import TrainSection
    from ullme_cli.training.sharding import options_from_accelerate

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / "fsdp.yaml"))
    assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False, cpu_offload=True, activation_checkpointing=True)
    train = options_from_accelerate(plugin, TrainSection())
    assert (train.distributed, train.fsdp_reshard_after_forward, train.fsdp_cpu_offload, train.gradient_checkpointing) == ("fsdp", False, True, True)
    default = options_from_accelerate(FullyShardedDataParallelPlugin(fsdp_version=2), TrainSection())
    assert (default.fsdp_reshard_after_forward, default.fsdp_cpu_offload, default.gradient_checkpointing) == (True, False, False)


def test_fsdp_resume_past_a_broken_checkpoint_writes_that_step_again(tiny_llama, tmp_path):
    """One FSDP process: a torn DCP checkpoint is skipped, and the resumed run's save of that same step
    replaces it (the sharded save renames into place as atomic_folder does) and ends where the first run did."""
    import shutil

    recipe = fsdp_recipe(tmp_path, tiny_llama, "run", 4, "fsdp", steps=4, checkpoint_every=2, keep_checkpoints=5)
    assert run_cli("finetune", recipe, "-q").returncode == 0
    finished = final_weights(tmp_path / "run", lora=True)
    (tmp_path / "run" / "checkpoints" / "step-0000004" / "dcp" / ".metadata").write_bytes(b"torn")
    shutil.rmtree(tmp_path / "run" / "model")
    resumed = run_cli("finetune", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"skipping a broken checkpoint" in resumed.stderr and b"(step 2)" in resumed.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "dcp" / ".metadata").read_bytes() != b"torn"
    again = final_weights(tmp_path / "run", lora=True)
    for name, tensor in finished.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6)
