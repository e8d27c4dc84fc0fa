"""Does `torch.compile` with bucketed shapes make CPU encode faster? (issue 14's fusion lever)

About 40% of a CPU encode is elementwise work that transformers runs unfused (RMSNorm, rotary, SiLU gating,
residual adds). `torch.compile` fuses it, but compiles anew for every input shape. Here batches are padded
to a few shapes: lengths rounded up to a multiple of `--bucket` tokens, and every batch of one length to the
same number of rows (token budget // length). Rows: ullme's eager default (no padding to buckets), eager on
the bucketed batches (what the padding alone costs), compiled on the bucketed batches (static shapes, one
compile per bucket), and compiled with dynamic shapes (one compile, symbolic batch and length) on ullme's
own batches. Each row reports its compile time (the first pass over the corpus, which meets every shape),
the fastest of `--repeats` rounds that time every row once in turn, and its vectors' cosine to the eager default.

Usage: OMP_NUM_THREADS=2 python benchmarks/compile_encode.py [--model smollm2-135m] [--limit N]
       [--max-length 128] [--bucket 32] [--repeats 2] [--rows static dynamic]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def bucketed_batches(embedder, tokenized, budget: int, bucket: int, max_length: int):
    """(indices, rows, length) per batch: each length rounded up to the bucket, rows = budget // length."""
    from ullme_cli.models.embedder import plan_batches

    padded = [min(-(-len(t.ids) // bucket) * bucket, -(-max_length // bucket) * bucket) for t in tokenized]
    plans = []
    for batch in plan_batches(padded, budget):
        length = padded[batch[0]]
        rows = max(1, budget // length)
        for start in range(0, len(batch), rows):
            plans.append((batch[start : start + rows], rows, length))
    return plans


def padded_batch(embedder, items, rows: int, length: int):
    batch = embedder.collate(items)
    extra_rows, extra_length = rows - batch.input_ids.shape[0], length - batch.input_ids.shape[1]
    pad = embedder.tokenizer.pad_token_id
    grow = (0, extra_length, 0, extra_rows)
    return type(batch)(F.pad(batch.input_ids, grow, value=pad), F.pad(batch.attention_mask, grow), F.pad(batch.content_mask, grow))


def encode_with(embedder, embed, tokenized, plans, padded: bool) -> np.ndarray:
    out = np.zeros((len(tokenized), embedder.dim), dtype=np.float32)
    with torch.inference_mode():
        for indices, rows, length in plans:
            items = [tokenized[i] for i in indices]
            batch = padded_batch(embedder, items, rows, length) if padded else embedder.collate(items)
            out[indices] = embed(batch)[: len(indices)].float().numpy()
    return out


def main() -> None:
    from ullme_cli.data import read_corpus
    from ullme_cli.models.embedder import Embedder, plan_batches
    from ullme_cli.models.loading import cpu_name

    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", default=str(root / "ullme_cli" / "resources" / "demo" / "corpus.jsonl"))
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--bucket", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N texts (0: all)")
    parser.add_argument("--rows", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic"], help="compiled rows to run")
    args = parser.parse_args()
    texts = [record.text for record in read_corpus(args.texts)][: args.limit or None]
    embedder = Embedder.load(args.model, dtype="float32", max_length=args.max_length)
    budget = embedder.default_token_budget
    tokenized = embedder.tokenize(texts)
    own_plans = [(batch, len(batch), None) for batch in plan_batches([len(t.ids) for t in tokenized], budget)]
    bucket_plans = bucketed_batches(embedder, tokenized, budget, args.bucket, args.max_length)
    real = sum(len(t.ids) for t in tokenized)
    padded_tokens = sum(rows * length for _, rows, length in bucket_plans)
    own_tokens = sum(len(b) * max(len(tokenized[i].ids) for i in b) for b, _, _ in own_plans)
    shapes = sorted({(rows, length) for _, rows, length in bucket_plans})
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, float32, {len(texts)} texts, {real} tokens, max_length {args.max_length}, budget {budget}")
    print(f"padded tokens: ullme's batches {own_tokens} ({own_tokens / real:.2f}x the text), bucketed by {args.bucket}: "
          f"{padded_tokens} ({padded_tokens / real:.2f}x) in {len(shapes)} shapes")  # fmt: skip

    rows = [("eager, ullme's batches (default)", embedder.embed, own_plans, False),
            (f"eager, bucketed by {args.bucket}", embedder.embed, bucket_plans, True)]  # fmt: skip
    if "static" in args.rows:
        rows.append((f"compiled static, bucketed by {args.bucket}", torch.compile(embedder.embed, dynamic=False), bucket_plans, True))
    if "dynamic" in args.rows:  # what `ullme encode --compile` runs
        rows.append(("compiled dynamic, ullme's batches", torch.compile(embedder.embed, dynamic=True), own_plans, False))
    # First passes in order (each compiled row compiles here), then `--repeats` rounds that time every row once
    # in turn, so that a drift of the machine touches all rows alike; each row keeps its fastest round.
    print(f"{'encoder':<40}{'first pass s':>13}{'texts/s':>9}{'vs default':>11}{'cos mean':>10}{'cos min':>9}")
    firsts, vectors, best = [], [], [float("inf")] * len(rows)
    for name, embed, plans, padded in rows:
        start = time.perf_counter()
        vectors.append(encode_with(embedder, embed, tokenized, plans, padded))
        firsts.append(time.perf_counter() - start)
    for _ in range(args.repeats):
        for n, (name, embed, plans, padded) in enumerate(rows):
            start = time.perf_counter()
            encode_with(embedder, embed, tokenized, plans, padded)
            best[n] = min(best[n], time.perf_counter() - start)
    reference = vectors[0]
    for (name, *_), first, seconds, found in zip(rows, firsts, best, vectors):
        cosine = (found * reference).sum(1) / (np.linalg.norm(found, axis=1) * np.linalg.norm(reference, axis=1))
        print(f"{name:<40}{first:>13.1f}{len(texts) / seconds:>9.1f}{best[0] / seconds:>10.2f}x{cosine.mean():>10.5f}{cosine.min():>9.5f}")

if __name__ == "__main__":
    main()
