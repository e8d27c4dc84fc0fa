"""Encode speed against the token budget (padded tokens per batch) on this machine, one process, fp32 or
the default dtype: is the CPU default (1536, chosen on an AMX Xeon with 2 MB of L2 per core) right here?

Each budget is timed `--repeats` times in each of `--sweeps` passes (fastest per pass; the passes go in
opposite orders so that a drift of the machine does not favour one end), and printed against the default.

Usage: python benchmarks/token_budget.py [--model smollm2-135m] [--texts ...demo/corpus.jsonl] [--max-length 128]
       [--budgets 512 1024 1536 2048 3072 4096 8192] [--dtype auto]
       [--repeats 2] [--sweeps 2] [--limit N]
"""

import argparse
import time

import torch


def main() -> None:
    from encode import add_corpus_arguments, read_texts  # benchmarks/ is on sys.path when this script runs

    from ullme_cli.models.embedder import CPU_TOKEN_BUDGET, Embedder
    from ullme_cli.models.loading import cpu_name

    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 1536, 2048, 3072, 4096, 8192])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sweeps", type=int, default=2)
    args = parser.parse_args()
    texts = read_texts(args)
    embedder = Embedder.load(args.model, dtype=args.dtype, max_length=args.max_length)
    budgets = sorted(set(args.budgets) | {CPU_TOKEN_BUDGET})
    embedder.encode(texts[:16])  # warm-up
    rates: dict[int, list[float]] = {b: [] for b in budgets}
    for sweep in range(args.sweeps):
        for budget in budgets if sweep % 2 == 0 else budgets[::-1]:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                embedder.encode(texts, token_budget=budget)
                best = min(best, time.perf_counter() - start)
            rates[budget].append(len(texts) / best)
    dtype = str(next(embedder.model.parameters()).dtype).removeprefix("torch.")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {dtype}, {len(texts)} texts, max_length {args.max_length}")
    default = max(rates[CPU_TOKEN_BUDGET])
    print(f"{'token budget':>12}{'texts/s (per sweep)':>28}{'best vs default':>17}")
    for budget in budgets:
        mark = "  (default)" if budget == CPU_TOKEN_BUDGET else ""
        per_sweep = " ".join(f"{r:6.1f}" for r in rates[budget])
        print(f"{budget:>12}{per_sweep:>28}{max(rates[budget]) / default:>16.2f}x{mark}")


if __name__ == "__main__":
    main()
