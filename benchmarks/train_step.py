"""Step time and peak memory of training steps on one batch: contrastive, DPO and GRL, with and without
GradCache, on the same model, batch and LoRA settings.

Each configuration runs in its own process so that its peak resident memory (ru_maxrss) is its own.
Prints seconds per step (median of --steps after one warm-up step), peak RSS, the ratio to the
contrastive step, and the step's FLOPs (torch's FlopCounterMode, forward and backward, padding included)
with their ratio to the contrastive step's: the part of the time ratio that is the work itself.
Usage: python benchmarks/train_step.py [--model smollm2-135m] [--batch 8] [--steps 3] [--mixed-precision bf16]
       [--lora-dropout 0.05] [--model-dtype bfloat16] [--gradient-checkpointing]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [
    ("contrastive", {"contrastive": 1.0}, 0),
    ("dpo", {"dpo": 1.0}, 0),
    ("grl", {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0}, 0),
    ("contrastive+gradcache", {"contrastive": 1.0}, 2),
    ("grl+gradcache", {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0}, 2),
]


def run_one(args: argparse.Namespace, weights: dict, chunk: int) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ullme_cli.data import read_training_examples
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss
    from pathlib import Path

    torch.manual_seed(0)
    embedder = Embedder.load(args.model, dtype=args.model_dtype, max_length=args.max_length, generation_instruction="Answer the question: ")
    embedder.add_lora(r=8, alpha=16, dropout=args.lora_dropout)
    if args.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.model.train()
    train = Path(__file__).resolve().parent.parent / "ullme_cli" / "resources" / "trecqa-train" / "train.jsonl"
    examples, _ = read_training_examples(str(train))
    step = StepLoss(embedder, LossSection(weights=weights), args.negatives, chunk)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.mixed_precision == "bf16" else contextlib.nullcontext()
    batch = examples[: args.batch]
    times = []
    for i in range(args.steps + 1):
        embedder.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            step.backward(batch, torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        step.backward(batch, torch.Generator().manual_seed(0))
    return {"seconds": statistics.median(times[1:]), "peak_mb": peak_mb, "gflops": counter.get_total_flops() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32", help="frozen weights' dtype (LoRA stays fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder activations in the backward pass")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, weights, chunk = json.loads(args.one)
        print(json.dumps(run_one(args, weights, chunk)))
        return
    print(f"model {args.model}, batch {args.batch}, {args.negatives} hard negative(s), max_length {args.max_length}, LoRA r=8 (dropout {args.lora_dropout}), "
          f"{args.model_dtype} weights, {'no autocast' if args.mixed_precision == 'no' else 'bf16 autocast'}, CPU")  # fmt: skip
    print(f"{'step':<24}{'s/step':>9}{'peak MB':>9}{'vs contrastive':>16}{'GFLOP':>9}{'FLOPs vs contrastive':>22}")
    base = base_flops = None
    for name, weights, chunk in CONFIGS:
        # The child gets this run's own options, so every option reaches every row.
        command = [sys.executable, __file__, *sys.argv[1:], "--one", json.dumps([name, weights, chunk])]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        base, base_flops = base or result["seconds"], base_flops or result["gflops"]
        print(f"{name:<24}{result['seconds']:>9.2f}{result['peak_mb']:>9.0f}{result['seconds'] / base:>15.2f}x"
              f"{result['gflops']:>9.0f}{result['gflops'] / base_flops:>21.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
