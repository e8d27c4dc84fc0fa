from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MatryoshkaLoss(nn.Module):
    """Matryoshka representation learning (Kusupati et al., 2022; sentence-transformers' MatryoshkaLoss):
    the same loss on the first d dimensions of every vector, renormalised, for each trained d.

        L = Σ_d w_d · L_inner(trunc_d(q), trunc_d(p), trunc_d(n))     trunc_d(v) = v[:d] / ‖v[:d]‖

    `dims` lists the sizes (None: the full vector); `weights` default to 1 each, as sentence-transformers'.
    Inputs: `inner`, a function of the embedding tensors (each (..., D)) returning a scalar, and those
    tensors. Returns a scalar.
    """

    def __init__(self, dims: Sequence[int | None], weights: Sequence[float] | None = None):
        super().__init__()
        self.dims = list(dims)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dims)
        if len(self.weights) != len(self.dims):
            raise ValueError(f"{len(self.dims)} Matryoshka dims but {len(self.weights)} weights")

    def forward(self, inner: Callable[..., torch.Tensor], *embeddings: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for dim, weight in zip(self.dims, self.weights):
            cut = [e if dim is None else F.normalize(e[..., :dim], dim=-1) for e in embeddings]
            total = total + weight * inner(*cut)
        return total
