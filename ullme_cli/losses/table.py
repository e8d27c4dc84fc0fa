"""The loss table: every component a recipe can weight, the class that computes it, what it needs from a
step, the recipe parameters it reads, and how GradCache replays it.

`training/step.py` builds the recipe's components from this table, computes only the inputs they need into
one `StepInputs` record, and asks each component's `from_step` for its value: the step names no loss.
`recipes.py` validates `loss.weights`, `loss.strategy`, GradCache, Matryoshka and negatives against it. A new
loss is one file in `losses/` (an nn.Module with its formula in the docstring and a `from_step(inputs)`
method) and one row here; tests/test_loss_table.py adds a toy loss exactly that way.

What a component can need from a step (`needs`):
- `pairs`: query, positive and hard-negative embeddings (bidirectional);
- `negatives`: at least one hard negative per query (`data.negatives_per_query >= 1`);
- `generation`: the causal log-probabilities of each candidate given the query's generation prompt;
- `teacher`: the rows' teacher scores (`pos_scores`, `neg_scores`);
- `views`: two dropout views of the same texts (SimCSE);
- `masked`: masked tokens of the positives (MNTP).

How GradCache (`train.grad_cache_chunk`) replays a component (`grad_cache`):
- `embeddings`: computed once on the cached embeddings of the whole batch; its gradient flows back chunk
  by chunk through them;
- `rows`: a mean over rows of the generation scores, computed and backpropagated chunk by chunk, each chunk
  weighted by its share of the rows;
- `tokens`: a sum over the batch's generation tokens divided by their count, computed chunk by chunk over the
  whole batch's count;
- False: not replayable (the recipe is refused with GradCache).

The step computes and sums the components phase by phase (`PHASES`: generation, embeddings, masked tokens),
in table order within a phase.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    loss_class: str  # "module:Class" under ullme_cli.losses (or "package.module:Class"), imported when built (recipes.py stays free of torch)
    arguments: tuple[str, ...]  # the LossSection fields passed to the class, in order
    needs: frozenset[str]
    also_reads: tuple[str, ...] = ()  # LossSection fields the step reads for it besides the class's arguments
    grad_cache: str | bool = "embeddings"  # how GradCache replays it: embeddings | rows | tokens, or False (module docstring)
    matryoshka: bool = False  # loss.matryoshka_dims applies to it

    @property
    def embeds(self) -> bool:
        """It needs bidirectional embeddings (query, positive and negative, or SimCSE's views)."""
        return bool({"pairs", "views"} & self.needs)

    @property
    def phase(self) -> str:
        """Where its gradient enters the model: through the embeddings, the generation scores, or the masked
        tokens' LM logits."""
        return "embeddings" if self.embeds else "masked" if "masked" in self.needs else "generation"

    @property
    def parameters(self) -> tuple[str, ...]:
        """Every recipe parameter (`loss.<name>`) this component reads."""
        return self.arguments + self.also_reads

    def build(self, section):
        module, cls = self.loss_class.split(":")
        module = module if "." in module else f"ullme_cli.losses.{module}"  # a dotted path names a module outside losses/
        return getattr(importlib.import_module(module), cls)(*(getattr(section, a) for a in self.arguments))


def _component(name, loss_class, arguments, needs, **rest) -> Component:
    return Component(name, loss_class, tuple(arguments), frozenset(needs), **rest)


LOSS_TABLE: dict[str, Component] = {c.name: c for c in (
    _component("contrastive", "contrastive:InfoNCELoss", ["temperature"], {"pairs"}, matryoshka=True),
    _component("distill", "distillation:DistillationLoss", ["temperature", "teacher_temperature"], {"pairs", "negatives", "teacher"}, matryoshka=True),
    _component("kl", "kl:RelevanceKLLoss", ["tau_kl", "tau_gen", "kl_direction"], {"pairs", "negatives", "generation"}),
    _component("simcse", "simcse:SimCSELoss", ["temperature"], {"views"}, grad_cache=False),
    _component("mntp", "mntp:MNTPLoss", [], {"masked"}, also_reads=("mask_probability",), grad_cache=False),
    _component("sft", "sft:SFTLoss", [], {"generation"}, grad_cache="tokens"),
    _component("dpo", "preference:DPOLoss", ["beta", "dpo_variant", "reference_free", "dpo_label_smoothing", "dpo_logprob"],
               {"negatives", "generation"}, grad_cache="rows"),
)}  # fmt: skip
# The values a loss parameter may take, named here (torch-free) for the loss classes and for recipe validation.
KL_DIRECTIONS = ("rt||gen", "gen||rt")  # loss.kl_direction: the paper's KL(P_rt ‖ P_gen) first, the original code's second
DPO_VARIANTS = ("sigmoid", "hinge", "ipo")  # loss.dpo_variant
DPO_LOGPROBS = ("auto", "sum", "mean")  # loss.dpo_logprob: auto is mean for ipo, sum for sigmoid and hinge
# Strategy presets: the weights of each component (GRL's are the paper's λ).
STRATEGIES = {
    "contrastive": {"contrastive": 1.0},
    "simcse": {"simcse": 1.0},
    "mntp": {"mntp": 1.0},
    "sft": {"sft": 1.0},
    "dpo": {"dpo": 1.0},
    "grl": {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0},
    "distill": {"distill": 1.0},
}


PHASES = ("generation", "embeddings", "masked")


def in_step_order(names) -> list[str]:
    """The components `names` in the order a step computes and sums them."""
    order = list(LOSS_TABLE)
    return sorted(names, key=lambda name: (PHASES.index(LOSS_TABLE[name].phase), order.index(name)))


def names_needing(need: str) -> set[str]:
    """The components that need `need` (see the module docstring)."""
    return {name for name, c in LOSS_TABLE.items() if need in c.needs}
