"""What a training step hands its loss components: one record, filled with what the recipe's components need.

Each loss class reads its inputs from this record in its `from_step` method, so the step never names a loss
(`losses/table.py` says which fields a component needs; `training/step.py` fills only those). A field a
component did not ask for is None.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class StepInputs:
    # `pairs`: the embeddings of the queries (B, d), their drawn positives (B, d) and hard negatives (B, n, d).
    queries: torch.Tensor | None = None
    positives: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # each row's label id (-1 none), or None: rows of one label are not each other's negatives
    own_only: torch.Tensor | None = None  # rows that take no in-batch negatives, or None for none
    # `views`: two dropout views of the same texts (B', d) each.
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    # `generation`: log p(candidate | generation prompt) per row, positive first: {"sum", "mean", "tokens"} -> (B, 1+n).
    generation: dict[str, torch.Tensor] | None = None
    # The same scores of (positive, first negative) under the reference model (adapters off), computed on call:
    # {"sum", "mean", "tokens"} -> (B, 2). Only a component that uses a reference pays for it.
    reference: Callable[[], dict[str, torch.Tensor]] | None = None
    # The batch's positive-token count when this record holds one GradCache chunk of the rows; None for a whole batch.
    batch_tokens: torch.Tensor | None = None
    # `teacher`: the teacher's score of each drawn candidate (B, 1+n) and the mask of the scored ones.
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None
    # `masked`: the LM logits of the masked positives (B, L, V) and their labels (B, L), -100 where unmasked.
    masked: tuple[torch.Tensor, torch.Tensor] | None = None

    def truncated(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> StepInputs:
        """The same record over other embeddings of the pairs (Matryoshka's truncated sizes)."""
        return replace(self, queries=queries, positives=positives, negatives=negatives)
