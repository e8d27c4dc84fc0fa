"""Measure one real training step's memory in a fresh process (the dry run's check, tests/test_dry_run.py):
the resident set before the step (model, optimizer built) and its peak after (ru_maxrss), in bytes, as JSON.

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


def main(recipe_path: str, out: str) -> None:
    from ullme_cli.recipes import load_recipe
    from ullme_cli.training.trainer import prepare, resume_run, train_step

    recipe = load_recipe(recipe_path)
    run = prepare(recipe, Path(out))
    resume_run(run, resume=False)
    before = resident_bytes()
    # ru_maxrss has held the peak so far (model loading); the step's peak shows only where it goes higher.
    loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_step(run)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "loaded_peak": loaded_peak, "peak": peak}))


if __name__ == "__main__":
    main(*sys.argv[1:])
