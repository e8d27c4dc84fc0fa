"""The Matryoshka study (issue 28 §5): does training with `loss.matryoshka_dims: [64, full]` keep the
vectors useful when they are cut to 64 dimensions, and what does it cost at full size?

Two arms from the same start, data, steps and seeds: `recipes/multitask/contrastive.yaml`, and the same
recipe with `loss.matryoshka_dims: [64, full]`. Both train with bf16 autocast (`train.mixed_precision:
bf16`) so that the study fits a CPU budget; everything else is the multi-task study's. Each model is scored on
held-out TREC QA test (nDCG@10) and SICK test (Spearman) at its full 576 dimensions and cut to 64
(renormalised), with the multi-task study's item scoring (scripts/multitask_study.py). The differences
are paired bootstraps over the test items, pooled over seeds.

Data: python scripts/build_study_data.py. Usage:
    python scripts/mrl_study.py [--seeds 0 1 2] [--steps 60]
Finished fine-tunes are reused; the section `mrl-study` of docs/results.md is rewritten at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitask_study import RECIPES, held_out_sets, item_values, paired_bootstrap, ullme_encoder  # noqa: E402
from study import REPO, finetune_recipe, write_section  # noqa: E402

ARMS = {"contrastive": [], "contrastive + Matryoshka [64, full]": ["--set", "loss.matryoshka_dims=[64, full]"]}
SIZES = (None, 64)


def truncated(encode, dim: int | None):
    """`encode` with its vectors cut to the first `dim` dimensions and renormalised (None: as they are)."""
    if dim is None:
        return encode

    def cut(*args):
        vectors = encode(*args)[:, :dim]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return cut


def main() -> None:
    from ullme_cli.models.loading import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", default=str(REPO / "study-data"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "mrl"))
    parser.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    args = parser.parse_args()
    sets = [s for s in held_out_sets(Path(args.data), Path(args.shared), 500, 50) if s.name in ("TREC QA test", "SICK test")]
    values, seconds = {}, {}  # (arm, seed, size) -> per-set item values; (arm, seed) -> training seconds
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            run_dir = Path(args.runs) / f"{'mrl' if extra else 'plain'}-seed{seed}"
            data = ["--set", f"data.train={Path(args.data) / 'train.jsonl'}", "--set", "train.mixed_precision=bf16"]
            seconds[(arm, seed)] = finetune_recipe(RECIPES / "contrastive.yaml", run_dir, seed=seed, steps=args.steps, extra=data + extra)
            encode = ullme_encoder(str(run_dir / "model"))
            cache = {}  # the full vectors once per text set; each size cuts them

            def once(texts, task_name, task_type, kind, encode=encode, cache=cache):
                key = (tuple(texts), task_name, kind)
                if key not in cache:
                    cache[key] = encode(texts, task_name, task_type, kind)
                return cache[key]

            for size in SIZES:
                values[(arm, seed, size)] = item_values(truncated(once, size), sets)
                print(json.dumps({"arm": arm, "seed": seed, "size": size or "full",
                                  **{s.name: round(s.score([np.asarray(v) for v in values[(arm, seed, size)][s.name]]), 4) for s in sets}}), flush=True)  # fmt: skip
    lines = report_lines(args, sets, values, seconds, cpu_name())
    write_section(Path(args.report), "mrl-study", "\n".join(lines))
    print("\n".join(lines))


def report_lines(args, sets, values, seconds, cpu: str) -> list[str]:
    plain, mrl = ARMS
    lines = ["## Matryoshka: training at 64 dimensions (issue 28 §5)", "",
             f"Made by `python scripts/mrl_study.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}` on {cpu}, "
             f"{time.strftime('%Y-%m-%d')}. Two arms from the bundled default model, on the multi-task study's rows "
             f"(`study-data/train.jsonl`), {args.steps} steps of batch 8, LoRA r=16, lr 2e-4, bf16 autocast: "
             "`recipes/multitask/contrastive.yaml` as it is, and with `loss.matryoshka_dims: [64, full]`. Each model is scored "
             "at its full 576 dimensions and cut to the first 64 (renormalised). Cells: mean over seeds [lowest–highest].", "",
             "| arm | size | " + " | ".join(f"{s.name} ({s.metric})" for s in sets) + " | train min per run |",
             "| --- | --- | " + " | ".join("---" for _ in sets) + " | --- |"]  # fmt: skip
    for arm in ARMS:
        for size in SIZES:
            cells = []
            for s in sets:
                per_seed = [s.score([np.asarray(v) for v in values[(arm, seed, size)][s.name]]) for seed in args.seeds]
                cells.append(f"{np.mean(per_seed):.4f} [{min(per_seed):.4f}–{max(per_seed):.4f}]")
            runs = [seconds[(arm, seed)] for seed in args.seeds if seconds[(arm, seed)]]
            minutes = f"{np.mean(runs) / 60:.1f}" if runs else "—"
            lines.append(f"| {arm} | {size or 'full'} | " + " | ".join(cells) + f" | {minutes} |")
    lines += ["", "Paired bootstrap (1000 resamples of the test items, pooled over seeds), Matryoshka − plain:", "",
              "| size | " + " | ".join(s.name for s in sets) + " |", "| --- | " + " | ".join("---" for _ in sets) + " |"]  # fmt: skip
    for size in SIZES:
        cells = []
        for s in sets:
            a = [{"values": values[(mrl, seed, size)]} for seed in args.seeds]
            b = [{"values": values[(plain, seed, size)]} for seed in args.seeds]
            mean, low, high = paired_bootstrap(s, a, b, 1000)
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
        lines.append(f"| {size or 'full'} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
