"""The ONNX Runtime rows of benchmarks/encode.py: the fastest CPU routes a sentence-transformers user has.
Runs inside a side environment (`sentence-transformers[onnx]`, whose optimum and onnxruntime pins may
clash with ullme's), never in ullme's own. Reads a JSON job on stdin and prints one JSON line per row.

Rows, on the same sentence-transformers folder (same weights, mean pooling, max length):
- `backend="onnx"`: sentence-transformers exports the model to ONNX and runs it in fp32;
- `backend="onnx"` with `export_dynamic_quantized_onnx_model(model, <config>, folder)`: sentence-transformers'
  own dynamic int8 quantization (int8 weights, activations quantized at run time), loaded through
  `model_kwargs={"file_name": ...}` as its documentation shows.

Job: {"folder": sentence-transformers folder (written into: onnx/ is added), "texts": [...],
     "max_length": int, "repeats": int, "quantization": "avx2" | "avx512" | "avx512_vnni" | "arm64",
     "out": path prefix for the vectors (.npy per row)}
"""

import json
import sys
import time
from importlib.metadata import version

import numpy as np


def timed_encode(model, texts, repeats):
    model.encode(texts[:8], batch_size=32)  # warm-up
    seconds, vectors = float("inf"), None
    for _ in range(repeats):  # the fastest run, as for the other rows
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        seconds = min(seconds, time.perf_counter() - start)
    return np.asarray(vectors, dtype=np.float32), seconds


def main() -> None:
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    job = json.load(sys.stdin)
    folder, texts = job["folder"], job["texts"]
    versions = f"st {version('sentence-transformers')}, onnxruntime {version('onnxruntime')}"
    model = SentenceTransformer(folder, backend="onnx", device="cpu")
    model.max_seq_length = job["max_length"]
    vectors, seconds = timed_encode(model, texts, job["repeats"])
    np.save(f"{job['out']}-onnx.npy", vectors)
    print(json.dumps({"name": f"sentence-transformers onnx fp32 ({versions})", "seconds": seconds, "vectors": f"{job['out']}-onnx.npy"}), flush=True)

    config = job.get("quantization", "avx2")
    export_dynamic_quantized_onnx_model(model, config, folder)
    quantized = SentenceTransformer(folder, backend="onnx", device="cpu", model_kwargs={"file_name": f"onnx/model_qint8_{config}.onnx"})
    quantized.max_seq_length = job["max_length"]
    vectors, seconds = timed_encode(quantized, texts, job["repeats"])
    np.save(f"{job['out']}-int8.npy", vectors)
    print(json.dumps({"name": f"sentence-transformers onnx int8 dynamic ({config})", "seconds": seconds, "vectors": f"{job['out']}-int8.npy"}), flush=True)


if __name__ == "__main__":
    main()
