import torch
from torch import nn

from ullme_cli.losses.step_inputs import StepInputs
from ullme_cli.losses.table import KL_DIRECTIONS

DIRECTIONS = KL_DIRECTIONS


def candidate_scores(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """s(q, p) over each query's U(q) = [its positive, its negatives]: (B, d), (B, d), (B, n, d) -> (B, 1+n)."""
    return torch.einsum("bd,bud->bu", queries, torch.cat([positives.unsqueeze(1), negatives], dim=1))


class RelevanceKLLoss(nn.Module):
    """KL between embedding relevance and generation likelihood over each query's candidates (ULLME GRL).

        P_rt(p|q)  = softmax_{p ∈ U(q)} s(q, p) / τ_kl
        P_gen(p|q) = softmax_{p ∈ U(q)} g(q, p) / τ_gen      (g: mean passage-token log-prob, detached)
        rt||gen (the paper's): KL(P_rt ‖ P_gen) = Σ_p P_rt log(P_rt / P_gen)
        gen||rt (the original code's): KL(P_gen ‖ P_rt)

    Inputs: retrieval_scores (B, U), generation_scores (B, U); U = positive + hard negatives. Returns a
    scalar, the mean over queries.
    """

    def __init__(self, tau_kl: float = 0.1, tau_gen: float = 1.0, direction: str = "rt||gen", detach_generation: bool = True):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown KL direction '{direction}' (choose from {', '.join(DIRECTIONS)})")
        self.tau_kl, self.tau_gen, self.direction, self.detach_generation = tau_kl, tau_gen, direction, detach_generation

    def forward(self, retrieval_scores: torch.Tensor, generation_scores: torch.Tensor) -> torch.Tensor:
        if self.detach_generation:
            generation_scores = generation_scores.detach()
        log_rt = (retrieval_scores.float() / self.tau_kl).log_softmax(-1)
        log_gen = (generation_scores.float() / self.tau_gen).log_softmax(-1)
        log_p, log_q = (log_rt, log_gen) if self.direction == "rt||gen" else (log_gen, log_rt)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        return self(candidate_scores(inputs.queries, inputs.positives, inputs.negatives), inputs.generation["mean"])
