"""An ONNX graph that `ullme export --format onnx` wrote, opened in ONNX Runtime (models/onnx_export.py writes it).

The graph runs from token ids to the finished vector: inputs `input_ids`, `attention_mask` and
`pooling_mask` (the tokens pooled), int64 (batch, tokens); output `sentence_embedding`, float32 (batch, dim).
It fixes the pooling, the attention and the normalisation; the tokenizer side (instructions, max_length)
stays outside and follows the setup. An Embedder holding an `OnnxGraph` runs it instead of torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import ONNX_KEY, SETUP_FILE, ModelSetup, Runtime
from ullme_cli.models.folder import folder_record

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "pooling_mask")
OUTPUT = "sentence_embedding"
GRAPH_FIELDS = ("pooling", "attention", "normalize")  # what the graph fixes


def is_onnx_folder(source: str) -> bool:
    folder = Path(source)
    return folder.is_dir() and (folder / ONNX_FILE).is_file() and (folder / SETUP_FILE).is_file()


def session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UllmeError("the ONNX backend needs its extra: pip install 'ullme[onnx]'") from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(graph_session, batch) -> np.ndarray:
    """The vectors of a collated batch (embedder.Batch)."""
    feed = {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy(), "pooling_mask": batch.content_mask.numpy()}
    return graph_session.run([OUTPUT], feed)[0]


class OnnxGraph:
    """A session and what `ullme.json` records of its graph (file, quantization, dim, the export's check)."""

    def __init__(self, graph_session, record: dict):
        self.session, self.record = graph_session, record

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    @property
    def compute_dtype(self) -> str:
        return self.record.get("quantize") or "float32"

    def run(self, batch) -> np.ndarray:
        return run(self.session, batch)


def open_graph(source: str, setup: ModelSetup, runtime: Runtime) -> OnnxGraph:
    """The graph of the ONNX folder `source`, refused where the runtime or the setup asks for what it does not hold."""
    saved = folder_record(source)
    record = saved.get(ONNX_KEY) or {}
    computes = record.get("quantize") or "float32"
    if runtime.device not in ("auto", "cpu"):
        raise UllmeError(f"{source}: an ONNX folder runs on the CPU here (ONNX Runtime's CPU provider); --device {runtime.device} is not offered")
    if runtime.dtype not in ("auto", computes):
        raise UllmeError(f"{source}: this ONNX graph computes in {computes}; --dtype {runtime.dtype} needs another export")
    changed = [f"{field} {getattr(setup, field)!r} (the graph's: {saved.get(field)!r})" for field in GRAPH_FIELDS if getattr(setup, field) != saved.get(field)]
    if changed:
        raise UllmeError(f"{source}: the ONNX graph fixes pooling, attention and normalisation; asked for {', '.join(changed)}: export again with that setup")
    log.debug(f"ONNX Runtime runs {Path(source) / record.get('file', ONNX_FILE)} ({computes})")
    return OnnxGraph(session(Path(source) / record.get("file", ONNX_FILE)), record)
