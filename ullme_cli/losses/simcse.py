import torch
from torch import nn

from ullme_cli.losses.contrastive import InfoNCELoss
from ullme_cli.losses.step_inputs import StepInputs


class SimCSELoss(nn.Module):
    """Unsupervised SimCSE (Gao et al., 2021): a text's positive is the same text under another dropout mask.

        L = InfoNCE(v_i, v_i'), v and v' two encodings of the same B texts with dropout on; the other
        texts of the batch are the negatives.

    Inputs: first_view (B, d), second_view (B, d). Returns a scalar.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.info_nce = InfoNCELoss(temperature)

    def forward(self, first_view: torch.Tensor, second_view: torch.Tensor) -> torch.Tensor:
        return self.info_nce(first_view, second_view)

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        return self(*inputs.views)
