import torch
from torch import nn

from ullme_cli.losses.step_inputs import StepInputs


class SFTLoss(nn.Module):
    """Generation cross-entropy on passages given their prompts (prompt tokens carry no label).

        L = -Σ_pairs Σ_t log p(y_t | prompt, y_<t) / Σ_pairs |y|

    Inputs: the per-pair log-probability sums and token counts from `Embedder.generation_logprobs`.
    """

    def forward(self, logprob_sums: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
        return -logprob_sums.sum() / token_counts.sum().clamp(min=1)

    def from_step(self, inputs: StepInputs) -> torch.Tensor:
        tokens = inputs.generation["tokens"][:, 0] if inputs.batch_tokens is None else inputs.batch_tokens
        return self(inputs.generation["sum"][:, 0], tokens)
