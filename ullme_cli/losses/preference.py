import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("sigmoid", "hinge", "ipo")


class DPOLoss(nn.Module):
    """Direct preference optimisation on generation (Rafailov et al., 2023; IPO: Azar et al., 2023).

        h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))
        sigmoid: L = -log σ(β h)      hinge: L = max(0, 1 - β h)      ipo: L = (h - 1/(2β))²

    c is the chosen continuation (a positive passage), r the rejected one (a hard negative); log π are
    log-likelihoods summed over the passage tokens given the generation prompt. The reference is the
    same model with its LoRA adapters disabled; with `reference_free` the reference terms are zero.

    Inputs: policy_chosen, policy_rejected (B,), reference_chosen, reference_rejected (B,) or None.
    """

    def __init__(self, beta: float = 0.1, variant: str = "sigmoid", reference_free: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown DPO variant '{variant}' (choose from {', '.join(VARIANTS)})")
        self.beta, self.variant, self.reference_free = beta, variant, reference_free

    def forward(self, policy_chosen, policy_rejected, reference_chosen=None, reference_rejected=None) -> torch.Tensor:
        margin = policy_chosen - policy_rejected
        if not self.reference_free:
            margin = margin - (reference_chosen - reference_rejected)
        if self.variant == "sigmoid":
            return -F.logsigmoid(self.beta * margin).mean()
        if self.variant == "hinge":
            return torch.relu(1 - self.beta * margin).mean()
        return ((margin - 1 / (2 * self.beta)) ** 2).mean()
