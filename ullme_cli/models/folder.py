"""An Embedder folder, written here, and its own file `ullme.json`, written and read here.

`write_folder` writes a whole folder: the weights (or an adapter only, beside the base it names), the tokenizer, a
latent head, ullme.json, the sentence-transformers files (st_export.py) and the card (model_card.py).
`Embedder.save` calls it into a staging folder renamed into place; sentence-transformers' `save` calls it
through ullme's module (st_module.py).

ullme.json holds the folder's ModelSetup (model_setup.py; the fingerprint is left out, since it describes the
files and is computed from them on load) and what the folder carries beside its weights: the base an
adapter-only folder was trained on (`base`), the sizes a Matryoshka run trained (`matryoshka_dims`), and
an ONNX export's graph record (`onnx`). `write_folder` and `ullme export --format onnx` write it through
`write_setup_file`; loading reads it through the functions below (model_setup.read_setup_file parses and
checks the JSON once per content).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import BASE_KEY, MATRYOSHKA_KEY, ONNX_KEY, SETUP_FILE, SETUP_FORMAT, ModelSetup, read_setup_file
from ullme_cli.models.model_card import write_model_card
from ullme_cli.models.st_export import write_sentence_transformers_files

ADAPTER_DIR = "adapter"  # a self-contained folder's LoRA adapter, beside its base weights


def write_setup_file(folder: Path, setup: ModelSetup, base: dict | None = None, matryoshka_dims: list | None = None, onnx: dict | None = None) -> dict:
    """Write `folder/ullme.json`; returns the record written."""
    record = {"ullme_format": SETUP_FORMAT, **{k: v for k, v in setup.record().items() if k not in ("model", "fingerprint")}}
    if base:
        record[BASE_KEY] = base
    if matryoshka_dims:
        record[MATRYOSHKA_KEY] = matryoshka_dims
    if onnx:
        record[ONNX_KEY] = onnx
    (Path(folder) / SETUP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def has_setup_file(folder: str | Path) -> bool:
    return (Path(folder) / SETUP_FILE).is_file()


def folder_record(folder: str | Path) -> dict:
    """The checked content of `folder/ullme.json` ({} for a folder without one)."""
    return read_setup_file(Path(folder) / SETUP_FILE) if has_setup_file(folder) else {}


def matryoshka_dims(folder: str | Path) -> list | None:
    """The sizes a Matryoshka run trained (None: the full size only)."""
    return folder_record(folder).get(MATRYOSHKA_KEY)


def adapter_record(folder: str | Path) -> dict | None:
    """The base that an adapter-only folder names in its ullme.json (None for any other folder)."""
    record = folder_record(folder).get(BASE_KEY)
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("model"), str) and isinstance(record.get("fingerprint"), str)):
        raise UllmeError(f"{Path(folder) / SETUP_FILE}: field '{BASE_KEY}' must be {{\"model\": ..., \"fingerprint\": ...}}")
    return record


def write_folder(embedder, staging: Path, name: str, merge_lora: bool = False, reference_base: bool = False) -> None:
    """Write `embedder` into the folder `staging` (`Embedder.save` makes it atomic; sentence-transformers' save
    writes its module here too): the weights, or with `reference_base` an adapter only; the tokenizer, a latent
    head, ullme.json, the sentence-transformers files and the card. `name` is the folder's name, for the card.
    With `merge_lora` the adapter is merged into the embedder's own weights first."""
    model = embedder.model
    if embedder.has_adapter and merge_lora:
        model = model.merge_and_unload()
        embedder.model = model
    base_record = embedder.base_record if embedder.has_adapter and reference_base else None
    adapter_layout = None  # for an adapter-only folder: can sentence-transformers load its adapter ("stock") or not ("module")
    if base_record and base_record.get("fingerprint"):
        # The adapter alone, in peft's layout at the root: ullme finds the base again by name and checks its
        # fingerprint (loading.py); sentence-transformers loads it through the adapter config.
        model.save_pretrained(staging, safe_serialization=True)
        adapter_layout = "stock" if portable_adapter_config(staging, model, base_record["model"]) else "module"
    elif embedder.has_adapter:
        base = model.get_base_model()
        # The base weights are the frozen originals: strip the LoRA wrappers' names to save them plainly.
        state = {
            k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k
        }
        base.save_pretrained(staging, state_dict=state, safe_serialization=True)
        model.save_pretrained(staging / ADAPTER_DIR, safe_serialization=True)
    else:
        model.save_pretrained(staging, safe_serialization=True)
    embedder.tokenizer.save_pretrained(staging)
    if embedder.setup.pooling.startswith("latent-attention"):
        embedder.pooler.latent.save(staging)
    # The fingerprint describes files, and is computed from them when the folder is loaded.
    write_setup_file(staging, embedder.setup, base_record if base_record and base_record.get("fingerprint") else None, embedder.matryoshka_dims)

    route = write_sentence_transformers_files(staging, embedder, adapter_layout)
    write_model_card(staging, embedder, name, route)


def portable_adapter_config(folder: Path, model, base: str) -> bool:
    """Make the adapter config that peft wrote load on the base body as well as on the causal LM.

    peft records the targets as full module names of the causal LM (`model.layers.0.self_attn.q_proj`);
    sentence-transformers loads the body alone (`layers.0.self_attn.q_proj`), where those names match
    nothing. The last name parts match the same modules in both, which is checked here, so the adapter can
    never land on other layers than it was trained on. `base_model_name_or_path` is the base ullme checked.
    Returns whether the targets could be written so (if not, the folder keeps ullme's module for
    sentence-transformers: st_export.py)."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    targets = config.get("target_modules")
    portable = False
    if isinstance(targets, list):
        suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
        names = [n for n, _ in model.get_base_model().named_modules()]
        matched = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes) and not re.search(r"\.lora_|\.base_layer", n)}
        if matched == set(targets):
            config["target_modules"], portable = suffixes, True
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return portable
