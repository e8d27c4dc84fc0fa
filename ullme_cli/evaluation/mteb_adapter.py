"""The Embedder in mteb 2.x's encoder protocol. mteb's query/document prompt type maps to our kind."""

from __future__ import annotations

from typing import Any

import numpy as np

from ullme_cli.evaluation.instructions import instruction_for


def mteb_model_name(name: str) -> str:
    return name if "/" in name else f"ullme/{name}"


def model_meta(embedder, name: str, revision: str):
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta.create_empty(
        overwrites={
            "name": mteb_model_name(name), "revision": revision, "embed_dim": embedder.dim,
            "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"], "open_weights": True,
            "max_tokens": embedder.setup.max_length, "use_instructions": True, "modalities": ["text"],
        }
    )  # fmt: skip


def make_encoder(embedder, instruction_table: dict, name: str, revision: str):
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType

    class UllmeEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.embedder = embedder
            self.mteb_model_meta = model_meta(embedder, name, revision)

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs: Any) -> np.ndarray:
            texts = [text for batch in inputs for text in batch["text"]]
            if prompt_type == PromptType.document:
                return self.embedder.encode(texts, kind="passage")
            # Queries, and symmetric tasks (STS, clustering) whose texts play both roles, take the instruction.
            instruction = instruction_for(instruction_table, task_metadata.name, task_metadata.type)
            return self.embedder.encode(texts, kind="query", instruction=instruction)

    return UllmeEncoder()
