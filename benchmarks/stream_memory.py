"""Peak memory of reading a training source as a stream (issue 28 §7), against the same reader on 10k rows.

Generates jsonl sources of --small and --large rows (~0.3 KB each), then, in a fresh process per case,
reads the source through `read_mixture` (streamed, and whole for the small one and with --whole for the
large one), draws --steps batches of 32 and fetches their rows, and prints the peak resident set
(VmHWM; not ru_maxrss, which Linux carries across fork and exec) with the read and batch times. glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that
freed blocks leave the resident set.

Usage: python benchmarks/stream_memory.py [--small 10000] [--large 2000000] [--steps 1000] [--whole]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASE = """
import json, sys, time
from ullme_cli.training.mixture import Batching, Source, read_mixture
start = time.perf_counter()
mixture = read_mixture([Source(sys.argv[1], stream=sys.argv[2] == "stream")], False, 0)
read = time.perf_counter() - start
batching, start = Batching(mixture, 32, 0), time.perf_counter()
rows = sum(len(mixture.examples[i].query) > 0 for step in range(int(sys.argv[3])) for i in batching.indices(step))
print(json.dumps({"rows": len(mixture.examples), "read_s": read, "batches_s": time.perf_counter() - start,
                  "peak_mib": next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))}))
"""


def write_rows(path: Path, count: int) -> None:
    with open(path, "w") as handle:
        for n in range(count):
            handle.write(json.dumps({"query": f"question {n} " + "word " * 12, "positive": [f"answer {n} " + "text " * 25],
                                     "negative": [f"wrong answer {n}"]}) + "\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--whole", action="store_true", help="also read the large source whole (several GB)")
    args = parser.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name, count in (("small", args.small), ("large", args.large)):
            path = Path(tmp) / f"{name}.jsonl"
            start = time.perf_counter()
            write_rows(path, count)
            print(f"{name}: {count} rows, {path.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s")
            cases += [(name, path, "stream")] + ([(name, path, "whole")] if name == "small" or args.whole else [])
        print(f"{'source':<8}{'read as':<9}{'rows':>10}{'read s':>9}{'batches s':>11}{'peak MiB':>10}")
        for name, path, how in cases:
            done = subprocess.run([sys.executable, "-c", CASE, str(path), how, str(args.steps)], capture_output=True, text=True, env=env, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:<8}{how:<9}{r['rows']:>10}{r['read_s']:>9.1f}{r['batches_s']:>11.1f}{r['peak_mib']:>10.0f}")


if __name__ == "__main__":
    main()
