"""Step time and peak memory of training steps on one batch: contrastive, DPO and GRL, with and without
GradCache, on the same model, batch and LoRA settings.

Each configuration runs in its own process so that its peak resident memory (ru_maxrss) is its own.
Prints seconds per step (median of --steps after one warm-up step), peak RSS, the ratio to the
contrastive step, and the step's FLOPs (torch's FlopCounterMode, forward and backward, padding included)
with their ratio to the contrastive step's: the part of the time ratio that is the work itself, and the
step's FLOP rate as a share of the matmul peak in its compute dtype (benchmarks/encode.py's fastest of
single 2048² matmuls, taken in the same run before the steps).
Usage: python benchmarks/train_step.py [--model smollm2-135m] [--batch 8] [--steps 3] [--mixed-precision bf16]
       [--lora-dropout 0.05] [--model-dtype bfloat16] [--gradient-checkpointing] [--device cuda] [--no-packing]
       [--configs contrastive grl]
Batches are padding-free as training runs them by default (train.packing); --no-packing pads them.

`--memory` measures instead what the memory levers save, as the step's own memory (peak minus what the
loaded model holds; CPU: peak RSS, CUDA: peak allocated), each configuration in its own process:
- gradient checkpointing off and on, for a contrastive and a GRL step at --batch;
- GradCache: a contrastive step at batch 16 without it, and at batch 512 with chunks of 16.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

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

    torch.manual_seed(0)
    embedder = Embedder.load(args.model, dtype=args.model_dtype, device=args.device, max_length=args.max_length,
                             generation_instruction="Answer the question: ")  # fmt: skip
    embedder.add_lora(r=8, alpha=16, dropout=args.lora_dropout)
    embedder.packing = args.packing  # as the trainer sets it from train.packing
    if args.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.model.train()
    train = Path(__file__).resolve().parent.parent / "ullme_cli" / "resources" / "trecqa-train" / "train.jsonl"
    examples, _ = read_training_examples(str(train))
    step = StepLoss(embedder, LossSection(weights=weights), args.negatives, chunk)
    autocast = torch.autocast(embedder.device.type, dtype=torch.bfloat16) if args.mixed_precision == "bf16" else contextlib.nullcontext()
    batch = [examples[i % len(examples)] for i in range(args.batch)]  # past the file's rows, rows repeat
    cuda = embedder.device.type == "cuda"
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + 1):
        embedder.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            step.backward(batch, torch.Generator().manual_seed(0))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": statistics.median(times[1:]), "peak_mb": peak_mb, "step_mb": peak_mb - loaded_mb}
    if not args.memory:
        counter = FlopCounterMode(display=False)
        with counter, autocast:
            step.backward(batch, torch.Generator().manual_seed(0))
        result["gflops"] = counter.get_total_flops() / 1e9
    return result


SMALL_RANDOM = "small-random"


def make_small_random_model() -> str:
    """A random Llama (hidden 256, 4 layers, 512 BPE tokens) in a temporary folder: memory and time, not quality."""
    import tempfile

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from tiny_models import save_tiny

    texts = [json.loads(line)["text"] for line in (root / "ullme_cli/resources/demo/corpus.jsonl").read_text().splitlines()]
    folder = Path(tempfile.mkdtemp(prefix="ullme-small-")) / "llama"
    save_tiny(folder, "llama", texts, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    return str(folder)


def child(args: argparse.Namespace, name: str, weights: dict, chunk: int, **overrides) -> dict:
    """One configuration in a process of its own (its peak memory is its own); `overrides` replace options."""
    options = {**vars(args), **overrides}
    command = [sys.executable, __file__, "--one", json.dumps([name, weights, chunk, options])]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def memory_tables(args: argparse.Namespace) -> None:
    contrastive, grl = CONFIGS[0][1], CONFIGS[2][1]
    print(f"gradient checkpointing, batch {args.batch}: step memory (peak minus the loaded model) and time")
    print(f"{'step':<14}{'off MB':>9}{'on MB':>9}{'on/off':>8}{'off s':>8}{'on s':>8}")
    for name, weights in (("contrastive", contrastive), ("grl", grl)):
        off = child(args, name, weights, 0, gradient_checkpointing=False)
        on = child(args, name, weights, 0, gradient_checkpointing=True)
        print(f"{name:<14}{off['step_mb']:>9.0f}{on['step_mb']:>9.0f}{on['step_mb'] / off['step_mb']:>7.2f}x{off['seconds']:>8.2f}{on['seconds']:>8.2f}")
    print("GradCache, contrastive: step memory at batch 16 without it and at batch 512 with chunks of 16")
    small = child(args, "contrastive", contrastive, 0, batch=16, gradient_checkpointing=False)
    large = child(args, "contrastive", contrastive, 16, batch=512, gradient_checkpointing=False, steps=1)
    print(f"batch 16, no GradCache     {small['step_mb']:>8.0f} MB {small['seconds']:>8.2f} s/step")
    print(f"batch 512, chunks of 16    {large['step_mb']:>8.0f} MB {large['seconds']:>8.2f} s/step")
    print(f"peak ratio 512-with-GradCache / 16-without: {large['step_mb'] / small['step_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help=f"a model name or folder, or {SMALL_RANDOM!r} (a random 4-layer Llama)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32", help="frozen weights' dtype (LoRA stays fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder activations in the backward pass")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-packing", dest="packing", action="store_false", help="padded batches (train.packing: false); default: padding-free, as training runs")
    parser.add_argument("--configs", nargs="+", choices=[c[0] for c in CONFIGS], help="only these steps (default: all)")
    parser.add_argument("--memory", action="store_true", help="the memory tables (gradient checkpointing, GradCache) instead")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, weights, chunk, options = json.loads(args.one)
        print(json.dumps(run_one(argparse.Namespace(**options), weights, chunk)))
        return
    if args.model == SMALL_RANDOM:  # built once here, read by every child
        args.model = make_small_random_model()
    if args.memory:
        print(f"model {args.model}, max_length {args.max_length}, {args.negatives} hard negative(s), LoRA r=8, {args.model_dtype}, {args.device}")
        memory_tables(args)
        return
    print(f"model {args.model}, batch {args.batch}, {args.negatives} hard negative(s), max_length {args.max_length}, LoRA r=8 (dropout {args.lora_dropout}), "
          f"{args.model_dtype} weights, {'no autocast' if args.mixed_precision == 'no' else 'bf16 autocast'}, "
          f"{'padding-free' if args.packing else 'padded'} batches, {args.device}")  # fmt: skip
    peak = compute_peak(args)
    print(f"{'step':<24}{'s/step':>9}{'peak MB':>9}{'vs contrastive':>16}{'GFLOP':>9}{'FLOPs vs contrastive':>22}{'% of peak':>11}")
    base = base_flops = None
    for name, weights, chunk in CONFIGS:
        if args.configs and name not in args.configs:
            continue
        result = child(args, name, weights, chunk)
        base, base_flops = base or result["seconds"], base_flops or result["gflops"]
        share = f"{100 * result['gflops'] * 1e9 / result['seconds'] / peak:>10.1f}%" if peak else f"{'-':>11}"
        print(f"{name:<24}{result['seconds']:>9.2f}{result['peak_mb']:>9.0f}{result['seconds'] / base:>15.2f}x"
              f"{result['gflops']:>9.1f}{result['gflops'] / base_flops:>21.2f}x{share}")  # fmt: skip


def compute_peak(args: argparse.Namespace) -> float | None:
    """The matmul peak (FLOP/s) in the dtype the step's matmuls run in: bf16 under autocast or with bf16
    weights, else fp32. On CPU only: a CUDA peak would need the GPU's own timing."""
    if args.device != "cpu":
        return None
    import torch
    from encode import matmul_peak  # benchmarks/ is on sys.path when this script runs

    dtype = torch.bfloat16 if args.mixed_precision == "bf16" or args.model_dtype == "bfloat16" else torch.float32
    peak = matmul_peak(dtype)
    print(f"matmul peak: {str(dtype).removeprefix('torch.')} {peak / 1e9:.0f} GFLOP/s (the fastest of single 2048² matmuls)")
    return peak


if __name__ == "__main__":
    main()
