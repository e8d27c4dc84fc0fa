"""How fast `ullme --help` and `ullme encode --help` answer, against a baseline checkout run beside them.

    git worktree add /tmp/ullme-before <commit>
    python benchmarks/cli_start.py --baseline /tmp/ullme-before [--runs 15]

Each run is `python -m ullme_cli ARGS` started from a tree's root (so that tree's code runs, with this
environment's packages), interleaved with the baseline's so that both see the same machine. Prints the median and
range of each, and the ratio baseline / this tree (above 1: this tree starts faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def started(tree: Path, args: list[str]) -> float:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ullme_cli", *args], cwd=tree, capture_output=True)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{tree}: ullme {' '.join(args)} failed: {result.stderr.decode()[-500:]}")
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="root of another ullme checkout")
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    trees = {"baseline": options.baseline.resolve(), "this tree": HERE}
    for args in (["--help"], ["encode", "--help"]):
        times = {name: [] for name in trees}
        for name, tree in trees.items():  # one unmeasured start each: the file cache
            started(tree, args)
        for _ in range(options.runs):
            for name, tree in trees.items():
                times[name].append(started(tree, args))
        medians = {name: statistics.median(values) for name, values in times.items()}
        described = ", ".join(f"{name} {medians[name]:.0f} ms ({min(v):.0f}-{max(v):.0f})" for name, v in times.items())
        print(f"ullme {' '.join(args)}: {described}; ratio {medians['baseline'] / medians['this tree']:.2f}x")


if __name__ == "__main__":
    main()
