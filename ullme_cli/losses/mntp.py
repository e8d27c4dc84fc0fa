import torch
import torch.nn.functional as F
from torch import nn

from ullme_cli.losses.step_inputs import StepInputs


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, probability: float, generator: torch.Generator | None = None):
    """Replace a share of the real tokens by `mask_token_id`; labels keep the originals there and -100 elsewhere."""
    chosen = (torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device) < probability) & attention_mask.bool()
    chosen[:, 0] = False  # the first token has no previous position to predict it from
    if not chosen.any():  # none drawn (short texts, a small batch): mask the first one that can be, so the loss is defined
        eligible = attention_mask.bool().clone()
        eligible[:, 0] = False
        if eligible.any():
            chosen.view(-1)[eligible.view(-1).nonzero()[0]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return torch.where(chosen, torch.full_like(input_ids, mask_token_id), input_ids), labels


class MNTPLoss(nn.Module):
    """Masked next-token prediction (LLM2Vec; BehnamGhader et al., 2024).

        L = -1/|M| Σ_{i ∈ M} log p(x_i | x̃), read from the logits at position i-1,

    where x̃ is the input with the positions M masked, run with bidirectional attention. Predicting from
    i-1 keeps the decoder's next-token head meaningful.

    Inputs: logits (B, L, V) of the masked input, labels (B, L) from `mask_tokens`. Returns a scalar.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        return self(*inputs.masked)
