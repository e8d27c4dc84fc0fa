"""Cross-device negatives in a real 2-process run (gloo on CPU): gathered InfoNCE equals the full batch."""

import gc
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ullme_cli.losses import InfoNCELoss

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
    port = 29500 + os.getpid() % 1000
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
