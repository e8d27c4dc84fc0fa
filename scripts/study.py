"""The GRL study (issue 7): does GRL make better embeddings than contrastive training alone?

From the same start (the bundled default model), three fine-tunes on the TREC QA train split, each with
the same data, steps, batch and seeds:

    bidirectional + contrastive   recipes/study/bidirectional-contrastive.yaml
    bidirectional + GRL           recipes/study/bidirectional-grl.yaml
    causal + contrastive          recipes/study/causal-contrastive.yaml   (last-token pooling)

Each, and the base model, is evaluated on the held-out TREC QA test queries (nDCG@10, recall@10, MRR@10)
and on the SemEval STS sets (Spearman), none of which any run trained on. The script writes
docs/results.md (tables, the comparison whichever way it falls, the limits) and a PNG of the training
curves.

Resumable: a finished fine-tune or evaluation is reused, an interrupted fine-tune continues from its
newest checkpoint. Usage (scripts/reproduce.sh runs exactly this):

    python scripts/study.py [--seeds 0 1] [--steps 100] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ullme_cli.io.outputs import atomic_write_text
from ullme_cli.training.curves import read_metrics

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "bidirectional + contrastive": "bidirectional-contrastive",
    "bidirectional + GRL": "bidirectional-grl",
    "causal + contrastive": "causal-contrastive",
}
# Each fine-tune's starting point: the base model in the fine-tune's own attention and pooling.
STARTS = {"bidirectional + mean": ("bidirectional", "mean"), "causal + last-token": ("causal", "last-token")}
START_OF = {"bidirectional + contrastive": "bidirectional + mean", "bidirectional + GRL": "bidirectional + mean",
            "causal + contrastive": "causal + last-token"}  # fmt: skip
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_10", "mrr_at_10")
TEST_SET = REPO / "ullme_cli" / "resources" / "trecqa-test"


def ullme(*args: str, capture: bool = False, echo: bool = True) -> str:
    command = [sys.executable, "-m", "ullme_cli", *map(str, args)]
    if echo:
        print("$ ullme " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"study: `ullme {args[0]}` failed (exit {result.returncode}); rerun this script to resume")
    return result.stdout if capture else ""


def finetune(recipe: str, run_dir: Path, seed: int, steps: int | None, model: str | None) -> float:
    return finetune_recipe(REPO / "recipes" / "study" / f"{recipe}.yaml", run_dir, seed, steps, model)


def finetune_recipe(recipe: Path, run_dir: Path, seed: int, steps: int | None = None, model: str | None = None, extra: list[str] = ()) -> float:
    """Train one run, or continue it; return its wall-clock seconds, or 0 where the run was resumed (its time
    covers only the last part) or its time was not recorded. `extra`: more --set overrides. A run folder that
    is there already is passed to `ullme finetune --resume`, which checks by content that its checkpoints
    were trained from this recipe's model, data and settings (and does nothing for a finished one)."""
    timing = run_dir / "study_seconds.json"
    overrides = ["--set", f"output_dir={run_dir}", "--set", f"train.seed={seed}", *extra]
    if steps:
        overrides += ["--set", f"train.steps={steps}", "--set", f"train.warmup_steps={max(1, steps // 10)}"]
    if model:
        overrides += ["--set", f"model.name={model}"]
    if (run_dir / "model" / "ullme.json").exists():
        ullme("finetune", recipe, *overrides, "--resume", "-q", echo=False)  # the same inputs, or exit naming the difference
        recorded = json.loads(timing.read_text()) if timing.exists() else {"seconds": 0.0, "resumed": True}
        return 0.0 if recorded["resumed"] else recorded["seconds"]
    resume = ["--resume"] if (run_dir / "checkpoints").exists() else []
    started = time.perf_counter()
    ullme("finetune", recipe, *overrides, *resume)
    seconds = time.perf_counter() - started
    atomic_write_text(timing, json.dumps({"seconds": seconds, "resumed": bool(resume)}))
    return 0.0 if resume else seconds


def write_section(report: Path, name: str, text: str) -> None:
    """Put `text` in `report` between the markers of section `name`, replacing only that section; other
    sections (each study writes its own) stay as they are. Written by rename, never half."""
    start, end = f"<!-- section: {name} -->", f"<!-- end of section: {name} -->"
    old = report.read_text(encoding="utf-8") if report.exists() else "# Results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, new)


def evaluate(model: str, out: Path, sts_files: list[Path], setup: tuple[str, str] | None = None) -> dict:
    """`ullme evaluate`'s summary. The command itself reuses results from `out` only for the same weights,
    setup and task content (its fingerprints), so a changed model is scored again, never read by path."""
    summary_path = out / "summary.json"
    sts = [arg for f in sts_files for arg in ("--sts", f)]
    override = ["--attention", setup[0], "--pooling", setup[1]] if setup else []
    started = time.perf_counter()
    summary = json.loads(ullme("evaluate", "--model", model, *override, "--task-dir", TEST_SET, *sts, "--output-dir", out, capture=True))
    summary["study_seconds"] = time.perf_counter() - started  # the whole command: model load and every task
    if summary_path.exists():  # scores reused from evaluate's cache: keep the time of the run that computed them
        before = json.loads(summary_path.read_text())
        if before.get("tasks") == summary["tasks"] and "study_seconds" in before:
            summary["study_seconds"] = before["study_seconds"]
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return summary


def scores(summary: dict) -> dict[str, float]:
    tasks = summary["tasks"]
    retrieval = tasks[TEST_SET.name]
    row = {m: retrieval[m] for m in RETRIEVAL_METRICS}
    sts = {name: t["value"] for name, t in tasks.items() if name != TEST_SET.name}
    row["sts_mean"] = statistics.mean(sts.values()) if sts else float("nan")
    row["seconds"] = summary.get("study_seconds", float("nan"))
    row.update({f"sts:{name}": value for name, value in sts.items()})
    return row


def plot_curves(runs: dict[str, dict[int, Path]], path: Path, window: int = 10) -> None:
    """One panel per loss component; a line per run, smoothed over `window` steps (raw values faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    components = ("contrastive", "dpo", "kl")
    colors = dict(zip(runs, ("tab:blue", "tab:red", "tab:gray")))
    fig, axes = plt.subplots(1, len(components), figsize=(5.2 * len(components), 3.8))
    records = {run_dir: read_metrics(run_dir) for seeds in runs.values() for run_dir in seeds.values()}  # each file read once
    for ax, component in zip(axes, components):
        for config, seeds in runs.items():
            for seed, run_dir in seeds.items():
                rows = [r for r in records[run_dir] if component in r]
                if not rows:
                    continue
                steps = np.array([r["step"] for r in rows])
                values = np.array([r[component] for r in rows])
                smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
                style = "-" if seed == min(seeds) else "--"
                ax.plot(steps, values, color=colors[config], alpha=0.15, linestyle=style)
                ax.plot(steps[len(steps) - len(smooth):], smooth, color=colors[config], linestyle=style, label=f"{config}, seed {seed}")
        ax.set_title(f"{component} loss" + (" (GRL only)" if component != "contrastive" else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"training loss (mean of {window} steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cell(value: float) -> str:
    return "—" if value != value else f"{value:.4f}"  # NaN: not measured


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ({min(values):.4f}–{max(values):.4f})" if len(values) > 1 else f"{mean:.4f}"


def write_report(args, bases: dict[str, dict], results: dict[str, dict[int, dict]], runs: dict[str, dict[int, Path]],
                 seconds: dict[str, dict[int, float]], sts_files: list[Path], plot: Path) -> str:  # fmt: skip
    seeds = args.seeds
    base = bases["bidirectional + mean"]
    base_time = "an untimed while" if base["seconds"] != base["seconds"] else f"{base['seconds']:.0f} s"
    lines = [
        "Made by `bash scripts/reproduce.sh` (which runs `python scripts/study.py`); every number below is",
        "read from the files that run wrote. Machine: 2 CPU cores (AMX), no GPU.",
        "",
        "## The study: GRL against contrastive-only fine-tuning",
        "",
        "- **Start:** the bundled default model (SmolLM2-135M-Instruct) for every run.",
        "- **Training data:** TREC QA `train.csv` from `../shared/data/trecqa`, rebuilt by",
        "  `scripts/build_bundled_data.py` into `ullme_cli/resources/trecqa-train/train.jsonl`: 78 questions; label-1",
        "  sentences are positives, label-0 sentences of the same question are hard negatives. Each step draws",
        "  one positive and one hard negative per question, plus in-batch negatives.",
        "- **Held-out evaluation:** TREC QA `test.csv` (`ullme_cli/resources/trecqa-test`: 89 queries with a",
        "  relevant sentence, 1,367 sentences; no test question appears in train), and the SemEval STS 2012–2014",
        f"  test sets ({len(sts_files)} files, Spearman of cosine similarity), which no run trained on.",
        "- **Runs:** the recipes in `recipes/study/`, which differ only in attention, pooling and loss:",
        f"  LoRA r=16 (no dropout) on all linear layers, {args.steps or 100} steps, batch 8, lr 2e-4 with warmup and cosine decay,",
        "  max_length 64, bf16 autocast; GRL uses the paper's defaults (λ_CL=1, λ_DPO=0.5, λ_KL=1, τ_KL=0.1,",
        "  β=0.1, KL(P_rt ‖ P_gen)) with the adapters-off model as the DPO reference.",
        f"- **Seeds:** {', '.join(map(str, seeds))}. Cells show the mean over seeds and, in brackets, the lowest and",
        "  highest seed.",
        "- **Evaluation setup:** `ullme evaluate` with the model's own saved setup (bf16 compute, the",
        "  instruction table's query instructions). The base model is evaluated twice: in the default setup",
        "  (bidirectional, mean pooling), the start of both bidirectional fine-tunes, and causal with last-token",
        "  pooling (`--attention causal --pooling last-token`, held-out queries only), the start of the causal",
        f"  fine-tune. Scoring the base model in the default setup on the held-out queries and the {len(sts_files)} STS sets",
        f"  took {base_time} here (one `ullme evaluate`, model load included; the command is under Reproduce).",
        "",
        "| model | nDCG@10 | recall@10 | MRR@10 | STS mean Spearman | train time (fastest uninterrupted seed) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for start, b in bases.items():
        lines.append(f"| base, {start} (no fine-tuning) | {b['ndcg_at_10']:.4f} | {b['recall_at_10']:.4f} | {b['mrr_at_10']:.4f} | {cell(b['sts_mean'])} | — |")
    for config, by_seed in results.items():
        cells = [spread([by_seed[s][m] for s in seeds]) for m in (*RETRIEVAL_METRICS, "sts_mean")]
        timed = [seconds[config][s] for s in seeds if seconds[config][s] > 0]
        minutes = f"{min(timed) / 60:.1f} min" if timed else "—"  # the others may have shared the CPU
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {minutes} |")

    def mean_of(config: str, metric: str) -> float:
        return statistics.mean(results[config][s][metric] for s in seeds)

    grl, cl, causal = "bidirectional + GRL", "bidirectional + contrastive", "causal + contrastive"
    lines += ["", "### What the table says", ""]
    for label, reference in (("their own start (the base model in the same attention and pooling)", lambda c: bases[START_OF[c]]),
                             ("the base model in the default setup (bidirectional + mean)", lambda c: base)):  # fmt: skip
        beats = [c for c in results if all(results[c][s]["ndcg_at_10"] > reference(c)["ndcg_at_10"] for s in seeds)]
        lines.append(
            f"- Fine-tunes whose nDCG@10 on the held-out queries beats {label} with every seed: "
            f"{', '.join(beats) if beats else 'none'}"
            + (f"; not: {', '.join(c for c in results if c not in beats)}." if len(beats) < len(results) else ".")
        )
    for metric, label in (("ndcg_at_10", "nDCG@10"), ("recall_at_10", "recall@10"), ("sts_mean", "STS mean Spearman")):
        delta = mean_of(grl, metric) - mean_of(cl, metric)
        seed_deltas = [results[grl][s][metric] - results[cl][s][metric] for s in seeds]
        same_sign = all(d > 0 for d in seed_deltas) or all(d < 0 for d in seed_deltas)
        verdict = ("GRL ahead" if delta > 0 else "contrastive ahead") + (" with every seed" if same_sign else "; the seeds disagree")
        lines.append(f"- GRL − contrastive, {label}: {delta:+.4f} (per seed: {', '.join(f'{d:+.4f}' for d in seed_deltas)}); {verdict}.")
    delta = mean_of(cl, "ndcg_at_10") - mean_of(causal, "ndcg_at_10")
    lines.append(f"- Bidirectional − causal (both contrastive), nDCG@10: {delta:+.4f}: what the attention switch is worth here.")
    lines += [
        "",
        f"![Training loss components per step: solid seed {seeds[0]}, dashed the others; faint lines are raw]({plot.name})",
        "",
        "### Per STS set (Spearman, mean over seeds)",
        "",
        "| set | " + " | ".join(f"base, {start}" for start in bases) + " | " + " | ".join(results) + " |",
        "| --- | " + " | ".join("---" for _ in [*bases, *results]) + " |",
    ]
    for key in sorted(k for k in base if k.startswith("sts:")):
        lines.append(f"| {key[4:]} | " + " | ".join(cell(b.get(key, float("nan"))) for b in bases.values()) + " | "
                     + " | ".join(f"{mean_of(c, key):.4f}" for c in results) + " |")  # fmt: skip
    lines += [
        "",
        "### Limits of this study",
        "",
        "- It is small: 78 training questions, a 135M model, LoRA, 100 steps of batch 8 on a CPU. The paper",
        "  trains 1.5B–8B models on hundreds of thousands of pairs; nothing here says how GRL behaves at that",
        "  scale.",
        f"- {len(seeds)} seeds is the least that shows any spread; a difference smaller than the seed range is",
        "  not evidence either way.",
        "- The held-out set is one domain (TREC QA answer sentences, 89 queries); STS is a transfer check",
        "  only, and the STS sets use the instruction table's symmetric-task instruction.",
        "- Training uses max_length 64, so long passages are cut; GRL's generation terms see the question",
        "  and at most 32 tokens of the passage.",
        "- Train times are the wall clock of `ullme finetune` on a machine that other jobs sometimes shared;",
        "  a resumed run is left out. `docs/benchmarks.md` has step times measured with nothing else running.",
        "- No hyper-parameter search: the same learning rate, steps and LoRA settings for every run, the",
        "  paper's GRL defaults, and no tuning of temperatures for this data.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "bash scripts/setup.sh && . .venv/bin/activate && pip install -e '.[study]'",
        "bash scripts/reproduce.sh        # about an hour on 2 CPU cores; rerun to resume",
        "```",
        "",
        "One evaluation by hand (the base model rows; drop `--attention causal --pooling last-token` for the default):",
        "",
        "```bash",
        "ullme evaluate --model smollm2-135m --attention causal --pooling last-token \\",
        "  --task-dir ullme_cli/resources/trecqa-test \\",
        "  $(for f in ../shared/data/sts/*/*.test.tsv; do echo --sts $f; done) --output-dir results/base",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, help="override train.steps of every recipe (for a quick check)")
    parser.add_argument("--model", help="override model.name of every recipe (for a quick check)")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "study"), help="where fine-tunes and evaluations go")
    parser.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    args = parser.parse_args()

    sts_files = sorted(Path(args.shared).glob("sts/*/*.test.tsv"))
    if not sts_files:
        sys.exit(f"study: no STS test files under {args.shared}/sts; pass --shared")
    root = Path(args.runs)
    # The causal start is scored on the held-out queries only: it is the reference for the causal fine-tune's
    # retrieval, and STS of the default base is already in the table.
    bases: dict[str, dict] = {}
    for start, setup in STARTS.items():
        default = setup == ("bidirectional", "mean")
        folder = root / "eval" / ("base" if default else f"base-{setup[0]}-{setup[1]}")
        bases[start] = scores(evaluate(args.model or "smollm2-135m", folder, sts_files if default else [], setup))
    results: dict[str, dict[int, dict]] = {}
    runs: dict[str, dict[int, Path]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for seed in args.seeds:
        for config, recipe in RECIPES.items():
            run_dir = root / f"{recipe}-seed{seed}"
            seconds.setdefault(config, {})[seed] = finetune(recipe, run_dir, seed, args.steps, args.model)
            summary = evaluate(str(run_dir / "model"), root / "eval" / f"{recipe}-seed{seed}", sts_files)
            results.setdefault(config, {})[seed] = scores(summary)
            runs.setdefault(config, {})[seed] = run_dir
    report = Path(args.report)
    plot = report.parent / "study_curves.png"
    plot_curves(runs, plot)
    write_section(report, "first-study", write_report(args, bases, results, runs, seconds, sts_files, plot))
    print(f"study: wrote {report} and {plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
