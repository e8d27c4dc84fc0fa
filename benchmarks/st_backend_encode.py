"""The ONNX Runtime and OpenVINO rows of benchmarks/encode.py: the fastest CPU routes a sentence-transformers
user has. Runs inside a side environment (`sentence-transformers[onnx]` or `sentence-transformers[openvino]`,
whose optimum pins may clash with ullme's), never in ullme's own. Reads a JSON job on stdin and prints one
JSON line per row.

Rows, on the same weights (a model folder in the form this environment's transformers reads), mean
pooling and max length:
- backend "onnx": `backend="onnx"`, sentence-transformers exports the model to ONNX and runs it in fp32;
  then `export_dynamic_quantized_onnx_model(model, <config>, folder)`: sentence-transformers' own dynamic
  int8 quantization (int8 weights, activations quantized at run time), loaded through
  `model_kwargs={"file_name": ...}` as its documentation shows.
- backend "openvino": `backend="openvino"`, exported to OpenVINO IR and run in fp32. (Its int8 route,
  `export_static_quantized_openvino_model`, calibrates on a dataset it downloads from the Hub, which this
  offline benchmark cannot do.)

Job: {"backend": "onnx" | "openvino", "model": model folder (an onnx/ or openvino/ folder is written into it),
     "texts": [...], "max_length": int, "repeats": int,
     "quantization": "avx2" | "avx512" | "avx512_vnni" | "arm64" (onnx only), "out": path prefix for the vectors}
Output lines: {"reference": npy} (sentence-transformers on torch, fp32, in this environment: the accuracy
reference of the rows), then {"name", "seconds", "vectors"} per row.
"""

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np


def timed_encode(model, texts, repeats):
    model.encode(texts[:8], batch_size=32)  # warm-up
    seconds, vectors = float("inf"), None
    for _ in range(repeats):  # the fastest run, as for the other rows
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        seconds = min(seconds, time.perf_counter() - start)
    return np.asarray(vectors, dtype=np.float32), seconds


def supply_position_ids(model_class) -> None:
    """Out of the box, the route fails on this model: optimum exports Llama-family models with a
    `position_ids` input that sentence-transformers never passes ("Input position_ids is required by model
    but not provided", optimum-onnx 0.1 with sentence-transformers 5.7). Supply it the way optimum itself
    supplies missing `token_type_ids`: positions counted over the attention mask (right padding)."""
    import torch

    forward = model_class.forward

    def with_positions(self, input_ids=None, attention_mask=None, *args, position_ids=None, **kwargs):
        if position_ids is None and "position_ids" in self.input_names and attention_mask is not None:
            position_ids = (torch.as_tensor(attention_mask).cumsum(-1) - 1).clamp(min=0)
        return forward(self, input_ids, attention_mask, *args, position_ids=position_ids, **kwargs)

    model_class.forward = with_positions


def build(folder: str, max_length: int, backend: str, file_name: str | None = None):
    from sentence_transformers import SentenceTransformer, models

    kwargs = {"backend": backend, "model_kwargs": {"file_name": file_name}} if file_name else {"backend": backend}
    transformer = models.Transformer(folder, max_seq_length=max_length, **kwargs)
    if transformer.tokenizer.pad_token is None:
        transformer.tokenizer.pad_token = transformer.tokenizer.eos_token
    return SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean")], device="cpu")


def onnx_rows(job: dict, versions: str) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import export_dynamic_quantized_onnx_model

    supply_position_ids(ORTModelForFeatureExtraction)
    folder, texts, out = job["model"], job["texts"], job["out"]
    model = build(folder, job["max_length"], "onnx")  # exports the model to ONNX first
    vectors, seconds = timed_encode(model, texts, job["repeats"])
    np.save(f"{out}-onnx.npy", vectors)
    print(json.dumps({"name": f"sentence-transformers onnx fp32 ({versions})", "seconds": seconds, "vectors": f"{out}-onnx.npy"}), flush=True)

    config = job.get("quantization", "avx2")
    export_dynamic_quantized_onnx_model(model, config, folder)  # writes <folder>/onnx/model_q(u)int8_<config>.onnx
    written = next(Path(folder, "onnx").glob(f"model_*int8_{config}.onnx"))  # avx2 stores weights as quint8
    quantized = build(folder, job["max_length"], "onnx", f"onnx/{written.name}")
    vectors, seconds = timed_encode(quantized, texts, job["repeats"])
    np.save(f"{out}-int8.npy", vectors)
    print(json.dumps({"name": f"sentence-transformers onnx int8 dynamic ({config})", "seconds": seconds, "vectors": f"{out}-int8.npy"}), flush=True)


def openvino_rows(job: dict, versions: str) -> None:
    from optimum.intel import OVModelForFeatureExtraction

    supply_position_ids(OVModelForFeatureExtraction)
    model = build(job["model"], job["max_length"], "openvino")  # exports the model to OpenVINO IR first
    vectors, seconds = timed_encode(model, job["texts"], job["repeats"])
    np.save(f"{job['out']}-openvino.npy", vectors)
    print(json.dumps({"name": f"sentence-transformers openvino fp32 ({versions})", "seconds": seconds, "vectors": f"{job['out']}-openvino.npy"}), flush=True)


def main() -> None:
    job = json.load(sys.stdin)
    backend = job.get("backend", "onnx")
    runtime = "onnxruntime" if backend == "onnx" else "openvino"
    versions = f"st {version('sentence-transformers')}, {runtime} {version(runtime)}"
    # The accuracy reference: the same route on torch in fp32, in this environment (same tokenizer code).
    reference = build(job["model"], job["max_length"], "torch").encode(job["texts"], batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    np.save(f"{job['out']}-reference.npy", np.asarray(reference, dtype=np.float32))
    print(json.dumps({"reference": f"{job['out']}-reference.npy"}), flush=True)
    (onnx_rows if backend == "onnx" else openvino_rows)(job, versions)


if __name__ == "__main__":
    main()
