"""Where does a CPU encode spend its time? torch.profiler over one `Embedder.encode` of the corpus, after an
untimed warm-up pass, printed as each op's share of the time (self time, so matmuls are not counted twice
under linear/matmul).

Usage: OMP_NUM_THREADS=2 python benchmarks/profile_encode.py [--model smollm2-135m] [--limit 150] [--rows 12]
"""

import argparse

import torch
from encode import add_corpus_arguments, read_texts  # benchmarks/ is on sys.path when this script runs
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.models.loading import cpu_name

    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=12, help="how many ops to list")
    parser.set_defaults(limit=150)
    args = parser.parse_args()
    texts = read_texts(args)
    embedder = Embedder.load(args.model, dtype=args.dtype, max_length=args.max_length)
    embedder.encode(texts)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        embedder.encode(texts)
    events = sorted(profiled.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    dtype = next(embedder.model.parameters()).dtype
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {str(dtype).replace('torch.', '')}, {len(texts)} texts, "
          f"{total / 1e6:.2f} s profiled")  # fmt: skip
    for event in events[: args.rows]:
        print(f"{event.key:<50}{100 * event.self_cpu_time_total / total:>7.1f}%{event.count:>8} calls")


if __name__ == "__main__":
    main()
