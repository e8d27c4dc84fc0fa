"""Does `torch.compile` with bucketed shapes make CPU encode faster? (issue 14's fusion lever)

About 40% of a CPU encode is elementwise work that transformers runs unfused (RMSNorm, rotary, SiLU gating,
residual adds). `torch.compile` fuses it, but compiles anew for every input shape. Here batches are padded
to a few shapes: lengths rounded up to a multiple of `--bucket` tokens, and every batch of one length to the
same number of rows (token budget // length). Rows: ullme's eager default (no padding to buckets), eager on
the bucketed batches (what the padding alone costs), compiled on the bucketed batches (static shapes, one
compile per bucket), and compiled with dynamic shapes (one compile, symbolic batch and length) on ullme's
own batches. Two levers that did not win are kept as rows (docs/benchmarks.md): `frozen`, the dynamic compile
with inductor's freezing (weights folded in as constants, linear weights prepacked), and `onednn`, eager with
every linear layer on oneDNN with its weight packed once (torch's own fp32 path calls MKL, which repacks per
call). `repeat` times the eager default a second time as a row of its own: the spread between two identical
rows is this machine's noise floor in the same run. Each row reports its compile time (the first pass over
the corpus, which meets every shape), the fastest of `--repeats` rounds that time every row once in turn, and
its vectors' cosine to the eager default.

Usage: OMP_NUM_THREADS=2 python benchmarks/compile_encode.py [--model smollm2-135m] [--limit N]
       [--max-length 128] [--bucket 32] [--repeats 2] [--rows static dynamic frozen onednn repeat]
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def bucketed_batches(tokenized, budget: int, bucket: int, max_length: int):
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


def compiled(embed, dynamic: bool, freezing: bool = False):
    """`embed` through `torch.compile`, in a function with a code object of its own: dynamo caches compiled
    graphs per code object, so two rows that compiled `Embedder.embed` itself (or one closure made twice) would
    run each other's graphs wherever the guards allow (a frozen row reused an unfrozen one's whole graph and
    never compiled). With `freezing`, inductor folds the weights in as constants; the flag is read when
    inductor compiles, which happens in the call, so `torch.compile(..., options={"freezing": True})` does not
    reach it (the weights stay graph inputs)."""
    import torch._inductor.config

    def call(batch):
        return embed(batch)

    call.__code__ = call.__code__.replace()  # a new code object, so a new dynamo cache
    compiled_embed = torch.compile(call, dynamic=dynamic)

    def run(batch):
        with torch._inductor.config.patch(freezing=freezing):
            return compiled_embed(batch)

    return run


class OneDNNLinear(torch.nn.Module):
    """nn.Linear's inference forward on oneDNN, with the weight packed once into its blocked layout."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def with_onednn_linears(embedder, rows_hint: int):
    for module in list(embedder.model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not embedder.model.get_output_embeddings():
                setattr(module, name, OneDNNLinear(child, rows_hint))
    return embedder


def main() -> None:
    from encode import add_corpus_arguments, interleaved, read_texts  # benchmarks/ is on sys.path when this script runs

    from ullme_cli.models.embedder import Embedder, plan_batches
    from ullme_cli.models.loading import cpu_name

    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    parser.add_argument("--bucket", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic", "frozen", "onednn", "repeat"], help="rows to run beside the eager default")
    args = parser.parse_args()
    texts = read_texts(args)
    embedder = Embedder.load(args.model, dtype="float32", max_length=args.max_length)
    budget = embedder.default_token_budget
    tokenized = embedder.tokenize(texts)
    own_plans = [(batch, len(batch), None) for batch in plan_batches([len(t.ids) for t in tokenized], budget)]
    bucket_plans = bucketed_batches(tokenized, budget, args.bucket, args.max_length)
    real = sum(len(t.ids) for t in tokenized)
    padded_tokens = sum(rows * length for _, rows, length in bucket_plans)
    own_tokens = sum(len(b) * max(len(tokenized[i].ids) for i in b) for b, _, _ in own_plans)
    shapes = sorted({(rows, length) for _, rows, length in bucket_plans})
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, float32, {len(texts)} texts, {real} tokens, max_length {args.max_length}, budget {budget}")
    print(f"padded tokens: ullme's batches {own_tokens} ({own_tokens / real:.2f}x the text), bucketed by {args.bucket}: "
          f"{padded_tokens} ({padded_tokens / real:.2f}x) in {len(shapes)} shapes")  # fmt: skip

    def row(name: str, embed, plans, padded: bool):
        return name, torch.float32, lambda: encode_with(embedder, embed, tokenized, plans, padded)

    encoders = [row("eager, ullme's batches (default)", embedder.embed, own_plans, False)]
    if "repeat" in args.rows:
        encoders.append(row("eager, ullme's batches (again)", embedder.embed, own_plans, False))
    if "static" in args.rows:
        encoders.append(row(f"eager, bucketed by {args.bucket}", embedder.embed, bucket_plans, True))
        encoders.append(row(f"compiled static, bucketed by {args.bucket}", compiled(embedder.embed, dynamic=False), bucket_plans, True))
    if "dynamic" in args.rows:  # what `ullme encode --compile` runs
        encoders.append(row("compiled dynamic, ullme's batches", compiled(embedder.embed, dynamic=True), own_plans, False))
    if "frozen" in args.rows:
        other = Embedder.load(args.model, dtype="float32", max_length=args.max_length)
        encoders.append(row("compiled dynamic + freezing", compiled(other.embed, dynamic=True, freezing=True), own_plans, False))
    if "onednn" in args.rows:
        other = with_onednn_linears(Embedder.load(args.model, dtype="float32", max_length=args.max_length), budget)
        encoders.append(row("eager, oneDNN packed linears", other.embed, own_plans, False))
    timed, firsts = interleaved(encoders, args.repeats)  # each compiled row compiles in its first pass
    print(f"{'encoder':<40}{'first pass s':>13}{'texts/s':>9}{'vs default':>11}{'cos mean':>10}{'cos min':>9}")
    reference, default_seconds = timed[0][3], timed[0][2]
    for (name, _, seconds, found), first in zip(timed, firsts):
        cosine = (found * reference).sum(1) / (np.linalg.norm(found, axis=1) * np.linalg.norm(reference, axis=1))
        print(f"{name:<40}{first:>13.1f}{len(texts) / seconds:>9.1f}{default_seconds / seconds:>10.2f}x{cosine.mean():>10.5f}{cosine.min():>9.5f}")


if __name__ == "__main__":
    main()
