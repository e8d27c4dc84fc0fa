"""Local data as mteb tasks, so the metrics are mteb's own: BEIR folders (retrieval) and STS tsv files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ullme_cli.data import iter_lines, read_beir_folder
from ullme_cli.errors import UllmeError, located
from ullme_cli.fingerprints import corpus_fingerprint

_COMMON = dict(
    dataset={"path": "local", "revision": "local"}, category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"],
    date=None, dialect=[], domains=[], task_subtypes=[], license="not specified", annotations_creators="derived",
    modalities=["text"], sample_creation="found", bibtex_citation="", reference=None,
)  # fmt: skip


def task_name_for(path: str) -> str:
    """`.../trecqa-test` -> `trecqa-test`; `.../sts/2013/FNWN.test.tsv` -> `2013-FNWN`."""
    p = Path(path)
    stem = p.name.split(".")[0] if p.suffix else p.name
    return f"{p.parent.name}-{stem}" if p.suffix and p.parent.name else stem


def unique_task_names(paths: list[str]) -> list[str]:
    """One task name per local path: `task_name_for`, with parent folders prefixed where two paths would
    share a name (`a/test`, `b/test` -> `a-test`, `b-test`), so that no score overwrites another."""
    resolved = [str(Path(p).resolve()) for p in paths]
    for n, path in enumerate(resolved):
        if path in resolved[:n]:
            raise UllmeError(f"{paths[n]}: given twice; name each evaluation set once")
    names = [task_name_for(p) for p in paths]
    depth = 1
    while len(set(names)) < len(names):
        clashing = {n for n in names if names.count(n) > 1}
        for i, path in enumerate(paths):
            if names[i] in clashing:
                parents = [q.name for q in Path(resolved[i]).parents][:depth]
                names[i] = "-".join([*reversed(parents), task_name_for(path)])
        depth += 1
    return names


def beir_retrieval_task(folder: str, name: str | None = None):
    from datasets import Dataset
    from mteb import TaskMetadata
    from mteb.abstasks import AbsTaskRetrieval

    data = read_beir_folder(folder)  # validates before mteb sees it; errors name file and line
    task_name = name or task_name_for(folder)
    content = corpus_fingerprint(
        [("corpus", r.id + "\0" + r.text) for r in data.corpus] + [("queries", r.id + "\0" + r.text) for r in data.queries]
        + [("qrels", json.dumps(data.qrels, sort_keys=True))]
    )  # fmt: skip

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=task_name, type="Retrieval", main_score="ndcg_at_10",
            description=f"Local BEIR-layout retrieval set from {folder}", **_COMMON,
        )  # fmt: skip

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            split = {  # mteb's RetrievalSplitData is a TypedDict: these four keys
                "queries": Dataset.from_list([{"id": q.id, "text": q.text} for q in data.queries]),
                "corpus": Dataset.from_list([{"id": d.id, "text": d.text, "title": ""} for d in data.corpus]),
                "relevant_docs": data.qrels,
                "top_ranked": None,
            }
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    task = LocalRetrieval()
    task.content_fingerprint = content
    return task


def read_pair_file(path: str, field: str = "score") -> tuple[list[float], list[str], list[str]]:
    """`VALUE<TAB>sentence1<TAB>sentence2` lines: a gold score (STS, SemEval layout; floats) or a 0/1 label
    (pairs; ints)."""
    values, first, second = [], [], []
    for number, line in iter_lines(path):
        cols = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(cols) < 3:
            raise located(path, number, f"expected '{field}<TAB>sentence1<TAB>sentence2'")
        try:
            value = float(cols[0])
        except ValueError:
            raise located(path, number, f"field '{field}' must be a number, got '{cols[0]}'") from None
        if field == "label":
            if value not in (0, 1):
                raise located(path, number, f"field 'label' must be 0 or 1, got '{cols[0]}'")
            value = int(value)
        values.append(value)
        first.append(cols[1])
        second.append(cols[2])
    if not values:
        raise located(path, None, "no sentence pairs found")
    return values, first, second


def read_sts_file(path: str) -> tuple[list[float], list[str], list[str]]:
    """SemEval STS layout: `score<TAB>sentence1<TAB>sentence2`, gold 0-5."""
    return read_pair_file(path, "score")


def _local_pair_task(path: str, name: str, field: str, base, task_type: str, main_score: str, column: str, **attributes):
    """Sentence pairs with a value each, as an mteb task of `base`'s kind (STS, PairClassification)."""
    from datasets import Dataset
    from mteb import TaskMetadata

    values, first, second = read_pair_file(path, field)
    metadata = TaskMetadata(name=name, type=task_type, main_score=main_score, description=f"Local {task_type} pairs from {path}", **_COMMON)
    rows = {"sentence1": first, "sentence2": second, column: values}

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = {"default": {"test": Dataset.from_dict(rows)}}
        self.data_loaded = True

    task = type(f"Local{task_type}", (base,), {"metadata": metadata, "load_data": load_data, **attributes})()
    task.content_fingerprint = corpus_fingerprint((f"{v}", f"{a}\0{b}") for v, a, b in zip(values, first, second))
    return task


def sts_task(path: str, name: str | None = None):
    """`score<TAB>sentence1<TAB>sentence2` (gold 0-5) as an mteb STS task: Spearman of the cosine."""
    from mteb.abstasks import AbsTaskSTS

    return _local_pair_task(path, name or f"STS-{task_name_for(path)}", "score", AbsTaskSTS, "STS", "cosine_spearman", "score",
                            min_score=0, max_score=5)  # fmt: skip


def pair_classification_task(path: str, name: str | None = None):
    """`label<TAB>sentence1<TAB>sentence2` (1: the pair matches, e.g. paraphrases) as an mteb
    PairClassification task; main score: average precision of the cosine (`cosine_ap`)."""
    from mteb.abstasks import AbsTaskPairClassification

    return _local_pair_task(path, name or f"Pairs-{task_name_for(path)}", "label", AbsTaskPairClassification, "PairClassification",
                            "cosine_ap", "labels")  # fmt: skip
