"""Measure one real training step's memory in a fresh process (the dry run's check, tests/test_dry_run.py):
the resident set before the step (model, optimizer built) and its peak during the step, in bytes, as JSON.
The peak is /proc/self/status's VmHWM, reset just before the step (`5` into /proc/self/clear_refs). Not
ru_maxrss: Linux carries it across fork and exec, so a child of a large test worker starts at its peak.

Run it with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every tensor-sized block by mmap and returns it
on free, so the resident set follows live tensor memory. Its default threshold grows after the first large
free, and freed blocks then stay resident, which made two runs of the same step differ by 140 MiB.

Usage: python tests/step_memory.py RECIPE OUTPUT_DIR
"""

import json
import resource
import sys
from pathlib import Path


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """VmHWM: the highest resident set since the process started or since `reset_peak`."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main(recipe_path: str, out: str) -> None:
    from ullme_cli.recipes import load_recipe
    from ullme_cli.training.trainer import prepare, resume_run, train_step

    recipe = load_recipe(recipe_path)
    run = prepare(recipe, Path(out))
    resume_run(run, resume=False)
    before = resident_bytes()
    reset_peak()
    train_step(run)
    print(json.dumps({"before": before, "peak": peak_resident_bytes()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
