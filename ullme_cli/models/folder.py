"""An Embedder folder's own file, `ullme.json`: written here and read here.

It holds the folder's ModelSetup (model_setup.py; the fingerprint is left out, since it describes the
files and is computed from them on load) and what the folder carries beside its weights: the base an
adapter-only folder was trained on (`base`), the sizes a Matryoshka run trained (`matryoshka_dims`), and
an ONNX export's graph record (`onnx`). `Embedder.save` and `ullme export --format onnx` write it through
`write_setup_file`; loading reads it through the functions below (model_setup.read_setup_file parses and
checks the JSON once per content).
"""

from __future__ import annotations

import json
from pathlib import Path

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import BASE_KEY, MATRYOSHKA_KEY, ONNX_KEY, SETUP_FILE, SETUP_FORMAT, ModelSetup, read_setup_file


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
