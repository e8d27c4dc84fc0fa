import torch
import torch.nn.functional as F
from torch import nn

from ullme_cli.losses.step_inputs import StepInputs
from ullme_cli.losses.table import DPO_LOGPROBS, DPO_VARIANTS

VARIANTS, LOGPROBS = DPO_VARIANTS, DPO_LOGPROBS


class DPOLoss(nn.Module):
    """Direct preference optimisation on generation (Rafailov et al., 2023; IPO: Azar et al., 2023).

        h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))
        sigmoid: L = -(1-ε) log σ(β h) - ε log σ(-β h)      hinge: L = max(0, 1 - β h)      ipo: L = (h - 1/(2β))²

    ε is `label_smoothing` (conservative DPO, Mitchell 2023: the preference label is flipped with probability
    ε), 0 by default; the original ULLME and GenC train with 0.1. It applies to the sigmoid variant only.

    c is the chosen continuation (a positive passage), r the rejected one (a hard negative); log π are
    log-likelihoods of the passage tokens given the generation prompt, summed or averaged (`logprob`: sum,
    mean, or auto: mean for ipo, whose 1/(2β) margin is meant for token means as in TRL and the ULLME code,
    sum for sigmoid and hinge). The reference is the
    same model with its LoRA adapters disabled; with `reference_free` the reference terms are zero.

    Inputs: policy_chosen, policy_rejected (B,), reference_chosen, reference_rejected (B,) or None.
    """

    def __init__(self, beta: float = 0.1, variant: str = "sigmoid", reference_free: bool = False, label_smoothing: float = 0.0,
                 logprob: str = "auto"):  # fmt: skip
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DPO variant '{variant}' (choose from {', '.join(VARIANTS)})")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if logprob not in LOGPROBS:
            raise ValueError(f"unknown DPO logprob '{logprob}' (choose from {', '.join(LOGPROBS)})")
        self.beta, self.variant, self.reference_free, self.label_smoothing = beta, variant, reference_free, label_smoothing
        self.logprob = logprob if logprob != "auto" else ("mean" if variant == "ipo" else "sum")

    def forward(self, policy_chosen, policy_rejected, reference_chosen=None, reference_rejected=None) -> torch.Tensor:
        margin = policy_chosen - policy_rejected
        if not self.reference_free:
            margin = margin - (reference_chosen - reference_rejected)
        if self.variant == "sigmoid":
            eps = self.label_smoothing
            return (-(1 - eps) * F.logsigmoid(self.beta * margin) - eps * F.logsigmoid(-self.beta * margin)).mean()
        if self.variant == "hinge":
            return torch.relu(1 - self.beta * margin).mean()
        return ((margin - 1 / (2 * self.beta)) ** 2).mean()

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        """The positive is chosen over the first hard negative."""
        policy = inputs.generation[self.logprob]
        reference = (None, None) if self.reference_free else inputs.reference()[self.logprob].unbind(-1)
        return self(policy[:, 0], policy[:, 1], *reference)
