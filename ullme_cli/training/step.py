"""One training step, from a batch of examples to gradients, component by component.

Read top to bottom: draw each query's positive and negatives; score their generations (causal, same
weights) and add the generation components; embed queries and passages (bidirectional) and add the
embedding components; mask the positives and add the masked-token components; backpropagate the weighted
sum. Only what a component needs (`losses/table.py`) is computed, into one `StepInputs` record, and each
component reads its inputs from it itself (`from_step`): the step names no loss.

GradCache (Gao et al., 2021) when `chunk_size` is set: embed every chunk without gradients, take the
loss's gradient with respect to the embeddings, then embed each chunk again with gradients (replaying its
RNG state on the CPU and on the GPU, so dropout masks match) and backpropagate the cached gradient.
Memory then depends on the chunk, not the batch. Generation terms are per-example, so they are
backpropagated chunk by chunk.

Every backward starts from `self.scale(loss)`: the identity, or an fp16 gradient scaler's `scale`.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import torch

from ullme_cli.data import TrainingExample
from ullme_cli.errors import UllmeError
from ullme_cli.losses import MatryoshkaLoss, mask_tokens
from ullme_cli.losses.step_inputs import StepInputs
from ullme_cli.losses.table import LOSS_TABLE, in_step_order
from ullme_cli.models import generation
from ullme_cli.models.bidirectional import lm_logits
from ullme_cli.recipes import LossSection


def needs_of(weights) -> set[str]:
    """Everything the components of these loss weights need from a step (losses/table.py)."""
    return set().union(*(LOSS_TABLE[name].needs for name in weights))


def generation_with_graph(weights) -> bool:
    """Some component's gradient flows through the generation scores (the KL reads them as fixed targets)."""
    return any(LOSS_TABLE[name].phase == "generation" for name in weights)


def step_texts(weights, batch_size: int, negatives: int) -> tuple[int, int]:
    """(texts through the embedding forward, texts through the LM head), each with a graph, in one step of
    these loss weights: what `StepLoss.backward` runs for their needs, and what the dry run counts, from this
    one place. `pairs` embeds each row's query, positive and negatives; `views` embeds the queries and the
    positives twice (two dropout views); `masked` runs the positives, masked, through the LM head;
    `generation` scores each row's positive and negatives, with a graph when a generation-phase component
    backpropagates through them."""
    needs = needs_of(weights)
    embedded = batch_size * (2 + negatives) if "pairs" in needs else 0
    embedded += 2 * (2 * batch_size) if "views" in needs else 0
    through_lm = batch_size * (1 + negatives) if generation_with_graph(weights) else 0
    through_lm += batch_size if "masked" in needs else 0
    return embedded, through_lm


def rng_state(device: torch.device) -> tuple:
    """The CPU generator's state, and the GPU's where the model runs on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def replayed_rng(state: tuple, device: torch.device) -> Iterator[None]:
    """Run a block from a saved RNG state on every device in use, and restore the states after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class StepLoss:
    def __init__(self, embedder, loss: LossSection, negatives_per_query: int, chunk_size: int = 0,
                 scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):  # fmt: skip
        self.embedder = embedder
        self.scale = scale
        self.weights = loss.resolved_weights()
        self.negatives_per_query = negatives_per_query
        self.chunk_size = chunk_size
        self.terms = {name: LOSS_TABLE[name].build(loss) for name in self.weights}  # the recipe's components (losses/table.py)
        self.order = in_step_order(self.weights)
        self.needs = needs_of(self.weights)
        self.mask_probability = loss.mask_probability
        dims = loss.matryoshka()
        too_large = [d for d in dims if d is not None and d > embedder.dim]
        if too_large:
            raise UllmeError(f"loss.matryoshka_dims: {too_large[0]} is above the model's {embedder.dim} dimensions")
        self.matryoshka = MatryoshkaLoss(dims, loss.matryoshka_weights or None) if dims else None

    # ------------------------------------------------------------------ pieces
    def embed(self, texts: list[str], kind: str, instructions: list[str | None] | None = None) -> torch.Tensor:
        return self.embed_roles((texts, kind, instructions))[0]

    def embed_roles(self, *roles: tuple[list[str], str, list[str | None] | None]) -> list[torch.Tensor]:
        """Each role's vectors, a role being (texts, kind, per-text instructions or None).

        Padding-free, every role runs in one forward pass: a small batch's three passes (queries, positives,
        negatives) become one with three times the rows per matmul and a third of the per-layer overhead;
        1.45x faster per contrastive step on a bf16 CPU (docs/benchmarks.md). Padded, each role keeps its own
        pass, so short queries are not padded to the passages' length."""
        e = self.embedder
        tokenized = [
            [e.tokenize([t], kind, i)[0] for t, i in zip(texts, instructions)] if instructions else e.tokenize(texts, kind)
            for texts, kind, instructions in roles
        ]
        if not (e.packing and e.can_pack()):
            return [e.embed(e.collate(items)) for items in tokenized]
        vectors = e.embed(e.collate([t for items in tokenized for t in items], packed=True))
        return list(vectors.split([len(items) for items in tokenized]))

    def passage_instructions(self, batch: list[TrainingExample], per_row: int = 1) -> list[str | None] | None:
        """Each passage's instruction, `per_row` passages per row: the row's own instruction where the setup's
        passage_template gives passages the task's instruction (`model.template: ullme-paper`); else None,
        the setup's passage instruction for all."""
        if not self.embedder.setup.passage_template:
            return None
        return [ex.instruction for ex in batch for _ in range(per_row)]

    def candidates(self, batch: list[TrainingExample], generator: torch.Generator) -> tuple[list[str], list[list[str]]]:
        """One positive and `negatives_per_query` hard negatives per example, drawn afresh each step.

        Draws come from the step's generator, seeded from (seed, step, process): a resumed run draws the same.
        """
        n = self.negatives_per_query

        def draw(texts: list[str], count: int) -> list[str]:
            order = torch.randperm(len(texts), generator=generator)[:count].tolist()
            return [texts[i] for i in order]

        positives = [draw(ex.positives, 1)[0] for ex in batch]
        # Rows without enough hard negatives borrow other rows' positives: still wrong answers for them.
        negatives = [
            (draw(ex.negatives, n) + [positives[(i + j + 1) % len(batch)] for j in range(n)])[:n] for i, ex in enumerate(batch)
        ]
        return positives, negatives

    def prompts(self, batch: list[TrainingExample]) -> list[str]:
        """The generation prompt of each example: generation_instruction + query + generation_separator
        (docs/design.md §4), as `Embedder.generation_prompt` builds it; a row's own generation_instruction wins
        over the model's, so one multi-task set can prompt each task its way."""
        return [generation.generation_prompt(self.embedder, ex.query, ex.generation_instruction) for ex in batch]

    def generation_scores(self, batch, positives, negatives, grad: bool) -> dict[str, torch.Tensor]:
        e = self.embedder
        prompts = self.prompts(batch)
        rows = [[pos] + row for pos, row in zip(positives, negatives)]  # U(q): the positive first
        flat_prompts = [pr for pr, row in zip(prompts, rows) for _ in row]
        scores = generation.generation_logprobs(e, flat_prompts, [t for row in rows for t in row], grad=grad)
        return {k: v.reshape(len(batch), -1) for k, v in scores.items()}

    def reference_scores(self, batch, positives, negatives) -> dict[str, torch.Tensor]:
        """The positive's and the first negative's scores under the reference: the same weights with the
        adapters off. {"sum", "mean", "tokens"} -> (B, 2), chosen first."""
        e = self.embedder
        prompts = self.prompts(batch)
        with torch.no_grad(), e.model.disable_adapter():
            scores = generation.generation_logprobs(e, prompts + prompts, list(positives) + [row[0] for row in negatives])
        return {k: torch.stack([v[: len(prompts)], v[len(prompts) :]], dim=-1) for k, v in scores.items()}

    def groups(self, batch: list[TrainingExample]) -> torch.Tensor | None:
        """Each row's `label` (or `cluster`) as a stable integer id, -1 for none; None when no row has one.
        Stable across processes (a hash of the value, not an index), so gathered ids compare."""
        values = [ex.extra.get("label", ex.extra.get("cluster")) for ex in batch]
        if all(v is None for v in values):
            return None
        ids = [-1 if v is None else int(hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:15], 16) for v in values]
        return torch.tensor(ids, dtype=torch.long, device=self.embedder.device)

    def teacher_scores(self, batch: list[TrainingExample], positives: list[str], negatives: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's score of each row's drawn candidates (positive first), from the row's `pos_scores`
        and `neg_scores`, and a mask of the candidates that have one (not a borrowed negative, not a row
        without scores). Missing is the mask's word, never a value: a score is any finite number."""
        rows, scored = [], []
        for ex, positive, row in zip(batch, positives, negatives):
            known = dict(zip(ex.negatives, ex.extra.get("neg_scores") or []))
            known.update(zip(ex.positives, ex.extra.get("pos_scores") or []))
            borrowed = set(row) - set(ex.negatives)  # other rows' positives, standing in for missing negatives
            candidates = [(positive, positive in known)] + [(t, t not in borrowed and t in known) for t in row]
            rows.append([known[t] if has else 0.0 for t, has in candidates])
            scored.append([has for _, has in candidates])
        device = self.embedder.device
        return torch.tensor(rows, dtype=torch.float64, device=device), torch.tensor(scored, dtype=torch.bool, device=device)

    def own_only(self, batch: list[TrainingExample]) -> torch.Tensor | None:
        """Rows whose source has `in_batch_negatives: false`; None when every row takes in-batch negatives."""
        flags = [not ex.in_batch_negatives for ex in batch]
        return torch.tensor(flags, device=self.embedder.device) if any(flags) else None

    def masked_logits(self, texts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM logits of the texts with a share of their tokens masked (bidirectional), and the labels."""
        e = self.embedder
        batch = e.collate(e.tokenize(texts, "passage"))
        mask_id = e.tokenizer.mask_token_id if e.tokenizer.mask_token_id is not None else e.tokenizer.pad_token_id
        masked, labels = mask_tokens(batch.input_ids, batch.attention_mask, mask_id, self.mask_probability, generator)
        return lm_logits(e.model, masked, batch.attention_mask, "bidirectional"), labels

    def pair_roles(self, batch, positives, negatives) -> list[tuple[list[str], str, list[str | None] | None]]:
        """The queries, the drawn positives and the drawn negatives (flat, n per row), as embedding roles."""
        return [
            ([ex.query for ex in batch], "query", [ex.instruction for ex in batch]),
            (positives, "passage", self.passage_instructions(batch)),
            ([t for row in negatives for t in row], "passage", self.passage_instructions(batch, len(negatives[0]))),
        ]

    def generation_inputs(self, batch, positives, negatives, batch_tokens=None) -> StepInputs:
        """The generation scores of the rows' candidates, and their reference scores on demand."""
        return StepInputs(
            generation=self.generation_scores(batch, positives, negatives, grad=generation_with_graph(self.weights)),
            reference=lambda: self.reference_scores(batch, positives, negatives),
            batch_tokens=batch_tokens,
        )

    def pair_inputs(self, inputs: StepInputs, batch, positives, negatives, q, p, neg) -> StepInputs:
        """`inputs` with the pairs' embeddings and what the pair components read beside them."""
        return replace(
            inputs, queries=q, positives=p, negatives=neg.reshape(len(batch), len(negatives[0]), -1), groups=self.groups(batch),
            own_only=self.own_only(batch), teacher=self.teacher_scores(batch, positives, negatives) if "teacher" in self.needs else None,
        )  # fmt: skip

    def score(self, name: str, inputs: StepInputs) -> torch.Tensor:
        """One component's value; with Matryoshka, where the table applies it, the weighted sum over the trained sizes."""
        term = self.terms[name]
        if self.matryoshka and LOSS_TABLE[name].matryoshka:
            return self.matryoshka(lambda q, p, n: term.from_step(inputs.truncated(q, p, n)), inputs.queries, inputs.positives, inputs.negatives)
        return term.from_step(inputs)

    def phase_terms(self, phase: str, inputs: StepInputs) -> dict[str, torch.Tensor]:
        """The values of the recipe's components of one phase (losses/table.py), in step order."""
        return {name: self.score(name, inputs) for name in self.order if LOSS_TABLE[name].phase == phase}

    # ------------------------------------------------------------------ the step
    def backward(self, batch: list[TrainingExample], generator: torch.Generator) -> tuple[float, dict[str, float]]:
        """Compute the weighted loss and backpropagate it; return its value and its components."""
        if self.chunk_size and self.chunk_size < len(batch):
            return self._backward_grad_cache(batch, generator)
        needs = self.needs
        positives, negatives = self.candidates(batch, generator)
        inputs = self.generation_inputs(batch, positives, negatives) if "generation" in needs else StepInputs()
        parts = self.phase_terms("generation", inputs)
        if "pairs" in needs:
            q, p, neg = self.embed_roles(*self.pair_roles(batch, positives, negatives))
            inputs = self.pair_inputs(inputs, batch, positives, negatives, q, p, neg)
        if "views" in needs:
            texts = [ex.query for ex in batch] + positives
            inputs = replace(inputs, views=(self.embed(texts, "passage"), self.embed(texts, "passage")))
        parts.update(self.phase_terms("embeddings", inputs))
        if "masked" in needs:
            inputs = replace(inputs, masked=self.masked_logits(positives, generator))
        parts.update(self.phase_terms("masked", inputs))
        total = sum(self.weights[name] * value for name, value in parts.items())
        self.scale(total).backward()
        return float(total.detach()), {name: float(value.detach()) for name, value in parts.items()}

    def _backward_grad_cache(self, batch, generator) -> tuple[float, dict[str, float]]:
        w, e, needs = self.weights, self.embedder, self.needs
        not_cached = [name for name in w if not LOSS_TABLE[name].grad_cache]
        if not_cached:  # recipes.py refuses this first; a StepLoss built by hand gets the same answer
            raise NotImplementedError(f"GradCache does not cover {' or '.join(not_cached)}; set train.grad_cache_chunk: 0")
        positives, negatives = self.candidates(batch, generator)
        roles = dict(zip(("q", "p", "neg"), self.pair_roles(batch, positives, negatives))) if "pairs" in needs else {}
        chunks = {role: self._chunks(len(texts)) for role, (texts, _, _) in roles.items()}
        # 1. Embed every chunk without gradients, remembering the RNG state each chunk started from.
        cached, rng = {}, {}
        with torch.no_grad():
            for role, (texts, kind, instr) in roles.items():
                pieces = []
                for start, stop in chunks[role]:
                    rng[(role, start)] = rng_state(e.device)
                    pieces.append(self.embed(texts[start:stop], kind, instr[start:stop] if instr else None))
                cached[role] = torch.cat(pieces).requires_grad_()
        # 2. Generation components, computed and backpropagated chunk by chunk of rows, each as its table rule says:
        # `rows` (a mean over rows) weighted by the chunk's share of the rows; `tokens` divided by the whole batch's count.
        parts_value: dict[str, float] = {}
        means = []
        by_tokens = any(LOSS_TABLE[name].grad_cache == "tokens" for name in w)
        batch_tokens = torch.tensor(sum(len(c) for _, c in generation.generation_pairs(e, self.prompts(batch), positives)), device=e.device) if by_tokens else None
        for start, stop in self._chunks(len(batch)) if "generation" in needs else []:
            sub = batch[start:stop]
            inputs = self.generation_inputs(sub, positives[start:stop], negatives[start:stop], batch_tokens)
            means.append(inputs.generation["mean"].detach())
            terms = self.phase_terms("generation", inputs)
            if terms:
                shares = {k: {"rows": len(sub) / len(batch), "tokens": 1.0}[LOSS_TABLE[k].grad_cache] for k in terms}
                self.scale(sum(w[k] * v * shares[k] for k, v in terms.items())).backward()
                for k, v in terms.items():
                    parts_value[k] = parts_value.get(k, 0.0) + float(v.detach()) * shares[k]
        # 3. Embedding components on the cached embeddings, then their gradients pushed back chunk by chunk.
        if roles:
            inputs = StepInputs(generation={"mean": torch.cat(means)} if means else None)
            inputs = self.pair_inputs(inputs, batch, positives, negatives, cached["q"], cached["p"], cached["neg"])
            terms = self.phase_terms("embeddings", inputs)
            self.scale(sum(w[k] * v for k, v in terms.items())).backward()
            for role, (texts, kind, instr) in roles.items():
                gradient = cached[role].grad  # already scaled, when a scaler is in use
                if gradient is None:  # no component read this role (a loss of queries and positives only)
                    continue
                for start, stop in chunks[role]:
                    with replayed_rng(rng[(role, start)], e.device):  # the chunk's dropout masks again
                        again = self.embed(texts[start:stop], kind, instr[start:stop] if instr else None)
                    again.backward(gradient[start:stop])
            parts_value.update({k: float(v.detach()) for k, v in terms.items()})
        total = sum(w[k] * parts_value[k] for k in parts_value)
        return total, parts_value

    def _chunks(self, count: int) -> list[tuple[int, int]]:
        size = self.chunk_size or count
        return [(start, min(start + size, count)) for start in range(0, count, size)]
