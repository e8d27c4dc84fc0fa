import torch
from torch import nn

from ullme_cli.losses.kl import candidate_scores
from ullme_cli.losses.step_inputs import StepInputs


class DistillationLoss(nn.Module):
    """Knowledge distillation from teacher scores over each query's candidates (FlagEmbedding, Tevatron;
    RocketQAv2's listwise form).

        P_t(p|q) = softmax_{p ∈ U(q)} t(q, p) / τ_t        (the teacher's scores, fixed)
        P_s(p|q) = softmax_{p ∈ U(q)} s(q, p) / τ          (the student's cosine scores)
        L = 1/B Σ_q KL(P_t ‖ P_s) = 1/B Σ_q Σ_p P_t log(P_t / P_s)

    U(q) is the row's drawn positive and hard negatives. A candidate without a teacher score (a hard
    negative borrowed from another row's positive, when the row had too few of its own) is left out of both
    softmaxes; a row with fewer than two scored candidates contributes nothing.

    Inputs: student_scores (B, U); teacher_scores (B, U), finite (the readers refuse others); scored (B, U),
    True where the candidate has a teacher score (its teacher_scores entry is ignored elsewhere). A score is
    never its own "missing" marker: a NaN teacher score would otherwise drop out in silence.
    The teacher's softmax runs in float64 after subtracting each row's largest score, so scores as large as
    ±1e308 give a finite loss. Returns a scalar, the mean over the rows that have at least two scored
    candidates (0 when none does).
    """

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 0.05):
        super().__init__()
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        rows = scored.sum(-1) >= 2
        if not bool(rows.any()):
            return student_scores.sum() * 0.0  # keeps the graph, so every process still backpropagates
        log_s = (student_scores.float() / self.temperature).masked_fill(~scored, float("-inf")).log_softmax(-1)
        teacher = teacher_scores.double().masked_fill(~scored, float("-inf"))
        # The row's top score, finite even for a row with none scored (-inf - -inf would be NaN there).
        top = teacher.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)
        shifted = (teacher - top) / self.teacher_temperature
        log_t = shifted.masked_fill(~scored, float("-inf")).log_softmax(-1)
        p_t = log_t.exp()
        kept = scored & (p_t > 0)  # a candidate the teacher gives no mass adds nothing (not 0 * -inf)
        per_candidate = torch.where(kept, p_t * (log_t - log_s.double()), torch.zeros_like(p_t))
        return per_candidate.sum(-1)[rows].mean().float()

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        return self(candidate_scores(inputs.queries, inputs.positives, inputs.negatives), *inputs.teacher)
