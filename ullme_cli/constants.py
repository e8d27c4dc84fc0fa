"""Names shared by the CLI and the core; importing this module loads no heavy library."""

import os
from pathlib import Path

__version__ = "0.1.0"
DEFAULT_MODEL = "smollm2-135m"
POOLINGS = ("mean", "weighted-mean", "last-token", "cls", "latent-attention", "latent-attention-paper")
ATTENTION_MODES = ("bidirectional", "causal")
KINDS = ("query", "passage")
# auto: ONNX Runtime for a folder `ullme export --format onnx` wrote, torch for any other (models/onnx_graph.py)
BACKENDS = ("auto", "torch", "onnx")
EXPORT_FORMATS = ("folder", "onnx", "gguf")  # `ullme export --format`
GGUF_QUANTS = ("f16", "f32", "q8_0")  # `ullme export --format gguf --quant`
ON_LONG = ("truncate", "error")  # what encode does with a text longer than max_length
SERVE_ON_LONG = (*ON_LONG, "mean")  # serve also chunks an over-long input and pools its windows (models/chunking.py)
INPUT_FORMATS = ("auto", "jsonl", "tsv", "text", "csv", "parquet", "dataset")  # what the one reader (io/rows.py) reads
CHUNK_POOLS = ("none", "mean")  # encode --chunk-pool: one vector per window, or their token-weighted mean per text


def cache_root():
    """Where ullme keeps what it can make again (converted GGUF models, file digests): $ULLME_CACHE."""
    return Path(os.environ.get("ULLME_CACHE", Path.home() / ".cache" / "ullme"))
