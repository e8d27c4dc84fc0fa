"""The sentence-transformers module of an ullme folder (see st_export.py): the Embedder behind ST's API."""

from __future__ import annotations

from pathlib import Path

import torch
from sentence_transformers.base.modules.input_module import InputModule

from ullme_cli.model_setup import Runtime, resolve_setup
from ullme_cli.models.folder import write_folder


class UllmeSentenceModule(InputModule):
    """sentence-transformers module around an Embedder: preprocess (prompt = instruction prefix) and forward."""

    save_in_root = True

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.model = embedder.model  # registered, so that sentence-transformers' .to(device) moves them
        self.pooler = embedder.pooler
        self.tokenizer = embedder.tokenizer

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        texts = [t if isinstance(t, str) else " ".join(t) for t in inputs]
        batch = self.embedder.collate(self.embedder.tokenize_prefixed(texts, prompt or ""))
        return {"input_ids": batch.input_ids.cpu(), "attention_mask": batch.attention_mask.cpu(), "content_mask": batch.content_mask.cpu()}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        from ullme_cli.models.embedder import Batch

        self.embedder.device = features["input_ids"].device
        batch = Batch(features["input_ids"], features["attention_mask"], features["content_mask"])
        features["sentence_embedding"] = self.embedder.embed(batch)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedder.dim

    get_sentence_embedding_dimension = get_embedding_dimension  # the name before sentence-transformers 6

    def save(self, output_path: str, *args, **kwargs) -> None:
        write_folder(self.embedder, Path(output_path), Path(output_path).name)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", *args, **kwargs) -> "UllmeSentenceModule":
        from ullme_cli.models.embedder import load_embedder

        folder = Path(model_name_or_path) / subfolder
        if not folder.is_dir():
            from huggingface_hub import (
                snapshot_download,  # a hub id: fetch the files, then the same local load
            )

            folder = Path(snapshot_download(model_name_or_path, local_files_only=kwargs.get("local_files_only", False)))
        return cls(load_embedder(resolve_setup(str(folder)), Runtime(dtype=requested_dtype(kwargs.get("model_kwargs")), device="cpu")))


def requested_dtype(model_kwargs: dict | None) -> str:
    """The dtype sentence-transformers' `model_kwargs` asks for (`dtype`, or the older `torch_dtype`), as
    ullme names it; "auto" (ullme's default for the device) when it asks for none."""
    wanted = (model_kwargs or {}).get("dtype", (model_kwargs or {}).get("torch_dtype", "auto"))
    if wanted in (None, "auto"):
        return "auto"
    return str(wanted).replace("torch.", "")
