"""The LLM2Vec row of benchmarks/encode.py. Runs inside a side environment with llm2vec and transformers
4.44 (llm2vec pins it), never in ullme's own. Reads a JSON job on stdin, writes vectors to an .npy file
and prints a JSON line with the seconds spent encoding.

Job: {"model": folder, "texts": [...], "max_length": int, "dtype": "bfloat16"|"float32", "out": path,
     "repeats": int (timed runs; the fastest is reported)}
"""

import json
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from llm2vec import LLM2Vec


def main() -> None:
    job = json.load(sys.stdin)
    model = LLM2Vec.from_pretrained(
        job["model"], enable_bidirectional=True, pooling_mode="mean", max_length=job["max_length"],
        torch_dtype=getattr(torch, job["dtype"]), device_map="cpu",
    )  # fmt: skip
    texts = job["texts"]
    model.encode(texts[:8], batch_size=32, show_progress_bar=False)  # warm-up
    seconds = float("inf")
    for _ in range(job.get("repeats", 1)):  # the fastest run, as for the other rows
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=32, show_progress_bar=False, convert_to_numpy=True)
        seconds = min(seconds, time.perf_counter() - start)
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(job["out"], vectors)
    print(json.dumps({"seconds": seconds, "llm2vec": version("llm2vec"), "transformers": version("transformers")}))


if __name__ == "__main__":
    main()
