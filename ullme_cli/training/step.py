"""One training step's loss, from a batch of examples to a scalar, component by component.

Read top to bottom: embed queries and passages (bidirectional), score generations (causal, same
weights), then add each loss component the recipe weights. Only what a component needs is computed.
"""

from __future__ import annotations

import torch

from ullme_cli.data import TrainingExample
from ullme_cli.losses import DPOLoss, InfoNCELoss, MNTPLoss, RelevanceKLLoss, SFTLoss, SimCSELoss, mask_tokens
from ullme_cli.models.bidirectional import hidden_states
from ullme_cli.recipes import LossSection


class StepLoss:
    def __init__(self, embedder, loss: LossSection, negatives_per_query: int):
        self.embedder = embedder
        self.weights = loss.resolved_weights()
        self.negatives_per_query = negatives_per_query
        self.info_nce = InfoNCELoss(loss.temperature)
        self.simcse = SimCSELoss(loss.temperature)
        self.mntp = MNTPLoss()
        self.sft = SFTLoss()
        self.dpo = DPOLoss(loss.beta, loss.dpo_variant, loss.reference_free)
        self.kl = RelevanceKLLoss(loss.tau_kl, loss.tau_gen, loss.kl_direction)
        self.mask_probability = loss.mask_probability

    def embed(self, texts: list[str], kind: str, instructions: list[str | None] | None = None) -> torch.Tensor:
        e = self.embedder
        if instructions is None or all(i is None for i in instructions):
            return e.embed(e.collate(e.tokenize(texts, kind)))
        items = [e.tokenize([t], kind, i)[0] for t, i in zip(texts, instructions)]
        return e.embed(e.collate(items))

    def __call__(self, batch: list[TrainingExample], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        w, e, n = self.weights, self.embedder, self.negatives_per_query
        positives = [ex.positives[0] for ex in batch]
        # Rows without enough hard negatives borrow the next rows' positives: still wrong answers for them.
        negatives = [
            (ex.negatives + [positives[(i + j + 1) % len(batch)] for j in range(n)])[:n] for i, ex in enumerate(batch)
        ]
        parts: dict[str, torch.Tensor] = {}
        if {"contrastive", "kl"} & set(w):
            q = self.embed([ex.query for ex in batch], "query", [ex.instruction for ex in batch])
            p = self.embed(positives, "passage")
            neg = self.embed([t for row in negatives for t in row], "passage").reshape(len(batch), n, -1)
            if "contrastive" in w:
                parts["contrastive"] = self.info_nce(q, p, neg.reshape(-1, neg.shape[-1]))
        if {"dpo", "kl", "sft"} & set(w):
            prompts = [e.config.generation_instruction + ex.query for ex in batch]
            candidates = [[pos] + row for pos, row in zip(positives, negatives)]  # U(q): positive first
            flat_prompts = [pr for pr, row in zip(prompts, candidates) for _ in row]
            flat_texts = [t for row in candidates for t in row]
            generation = e.generation_logprobs(flat_prompts, flat_texts, grad=True)
            sums = generation["sum"].reshape(len(batch), 1 + n)
            if "sft" in w:
                parts["sft"] = self.sft(sums[:, 0], generation["tokens"].reshape(len(batch), 1 + n)[:, 0])
            if "dpo" in w:
                reference = self.reference_sums(prompts, positives, [row[0] for row in negatives])
                parts["dpo"] = self.dpo(sums[:, 0], sums[:, 1], *reference)
            if "kl" in w:
                candidates_emb = torch.cat([p.unsqueeze(1), neg], dim=1)
                retrieval = torch.einsum("bd,bud->bu", q, candidates_emb)
                parts["kl"] = self.kl(retrieval, generation["mean"].reshape(len(batch), 1 + n))
        if "simcse" in w:
            texts = [ex.query for ex in batch] + positives
            parts["simcse"] = self.simcse(self.embed(texts, "passage"), self.embed(texts, "passage"))
        if "mntp" in w:
            parts["mntp"] = self.mntp_loss(positives, generator)
        total = sum(w[name] * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}

    def reference_sums(self, prompts, chosen, rejected):
        if self.dpo.reference_free:
            return None, None
        e = self.embedder
        with torch.no_grad(), e.model.disable_adapter():  # the reference: the same weights, adapters off
            scores = e.generation_logprobs(prompts + prompts, list(chosen) + list(rejected))["sum"]
        return scores[: len(prompts)], scores[len(prompts) :]

    def mntp_loss(self, texts: list[str], generator: torch.Generator) -> torch.Tensor:
        e = self.embedder
        batch = e.collate(e.tokenize(texts, "passage"))
        mask_id = e.tokenizer.mask_token_id if e.tokenizer.mask_token_id is not None else e.tokenizer.pad_token_id
        masked, labels = mask_tokens(batch.input_ids, batch.attention_mask, mask_id, self.mask_probability, generator)
        states = hidden_states(e.model, masked, batch.attention_mask, "bidirectional")
        return self.mntp(e.output_logits(states), labels)
