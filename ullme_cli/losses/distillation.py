import torch
from torch import nn


class DistillationLoss(nn.Module):
    """Knowledge distillation from teacher scores over each query's candidates (FlagEmbedding, Tevatron;
    RocketQAv2's listwise form).

        P_t(p|q) = softmax_{p ∈ U(q)} t(q, p) / τ_t        (the teacher's scores, fixed)
        P_s(p|q) = softmax_{p ∈ U(q)} s(q, p) / τ          (the student's cosine scores)
        L = 1/B Σ_q KL(P_t ‖ P_s) = 1/B Σ_q Σ_p P_t log(P_t / P_s)

    U(q) is the row's drawn positive and hard negatives. A candidate without a teacher score (a hard
    negative borrowed from another row's positive, when the row had too few of its own) is left out of both
    softmaxes; a row with fewer than two scored candidates contributes nothing.

    Inputs: student_scores (B, U), teacher_scores (B, U) with NaN where there is no teacher score.
    Returns a scalar, the mean over the rows that have at least two scored candidates (0 when none does).
    """

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 0.05):
        super().__init__()
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        scored = ~torch.isnan(teacher_scores)
        rows = scored.sum(-1) >= 2
        if not bool(rows.any()):
            return student_scores.sum() * 0.0  # keeps the graph, so every process still backpropagates
        log_s = (student_scores.float() / self.temperature).masked_fill(~scored, float("-inf")).log_softmax(-1)
        log_t = (teacher_scores.float().nan_to_num(0.0) / self.teacher_temperature).masked_fill(~scored, float("-inf")).log_softmax(-1)
        per_candidate = torch.where(scored, log_t.exp() * (log_t - log_s), torch.zeros_like(log_s))
        return per_candidate.sum(-1)[rows].mean()
