"""ullme models in mteb 2.x: `MtebEncoder` implements mteb's `EncoderProtocol` around an Embedder.

`mteb.evaluate(ullme_cli.load(folder), tasks)` works because the Embedder itself answers the protocol by
delegating to this class; `ullme evaluate` uses the same class. mteb's query/document prompt type maps to
ullme's kind, and each task takes its instruction from the instruction table.

Only mteb's public modules are used here (`mteb.models`, `mteb.types`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ullme_cli.instructions import instruction_for, load_instruction_table
from ullme_cli.models.model_card import describe_base, read_training
from ullme_cli.recipes import Source


def mteb_model_name(name: str) -> str:
    return name if "/" in name else f"ullme/{name}"


def setup_revision(setup) -> str:
    """The model revision mteb records: a key of the setup record, which includes the weights' fingerprint."""
    return hashlib.sha256(json.dumps(setup.record(), sort_keys=True).encode()).hexdigest()[:24]


def display_name(setup) -> str:
    """The model's name for mteb and model cards: a hub id as it is, a local folder by its last part."""
    source = setup.model
    return Path(source).name if Path(source).is_absolute() or Path(source).exists() else source


def model_meta(embedder, name: str | None = None, revision: str | None = None):
    """mteb's ModelMeta, with what mteb's leaderboard reads, validated by mteb's own model (pydantic):
    size (parameters, memory at the loaded dtype), dimension, max tokens, frameworks, the hub page of the
    base model where it is a hub id, cosine similarity, instructions, and the training data by source."""
    from mteb.models import ModelMeta
    from mteb.models.model_meta import ScoringFunction

    setup = embedder.setup
    parameters = [*embedder.model.parameters(), *embedder.pooler.parameters()]

    source = getattr(embedder, "source", None)
    training = embedder.training or (read_training(Path(source)) if source else None) or {}
    base = training.get("base_model") or describe_base(setup.model, source or setup.model)["base_model"]
    data = training.get("data") or {}
    train_sources = data.get("sources") or ([data["train"]] if data.get("train") else [])
    return ModelMeta.model_validate({
        "loader": None, "name": mteb_model_name(name or display_name(setup)), "revision": revision or setup_revision(setup),
        "release_date": None, "languages": None,
        "n_parameters": sum(p.numel() for p in parameters),
        "n_embedding_parameters": embedder.model.get_input_embeddings().weight.numel(),
        "memory_usage_mb": round(sum(p.numel() * p.element_size() for p in parameters) / 2**20, 1),
        "max_tokens": setup.max_length, "embed_dim": embedder.dim, "license": None, "open_weights": True,
        "public_training_code": None, "public_training_data": None, "framework": ["Sentence Transformers", "PyTorch"],
        "reference": f"https://huggingface.co/{base}" if base else None,
        "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": True,
        "training_datasets": {Source(path).name for path in train_sources} or None,
        "adapted_from": base if training else None, "superseded_by": None, "modalities": ["text"],
    })  # fmt: skip


def _unit_rows(x) -> torch.Tensor:
    rows = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return torch.nn.functional.normalize(rows.reshape(-1, rows.shape[-1]), dim=-1)


def cosine_matrix(a, b) -> torch.Tensor:
    """[n, m] cosine similarities, as sentence-transformers' `similarity` returns them."""
    return _unit_rows(a) @ _unit_rows(b).T


def cosine_pairwise(a, b) -> torch.Tensor:
    return (_unit_rows(a) * _unit_rows(b)).sum(-1)


class MtebEncoder:
    """An Embedder in mteb's encoder protocol (`encode`, `similarity`, `similarity_pairwise`, `mteb_model_meta`).

    `instructions`: the per-task instruction table (a YAML path or a loaded dict; None: the shipped one).
    `name`/`revision`: what mteb files the results under (default: from the setup record).
    """

    def __init__(self, embedder, instructions: dict | str | None = None, name: str | None = None, revision: str | None = None):
        self.embedder = embedder
        self.instructions = instructions if isinstance(instructions, dict) else load_instruction_table(instructions)
        self.mteb_model_meta = model_meta(embedder, name, revision)

    def encode(self, inputs, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None, **kwargs: Any) -> np.ndarray:
        from mteb.types import PromptType

        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == PromptType.document:
            return self.embedder.encode(texts, kind="passage")
        # Queries, and symmetric tasks (STS, clustering) whose texts play both roles, take the instruction.
        instruction = instruction_for(self.instructions, task_metadata.name, task_metadata.type)
        return self.embedder.encode(texts, kind="query", instruction=instruction)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        return cosine_matrix(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        return cosine_pairwise(embeddings1, embeddings2)
