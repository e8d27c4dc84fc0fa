"""Padding-free batches (issue 29 §2): the padded-token share that packing removes, and its speed here.

Tokens (no model run): for encode's plan (length-sorted batches within the default token budget, as
`Embedder.encode` makes them) and for training batches (each step embeds 8 queries, then 8 positives and 8
negatives, drawn at random as the trainer draws rows), on the demo corpus and on 2,000 mixed-length
passages (16–512 tokens, cut from the TREC QA test sentences laid end to end, seeded). Each line gives the
real tokens, the tokens as padded batches and as packed rows (`pack_rows`: rows as long as the batch's
longest text), and the share of padded tokens each leaves.

Speed (the default model, eager, its default dtype; run it with nothing else on the machine): encode of
--texts mixed passages padded and packed (texts/s, and the ratio), and a contrastive LoRA step (batch 8,
one hard negative) padded and packed, on the bundled TREC QA rows at max_length 64 and on rows of mixed
passages at max_length 512 (median seconds of --steps after a warm-up step, and the ratio). The vectors'
cosine between the two paths is printed beside.

Usage: python benchmarks/packing.py [--texts 300] [--steps 4] [--tokens-only]
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "ullme_cli" / "resources"


def mixed_passages(tokenizer, count: int = 2000, seed: int = 0) -> list[str]:
    """`count` passages of 16–512 tokens (uniform), cut from the TREC QA test sentences laid end to end."""
    sentences = [json.loads(line)["text"] for line in (RESOURCES / "trecqa-test" / "corpus.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    stream = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    passages, offset = [], 0
    for _ in range(count):
        length = rng.randint(16, 511)  # the tokenizer's BOS makes it 17–512
        if offset + length > len(stream):
            offset = 0
        passages.append(tokenizer.decode(stream[offset : offset + length]))
        offset += length
    return passages


def shares(name: str, batches: list[list[int]], lengths: list[int]) -> str:
    from ullme_cli.models.embedder import packed_share

    real, padded, packed = packed_share(batches, lengths)
    return (f"{name}: {real} real tokens; padded batches {padded} ({1 - real / padded:.1%} padding); "
            f"packed rows {packed} ({1 - real / packed:.1%} padding); packing removes {1 - packed / padded:.1%} of the tokens run")  # fmt: skip


def training_batches(rows: int, steps: int, batch: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(rows), batch) for _ in range(steps)]


def token_report(embedder) -> None:
    from ullme_cli.data import read_training_examples
    from ullme_cli.models.embedder import plan_batches

    demo = [json.loads(line)["text"] for line in (RESOURCES / "demo" / "corpus.jsonl").read_text().splitlines()]
    mixed = mixed_passages(embedder.tokenizer)
    for name, texts, max_length in (("demo corpus", demo, None), ("2,000 mixed passages", mixed, 512)):
        lengths = [len(t.ids) for t in embedder.tokenize(texts, "passage", max_length=max_length)]
        batches = plan_batches(lengths, embedder.default_token_budget)
        print(shares(f"encode, {name} ({len(texts)} texts, {len(batches)} batches)", batches, lengths))
        print(shares(f"training, {name} (100 random batches of 8 texts)", training_batches(len(texts), 100, 8), lengths))
    examples, _ = read_training_examples(str(RESOURCES / "trecqa-train" / "train.jsonl"))
    max_length = 64  # TREC QA's rows are under 64 tokens but for a few positives: 512 gives the same lines
    queries = [len(t.ids) for t in embedder.tokenize([e.query for e in examples], "query", max_length=max_length)]
    passages = [len(t.ids) for t in embedder.tokenize([e.positives[0] for e in examples], "passage", max_length=max_length)]
    steps = training_batches(len(examples), 100, 8)
    for name, lengths in (("queries", queries), ("positives", passages)):
        print(shares(f"training, TREC QA rows' {name} at max_length {max_length} (100 random batches of 8)", steps, lengths))


def encode_speed(embedder, texts: list[str]) -> None:
    import numpy as np

    embedder.encode(texts[:16])  # warm-up
    vectors, rates = {}, {}
    for packing in (False, True):
        embedder.packing = packing
        started = time.perf_counter()
        vectors[packing] = embedder.encode(texts)
        rates[packing] = len(texts) / (time.perf_counter() - started)
    embedder.packing = False
    cosine = (vectors[False] * vectors[True]).sum(1) / np.linalg.norm(vectors[False], axis=1) / np.linalg.norm(vectors[True], axis=1)
    print(f"encode {len(texts)} mixed passages ({embedder.compute_dtype}): padded {rates[False]:.1f} texts/s, packed {rates[True]:.1f} texts/s, "
          f"packed/padded {rates[True] / rates[False]:.2f}x; cosine mean {cosine.mean():.6f}, min {cosine.min():.6f}")  # fmt: skip


def step_speed(embedder, examples, max_length: int, steps: int, name: str, autocast) -> None:
    import torch

    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    embedder.setup = embedder.setup.replace(max_length=max_length)
    step = StepLoss(embedder, LossSection(weights={"contrastive": 1.0}), 1, 0)
    times = {}
    for packing in (False, True):
        embedder.packing = packing
        taken = []
        for i in range(steps + 1):
            batch = [examples[(i * 8 + j) % len(examples)] for j in range(8)]
            generator = torch.Generator().manual_seed(i)
            started = time.perf_counter()
            with autocast():
                step.backward(batch, generator)
            embedder.model.zero_grad(set_to_none=True)
            taken.append(time.perf_counter() - started)
        times[packing] = statistics.median(taken[1:])
    embedder.packing = False
    print(f"contrastive step, {name}, max_length {max_length}, batch 8: padded {times[False]:.3f} s, packed {times[True]:.3f} s, "
          f"padded/packed {times[False] / times[True]:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=300, help="mixed passages to encode for the speed line")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens-only", action="store_true")
    args = parser.parse_args()
    import contextlib

    import torch

    from ullme_cli.data import TrainingExample, read_training_examples
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.models.loading import cpu_name

    embedder = Embedder.load(compile=False, max_length=512)
    print(f"CPU: {cpu_name()}; model: {embedder.setup.model}, {embedder.compute_dtype}")
    token_report(embedder)
    if args.tokens_only:
        return
    mixed = mixed_passages(embedder.tokenizer)
    encode_speed(embedder, mixed[: args.texts])
    # Training as the recipes run it: float32 weights, bf16 autocast where the CPU computes bf16 fast.
    bf16 = embedder.compute_dtype == "bfloat16"
    trainee = Embedder.load(compile=False, dtype="float32")
    trainee.add_lora(r=16, alpha=32, dropout=0.0)
    trainee.model.train()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    print(f"training: float32 weights{', bf16 autocast' if bf16 else ''}, LoRA r=16")
    trec, _ = read_training_examples(str(RESOURCES / "trecqa-train" / "train.jsonl"))
    step_speed(trainee, trec, 64, args.steps, "TREC QA rows", autocast)
    rng = random.Random(1)
    rows = [TrainingExample(query=e.query, positives=[rng.choice(mixed)], negatives=[rng.choice(mixed)]) for e in trec]
    step_speed(trainee, rows, 512, args.steps, "rows of mixed passages", autocast)


if __name__ == "__main__":
    main()
