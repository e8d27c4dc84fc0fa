import torch
import torch.nn.functional as F
from torch import nn

from ullme_cli.losses.step_inputs import StepInputs


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each process the gradient of its own rows, summed over every
    process's loss. Built on the public collectives (`all_gather`, `all_reduce`), which gloo and NCCL both
    have; torch.distributed.nn.functional.all_gather is deprecated as of torch 2.13."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows (equal counts), keeping gradients for the local ones; returns (gathered, offset of ours)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


class InfoNCELoss(nn.Module):
    """Contrastive loss with in-batch and hard negatives (InfoNCE; Oord et al., 2018; e5, ULLME).

        L = -1/B Σ_i log [ exp(s(q_i, p_i⁺)/τ) / Σ_{p ∈ P} exp(s(q_i, p)/τ) ]

    s is the dot product of unit vectors (cosine). P holds every positive of the global batch (gathered
    from all processes with gradients kept) and every hard negative. τ = 0.05 by default.

    False negatives by label (SupCon-style; Khosla et al., 2020): with `groups`, another row's positive
    whose group equals row i's is left out of row i's denominator, since it answers the same label or
    cluster (a classification row's label text is no negative for another row of that class). Group -1
    means none. Hard negatives always stay: they are negatives by construction.

    Own candidates only: a row with `own_only` set is scored against its own positive and its own hard
    negatives (negatives are n per row, in row order), as for classification and clustering sets whose
    other rows' texts are no negatives for it.

    Inputs: queries (B, d), positives (B, d), negatives (N, d) or None, groups (B,) int64 or None,
    own_only (B,) bool or None. Returns a scalar.
    """

    def __init__(self, temperature: float = 0.05, gather: bool = True):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, own_only: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        offset = 0
        own_groups = groups
        if self.gather:
            positives, offset = gather_with_grad(positives)
            if negatives is not None:
                negatives, _ = gather_with_grad(negatives)
            if groups is not None:
                groups, _ = gather_with_grad(groups)  # integers: no gradient flows, the gather is all that runs
        candidates = positives if negatives is None else torch.cat([positives, negatives], dim=0)
        logits = (queries @ candidates.T / self.temperature).float()
        rows = torch.arange(queries.shape[0], device=queries.device)
        if own_groups is not None:
            same = (own_groups[:, None] == groups[None, :]) & (own_groups[:, None] >= 0)
            same[rows, rows + offset] = False  # the row's own positive stays
            masked = torch.zeros_like(logits, dtype=torch.bool)
            masked[:, : positives.shape[0]] = same
            logits = logits.masked_fill(masked, float("-inf"))
        if own_only is not None and bool(own_only.any()):
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep[rows, rows + offset] = True
            if negatives is not None:
                per_row = negatives.shape[0] // positives.shape[0]
                for i in range(queries.shape[0]):
                    first = positives.shape[0] + (offset + i) * per_row
                    keep[i, first : first + per_row] = True
            logits = logits.masked_fill(own_only[:, None] & ~keep, float("-inf"))
        return F.cross_entropy(logits, rows + offset)

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        return self(inputs.queries, inputs.positives, inputs.negatives.reshape(-1, inputs.negatives.shape[-1]), inputs.groups, inputs.own_only)
