"""`ullme evaluate`: resolve tasks (mteb names, benchmarks, local folders and files), run mteb, report.

Results land in `--output-dir` as mteb's own JSON per task (mteb's ResultCache layout), which is also
what makes a rerun skip finished tasks. Each task's result is filed under a key of what decides it: the
model's setup with its fingerprint, the task's instruction, and the task's content (the files of a local
task, the dataset revision of a hub task). New weights or other qrels at the same path get a new key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from ullme_cli.data import iter_lines, read_qrels
from ullme_cli.errors import UllmeError, located
from ullme_cli.evaluation.local_tasks import (
    beir_retrieval_task,
    pair_classification_task,
    sts_task,
    unique_task_names,
)
from ullme_cli.instructions import instruction_for, load_instruction_table
from ullme_cli.io.outputs import guard_output
from ullme_cli.model_setup import Runtime, resolve_setup

log = logging.getLogger(__name__)

MAIN_METRICS = ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")


@dataclass
class TaskResult:
    name: str
    task_type: str
    main_score: str
    scores: dict = field(default_factory=dict)


def resolve_tasks(names: list[str]):
    """Task and benchmark names -> mteb task objects; unknown names get close matches."""
    import mteb

    known = {t.metadata.name: t for t in mteb.get_tasks()}
    benchmarks = {b.name: b for b in mteb.get_benchmarks()}
    tasks = []
    for name in names:
        if name in benchmarks:
            tasks.extend(benchmarks[name].tasks)
        elif name in known:
            tasks.append(mteb.get_task(name))
        else:
            close = difflib.get_close_matches(name, list(known) + list(benchmarks), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UllmeError(f"--tasks: unknown task or benchmark '{name}'{hint}")
    return tasks


def check_offline_data(tasks) -> None:
    """Load every task's data now; where it is neither cached nor reachable, list them all, one line each."""
    missing = []
    for task in tasks:
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds of network errors
            dataset = task.metadata.dataset
            missing.append(
                f"{task.metadata.name}: dataset {dataset.get('path')}@{dataset.get('revision')} is not cached and the hub "
                f"is unreachable ({type(e).__name__}); on a machine with a network run `ullme evaluate --prefetch --tasks "
                f"{task.metadata.name}`, then copy ~/.cache/huggingface here"
            )
    if missing:
        raise UllmeError("\n".join(missing))


def prefetch(task_names: list[str]) -> list[str]:
    """Download (into the Hugging Face cache) the data of these tasks. Needs a network."""
    tasks = resolve_tasks(task_names)
    check_offline_data(tasks)
    return [t.metadata.name for t in tasks]


def task_fingerprint(task) -> str:
    """What a task's scores depend on besides the model: its files (local tasks) or dataset revision."""
    local = getattr(task, "content_fingerprint", None)
    if local:
        return local
    dataset = task.metadata.dataset
    return f"{dataset.get('path')}@{dataset.get('revision')}"


def evaluate(
    model: str,
    task_names: list[str],
    task_dirs: list[str],
    sts_files: list[str],
    output_dir: str,
    instructions: str | None = None,
    runtime=None,
    show_progress: bool = True,
    pooling: str | None = None,
    attention: str | None = None,
    pair_files: list[str] = (),
    max_length: int | None = None,
) -> list[TaskResult]:
    """Resolve every task first (cheap, and fails before the model loads), then run them all.

    `pooling`, `attention` and `max_length` override the model's own (None keeps them), e.g. to score a base
    model in the setup that a fine-tune will use.
    """
    from ullme_cli.models.embedder import load_embedder
    from ullme_cli.models.loading import model_fingerprint, model_inputs, resolve_model_source

    table = load_instruction_table(instructions)
    hub_tasks = resolve_tasks(task_names) if task_names else []
    # (path, task maker, name prefix): names are unique across all local sets, so that no score replaces another
    local = [*((d, beir_retrieval_task, "") for d in task_dirs), *((f, sts_task, "STS-") for f in sts_files),
             *((f, pair_classification_task, "Pairs-") for f in pair_files)]  # fmt: skip
    names = unique_task_names([path for path, _, _ in local])
    tasks = hub_tasks + [make(path, prefix + name) for (path, make, prefix), name in zip(local, names)]
    if not tasks:
        raise UllmeError("evaluate: name --tasks, --task-dir, --sts or --pairs (or --run with --qrels)")
    setup = resolve_setup(model, pooling=pooling, attention=attention, max_length=max_length)
    # The results cache is written as tasks finish: never inside the model (its fingerprint would change) or a task.
    guard_output([output_dir], [*model_inputs(setup.model), *(path for path, _, _ in local), instructions], folder=True, exists_ok=True,
                 may_hold_inputs=True)  # fmt: skip
    setup = setup.replace(fingerprint=model_fingerprint(resolve_model_source(setup.model)))
    name = Path(model).name if Path(model).exists() else model
    # Hub data is checked before the model loads, and only for tasks that have no result yet.
    check_offline_data([t for t in hub_tasks if not cached_result_path(output_dir, setup, name, t, table).exists()])
    embedder = load_embedder(setup, runtime or Runtime())
    return run_evaluation(embedder, name, tasks, output_dir, table, show_progress)


def report(results: list[TaskResult], model: str):
    """The JSON summary (for stdout) and a rich table of it (for people, on stderr)."""
    table = Table(title=f"ullme evaluate: {model}")
    for column in ("task", "type", "main score", "value", "nDCG@10", "MRR@10", "R@10"):
        table.add_column(column)
    summary = {"model": model, "tasks": {}}
    for r in results:
        value = r.scores.get(r.main_score)
        extra = [r.scores.get(m) for m in ("ndcg_at_10", "mrr_at_10", "recall_at_10")]
        table.add_row(r.name, r.task_type, r.main_score, *(f"{v:.4f}" if isinstance(v, float) else "" for v in [value, *extra]))
        summary["tasks"][r.name] = {"main_score": r.main_score, "value": value, **{m: r.scores[m] for m in (*MAIN_METRICS, "cosine_spearman", "cosine_ap") if m in r.scores}}
    return summary, table


def _revision(setup, task, instruction_table: dict, weights: str | None) -> str:
    """The result key (module docstring) that files this task's result, as the model revision mteb stores."""
    weights = weights or setup.fingerprint
    if not weights:
        raise UllmeError("internal: evaluating weights that have no fingerprint")
    instruction = instruction_for(instruction_table, task.metadata.name, task.metadata.type)
    payload = {"setup": setup.record(), "weights": weights, "instruction": instruction, "task": task_fingerprint(task)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached_result_path(output_dir: str, setup, model_name: str, task, instruction_table: dict, weights: str | None = None) -> Path:
    return result_path(output_dir, model_name, task, _revision(setup, task, instruction_table, weights))


def result_path(output_dir: str, model_name: str, task, revision: str) -> Path:
    """Where mteb's cache files this task's result under its result key."""
    from mteb import ResultCache

    from ullme_cli.models.mteb_face import mteb_model_name

    name = mteb_model_name(model_name).replace("/", "__").replace(" ", "_")
    return ResultCache(cache_path=str(Path(output_dir))).get_task_result_path(task.metadata.name, name, revision)


def run_evaluation(embedder, model_name: str, tasks, output_dir: str, instruction_table: dict, show_progress: bool = True,
                   weights: str | None = None) -> list[TaskResult]:  # fmt: skip
    """Evaluate each task under its own result key (see the module's docstring); reuse a finished one.

    `weights`: the fingerprint of in-memory weights (training), where no files describe them.
    """
    import mteb

    from ullme_cli.models.mteb_face import MtebEncoder

    cache = mteb.ResultCache(cache_path=str(Path(output_dir)))
    reports = []
    for task in tasks:
        revision = _revision(embedder.setup, task, instruction_table, weights)
        encoder = MtebEncoder(embedder, instruction_table, model_name, revision)
        result = mteb.evaluate(encoder, [task], cache=cache, overwrite_strategy="only-missing", show_progress_bar=show_progress)
        saved = result_path(output_dir, model_name, task, revision)
        # One reader for fresh and reused results: mteb rounds what it saves, so a rerun must not print
        # 0.9 where the first run printed 0.8999999999999998.
        task_results = [mteb.TaskResult.from_disk(saved)] if saved.exists() else result.task_results
        for task_result in task_results:
            scores = task_result.scores["test"][0] if "test" in task_result.scores else next(iter(task_result.scores.values()))[0]
            reports.append(TaskResult(task_result.task_name, task.metadata.type, task.metadata.main_score, scores))
    return reports


def score_run(run_path: str, qrels_path: str, k_values=(1, 3, 5, 10, 100, 1000)) -> dict:
    """Score a TREC run (`qid Q0 docid rank score tag`) with mteb's retrieval metrics.

    mteb has no public function that scores a run, so this one place imports its private module; the
    mteb range in pyproject.toml is the tested one and tests/test_evaluate.py fails loudly when it moves.
    """
    try:
        from mteb._evaluators.retrieval_metrics import (
            calculate_retrieval_scores,
            make_score_dict,
        )
    except ImportError as e:
        import mteb

        raise UllmeError(f"evaluate --run: mteb {mteb.__version__} moved its retrieval metrics ({e}); install the "
                         "mteb version that pyproject.toml names") from None  # fmt: skip

    qrels = read_qrels(qrels_path)
    run: dict[str, dict[str, float]] = {}
    for number, line in iter_lines(run_path):
        cols = line.split()
        if len(cols) != 6:
            raise located(run_path, number, "expected a TREC run line 'qid Q0 docid rank score tag'")
        try:
            run.setdefault(cols[0], {})[cols[2]] = float(cols[4])
        except ValueError:
            raise located(run_path, number, f"field 'score' must be a number, got '{cols[4]}'") from None
    qrels = {q: docs for q, docs in qrels.items() if q in run}
    if not qrels:
        raise UllmeError(f"{run_path}: no query of the run has judgements in {qrels_path}")
    unjudged = sorted(set(run) - set(qrels))
    if unjudged:  # trec_eval scores the judged queries only; say how many were left out
        log.warning(f"{run_path}: {len(unjudged)} of {len(run)} queries have no judgements in {qrels_path} and are not scored "
                    f"(first: '{unjudged[0]}')")  # fmt: skip
        run = {q: hits for q, hits in run.items() if q in qrels}
    s = calculate_retrieval_scores(run, qrels, list(k_values))
    return make_score_dict(
        ndcg=s.ndcg, _map=s.map, recall=s.recall, precision=s.precision, mrr=s.mrr,
        naucs=s.naucs, naucs_mrr=s.naucs_mrr, hit_rate=s.hit_rate, task_scores={},
    )  # fmt: skip
