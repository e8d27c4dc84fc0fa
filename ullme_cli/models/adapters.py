"""Many LoRA adapters on one loaded base model, each served as a model of its own.

An adapter-only folder (finetune's default output) names the base it was trained on and that base's weights
fingerprint. Every such folder trained on the loaded base is added to one peft model under its name, so the
base weights are in memory once; each gets an Embedder of its own setup (pooling, instructions, max_length,
tokenizer, head) over that shared model. `Adapters.encode_batch(name, items)` makes that adapter the active
one for the batch, or runs the base with every adapter disabled.

The active adapter is state of the shared model: one thread encodes at a time (serve's batcher has one
worker), and a batch holds one name's texts only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import resolve_setup
from ullme_cli.models.embedder import Embedder, embedder_over, peft_deprecations_silenced
from ullme_cli.models.loading import adapter_files, adapter_record, load_adapter, model_fingerprint

log = logging.getLogger(__name__)


class Adapters:
    """The served models by name: the base first, then its adapters, all over one set of base weights."""

    def __init__(self, base_name: str, base: Embedder):
        self.base_name = base_name
        self.embedders: dict[str, Embedder] = {base_name: base}

    @property
    def names(self) -> list[str]:
        return list(self.embedders)

    def add(self, name: str, folder: str) -> Embedder:
        """Add the adapter-only folder `folder` as model `name`; refused unless it was trained on this base."""
        base = self.embedders[self.base_name]
        if name in self.embedders:
            raise UllmeError(f"--adapter {name}={folder}: the name '{name}' is served already")
        record = adapter_record(Path(folder))
        if record is None or adapter_files(Path(folder)) is None:
            raise UllmeError(f"--adapter {name}={folder}: not an adapter-only folder (finetune's default output, whose ullme.json names its base)")
        served = base.base_record or {}
        if record["fingerprint"] != served.get("fingerprint"):
            raise UllmeError(f"--adapter {name}={folder}: trained on {record['model']} (weights fingerprint {record['fingerprint'][:12]}), "
                             f"but the served base {base.setup.model} has weights fingerprint {str(served.get('fingerprint'))[:12]}")  # fmt: skip
        setup = resolve_setup(folder).replace(fingerprint=model_fingerprint(folder))
        with peft_deprecations_silenced():
            model = load_adapter(base.model, Path(folder), name)
        model.eval()
        self.embedders[name] = embedder_over(model, setup, folder, base.device)
        for embedder in self.embedders.values():  # the base's own Embedder now holds the peft model too
            embedder.model = model
            # Eager only: a compiled graph is traced for one active adapter, and switching would recompile.
            embedder.compile_policy = embedder.compiled_embed = None
        log.info(f"adapter {name} from {folder} on {base.setup.model}")
        return self.embedders[name]

    def __getitem__(self, name: str) -> Embedder:
        return self.embedders[name]

    def encode_batch(self, name: str, items: Sequence) -> np.ndarray:
        """The vectors of one model's tokenized texts, with that model's adapter active (none for the base)."""
        embedder = self.embedders[name]
        if not embedder.has_adapter:  # no adapter was added
            return embedder.encode_batch(items)
        if name == self.base_name:
            with embedder.model.disable_adapter():
                return embedder.encode_batch(items)
        embedder.model.set_adapter(name)
        return embedder.encode_batch(items)


def load_adapters(base_name: str, base: Embedder, adapters: dict[str, str]) -> Adapters:
    """The base and every adapter in `adapters` (name -> adapter-only folder), in that order."""
    if adapters and base.has_adapter:
        raise UllmeError(f"--adapter: the served model {base.setup.model} holds an adapter already; serve its base model")
    served = Adapters(base_name, base)
    for name, folder in adapters.items():
        served.add(name, folder)
    return served
