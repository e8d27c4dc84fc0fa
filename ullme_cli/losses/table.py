"""The loss table: every component a recipe can weight, the class that computes it, what it needs from a
step, and the recipe parameters it reads.

`training/step.py` builds the recipe's components from this table and computes only the inputs they need;
`recipes.py` validates `loss.weights`, `loss.strategy`, GradCache, Matryoshka and negatives against it. A new
loss is one file in `losses/` and one row here.

What a component can need from a step (`needs`):
- `pairs`: query, positive and hard-negative embeddings (bidirectional);
- `negatives`: at least one hard negative per query (`data.negatives_per_query >= 1`);
- `generation`: the causal log-probabilities of each candidate given the query's generation prompt;
- `teacher`: the rows' teacher scores (`pos_scores`, `neg_scores`);
- `views`: two dropout views of the same texts (SimCSE);
- `masked`: masked tokens of the positives (MNTP).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    loss_class: str  # "module:Class" under ullme_cli.losses, imported when built (recipes.py stays free of torch)
    arguments: tuple[str, ...]  # the LossSection fields passed to the class, in order
    needs: frozenset[str]
    also_reads: tuple[str, ...] = ()  # LossSection fields the step reads for it besides the class's arguments
    grad_cache: bool = True  # GradCache (train.grad_cache_chunk) can replay it
    matryoshka: bool = False  # loss.matryoshka_dims applies to it

    @property
    def embeds(self) -> bool:
        """It needs bidirectional embeddings (query, positive and negative, or SimCSE's views)."""
        return bool({"pairs", "views"} & self.needs)

    @property
    def parameters(self) -> tuple[str, ...]:
        """Every recipe parameter (`loss.<name>`) this component reads."""
        return self.arguments + self.also_reads

    def build(self, section):
        module, cls = self.loss_class.split(":")
        return getattr(importlib.import_module(f"ullme_cli.losses.{module}"), cls)(*(getattr(section, a) for a in self.arguments))


def _component(name, loss_class, arguments, needs, **rest) -> Component:
    return Component(name, loss_class, tuple(arguments), frozenset(needs), **rest)


LOSS_TABLE: dict[str, Component] = {c.name: c for c in (
    _component("contrastive", "contrastive:InfoNCELoss", ["temperature"], {"pairs"}, matryoshka=True),
    _component("distill", "distillation:DistillationLoss", ["temperature", "teacher_temperature"], {"pairs", "negatives", "teacher"}, matryoshka=True),
    _component("kl", "kl:RelevanceKLLoss", ["tau_kl", "tau_gen", "kl_direction"], {"pairs", "negatives", "generation"}),
    _component("simcse", "simcse:SimCSELoss", ["temperature"], {"views"}, grad_cache=False),
    _component("mntp", "mntp:MNTPLoss", [], {"masked"}, also_reads=("mask_probability",), grad_cache=False),
    _component("sft", "sft:SFTLoss", [], {"generation"}),
    _component("dpo", "preference:DPOLoss", ["beta", "dpo_variant", "reference_free", "dpo_label_smoothing"], {"negatives", "generation"},
               also_reads=("dpo_logprob",)),
)}  # fmt: skip
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


def names_needing(need: str) -> set[str]:
    """The components that need `need` (see the module docstring)."""
    return {name for name, c in LOSS_TABLE.items() if need in c.needs}
