"""curves.png: a run's loss components and evaluation metrics over steps, from its metrics.jsonl.

finetune draws one for its own run at the end; `ullme plot RUN...` draws one for several runs, one line
per run in each panel. With `by_source` (`ullme plot --by-source`, and finetune's own plot of a run that
drew from several data sources), each run's training steps are split by the `source` its step recorded,
one line per run and source; evaluation steps stay one line per run. Needs matplotlib (`pip install 'ullme[plot]'`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ullme_cli.errors import UllmeError, located
from ullme_cli.io.outputs import atomic_path, guarded

METRICS_FILE = "metrics.jsonl"
NOT_PLOTTED = ("step", "steps_per_s")


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl (or of that file itself) to plot: `metric_records`, with
    at least one step and one metric."""
    path = Path(run) / METRICS_FILE if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise located(str(path), None, "not found (a finetune output_dir holds metrics.jsonl)")
    records = metric_records(path)
    if not records:
        raise located(str(path), None, "holds no steps yet")
    if not any(isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_PLOTTED for r in records for k, v in r.items()):
        raise located(str(path), None, "holds steps but no metric to plot (only 'step')")
    return records


def metric_records(path: Path) -> list[dict]:
    """Every step's record in a metrics.jsonl, the one reader of that file; a torn last line (a killed run's)
    is skipped, any other bad line is an error naming it."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise located(str(path), None, f"not valid UTF-8 (byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):  # only the last line of a killed run may be torn
                raise located(str(path), number, "not valid JSON") from None
            continue
        if not isinstance(record, dict):
            raise located(str(path), number, "expected a JSON object (one step's record)")
        if not isinstance(record.get("step"), (int, float)) or isinstance(record.get("step"), bool):
            raise located(str(path), number, "field 'step' is missing or not a number")
        records.append(record)
    return records


def last_eval_metrics(path: Path) -> dict:
    """The newest `eval_*` values in a run's metrics.jsonl, with their step; {} when it has none."""
    evaluated = [r for r in (metric_records(path) if path.is_file() else []) if any(k.startswith("eval_") for k in r)]
    return {"step": evaluated[-1]["step"], **{k[len("eval_") :]: v for k, v in evaluated[-1].items() if k.startswith("eval_")}} if evaluated else {}


def panel_order(keys: set[str]) -> list[str]:
    """The total loss first, then its components, the evaluation metrics, then lr and grad_norm."""
    tail = [k for k in ("lr", "grad_norm") if k in keys]
    evals = sorted(k for k in keys if k.startswith("eval_"))
    parts = sorted(keys - {"loss", *tail, *evals})
    return [k for k in ("loss",) if k in keys] + parts + evals + tail


def split_by_source(label: str, records: list[dict]) -> dict[str, list[dict]]:
    """`label · source` for each training step's source; steps without one (evaluations) under `label`."""
    series: dict[str, list[dict]] = {}
    for record in records:
        source = record.get("source")
        series.setdefault(f"{label} · {source}" if isinstance(source, str) else label, []).append(record)
    return series


def sources_in(records: list[dict]) -> set[str]:
    return {r["source"] for r in records if isinstance(r.get("source"), str)}


def read_runs(runs: list[str | Path]) -> dict[str, list[dict]]:
    """Each run's records (`read_metrics`, each file read once, every bad run reported before anything is
    drawn) under its label: the run folder's name, or the full paths when names repeat."""
    labels = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    labels = labels if len(set(labels)) == len(labels) else [str(r) for r in runs]
    return {label: read_metrics(run) for run, label in zip(runs, labels)}


def plot_runs(series: dict[str, list[dict]], output, by_source: bool = False) -> list[str]:
    """Draw each labelled run's records (`read_runs`) into one PNG at `output` (a path or a binary file);
    return the panel names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UllmeError("plotting needs matplotlib: pip install 'ullme[plot]'") from None
    if by_source:
        series = {name: part for label, records in series.items() for name, part in split_by_source(label, records).items()}
    keys = {k for records in series.values() for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in NOT_PLOTTED}
    panels = panel_order(keys)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for label, records in series.items():
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, markersize=3, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if len(series) > 1:
        axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, format="png", dpi=110)
    plt.close(figure)
    return panels


def write_plot(runs: list[str], output: str, overwrite: bool = False, by_source: bool = False) -> list[str]:
    """`ullme plot`: the PNG to a file (checked, written whole or not at all) or to stdout (`-`)."""
    series = read_runs(runs)
    if by_source and not any(sources_in(records) for records in series.values()):
        raise UllmeError("--by-source: no step of these runs recorded a data source (runs from one data.train file have none)")
    if output == "-":
        return plot_runs(series, sys.stdout.buffer, by_source=by_source)
    with guarded([output], [str(Path(r) / METRICS_FILE) if Path(r).is_dir() else r for r in runs], overwrite), atomic_path(output) as tmp:
        return plot_runs(series, tmp, by_source=by_source)
