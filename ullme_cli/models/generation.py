"""Generation scoring: how likely the model makes a passage follow a query's generation prompt, with causal
attention on the same weights that embed (GRL's P_gen, DPO, SFT). The training step and the benchmarks
call these with a loaded `Embedder`; they read its model, tokenizer, setup and device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ullme_cli.errors import UllmeError
from ullme_cli.models.bidirectional import lm_logits


def generation_logprobs(
    embedder, prompts: Sequence[str], continuations: Sequence[str], grad: bool = False
) -> dict[str, torch.Tensor]:
    """log p(continuation | prompt) under causal attention, on the same weights, with the logits of the
    model's own causal-LM head (family logit scales included).

    Returns per pair: `sum` and `mean` of the continuation's token log-probabilities, and `tokens`.
    Only positions that predict a continuation token go through the LM head, which keeps large
    vocabularies affordable.
    """
    rows = generation_pairs(embedder, prompts, continuations)
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), embedder.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    for row, (p, c) in enumerate(rows):
        # Left padding, whatever the setup's side (causal attention and mask-counted positions give the
        # same log-probabilities either way): every continuation then ends at the last position, so the
        # LM head runs on the longest continuation's positions only. Right padding ran it on the band from
        # the shortest prompt's end to the longest sequence's end: 52 of a DPO step's 805 GFLOP
        # (benchmarks/train_step.py, batch 8, max_length 64).
        start = length - len(p) - len(c)
        ids[row, start : start + len(p) + len(c)] = torch.tensor(p + c)
        mask[row, start : start + len(p) + len(c)] = 1
        targets[row, start + len(p) : start + len(p) + len(c)] = True
    ids, mask, targets = ids.to(embedder.device), mask.to(embedder.device), targets.to(embedder.device)
    # The state at position t-1 predicts token t: keep the positions that predict some row's target.
    predictors = torch.zeros_like(targets)
    predictors[:, :-1] = targets[:, 1:]
    keep = predictors.any(0).nonzero().squeeze(-1)
    with torch.set_grad_enabled(grad):
        logits = lm_logits(embedder.model, ids, mask, "causal", keep).float()
        kept = predictors[:, keep]
        next_tokens = ids[:, keep + 1][kept]
        token_logprobs = logits[kept].log_softmax(-1).gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(len(rows), device=embedder.device).unsqueeze(1).expand_as(kept)[kept]
        total = torch.zeros(len(rows), device=embedder.device).index_add(0, row_of, token_logprobs)
        count = kept.sum(-1).clamp(min=1)
    return {"sum": total, "mean": total / count, "tokens": count}


def generation_prompt(embedder, query: str, instruction: str | None = None) -> str:
    """The prompt whose continuation GRL, DPO and SFT score: instruction (`instruction`, a row's own, wins
    over the setup's), query, separator. Training and scoring both build prompts here."""
    return (embedder.setup.generation_instruction if instruction is None else instruction) + query + embedder.setup.generation_separator


def generation_pairs(embedder, prompts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids (prompt, continuation) per pair, cut to max_length: continuation to half, prompt from the left."""
    if len(prompts) != len(continuations):
        raise UllmeError("generation_logprobs: prompts and continuations differ in number")
    budget = embedder.setup.max_length
    prompt_ids = embedder.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cont_ids = embedder.tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    rows = []
    for p, c in zip(prompt_ids, cont_ids):
        c = c[: max(1, budget // 2)] or [embedder.tokenizer.eos_token_id]
        p = p[-max(1, budget - len(c)) :]  # keep the end of the prompt, next to the continuation
        rows.append((p, c))
    return rows
