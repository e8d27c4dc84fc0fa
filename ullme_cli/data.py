"""Readers for the text files that ullme takes: corpora, queries, training examples, BEIR folders.

Every reader reports a bad row as `file:line: reason`, through `UllmeError`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ullme_cli.errors import UllmeError, located

STDIN = "-"
FORMATS = ("auto", "jsonl", "tsv", "text")


@dataclass(frozen=True)
class TextRecord:
    id: str
    text: str


@dataclass
class TrainingExample:
    """One training row (DESIGN.md §5): a query, its positives and hard negatives."""

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None

    def to_json(self) -> dict:
        row = {"query": self.query, "positive": self.positives, "negative": self.negatives}
        if self.instruction is not None:
            row["instruction"] = self.instruction
        return row


def _read_bytes(path: str) -> bytes:
    if path == STDIN:
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise located(path, None, "file not found")
    if p.is_dir():
        raise located(path, None, "is a folder, expected a file")
    return p.read_bytes()


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) for every non-blank line; reject non-UTF-8 lines."""
    name = "<stdin>" if path == STDIN else path
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise located(name, number, f"not valid UTF-8 (byte {e.start})") from None
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _detect_format(path: str, first_line: str | None) -> str:
    suffix = Path(path).suffix.lower() if path != STDIN else ""
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix in (".txt", ".text"):
        return "text"
    if first_line is not None and first_line.lstrip().startswith("{"):
        return "jsonl"
    if first_line is not None and "\t" in first_line:
        return "tsv"
    return "text"


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold one object (a meta file, a manifest, ullme.json); errors name the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise located(str(path), None, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise located(str(path), None, "expected a JSON object")
    return value


def parse_json_line(name: str, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise located(name, number, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise located(name, number, "expected a JSON object")
    return row


def _string_field(name: str, number: int, row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise located(name, number, f"field '{key}' is missing or empty")
        return None
    if not isinstance(value, (str, int)):
        raise located(name, number, f"field '{key}' must be a string")
    return str(value)


def read_corpus(path: str, fmt: str = "auto") -> list[TextRecord]:
    """Read texts with ids.

    - jsonl: `{"id"|"_id": ..., "text": ..., "title"?: ...}`; a title is prepended as in BEIR.
    - tsv: `id<TAB>text[<TAB>title]`, with an optional header row `id  text ...`.
    - text: one text a line; the id is the line number.
    `-` reads stdin; the format is then sniffed from the first line.
    """
    if fmt not in FORMATS:
        raise UllmeError(f"unknown input format '{fmt}' (choose from {', '.join(FORMATS)})")
    name = "<stdin>" if path == STDIN else path
    lines = list(iter_lines(path))
    if fmt == "auto":
        fmt = _detect_format(path, lines[0][1] if lines else None)
    records: list[TextRecord] = []
    first_seen: dict[str, int] = {}
    for index, (number, line) in enumerate(lines):
        if fmt == "jsonl":
            row = parse_json_line(name, number, line)
            rid = _string_field(name, number, row, "id", required=False) or _string_field(
                name, number, row, "_id", required=False
            )
            if rid is None:
                raise located(name, number, "field 'id' is missing or empty")
            text = _string_field(name, number, row, "text")
            title = _string_field(name, number, row, "title", required=False)
            if title:
                text = f"{title} {text}"
        elif fmt == "tsv":
            cols = line.split("\t")
            if index == 0 and cols[0].strip().lower() in ("id", "_id", "docid", "qid"):
                continue
            if len(cols) > 3:
                raise located(name, number, f"{len(cols)} tab-separated columns; expected id, text and an optional title "
                                            "(a tab inside a text needs jsonl)")  # fmt: skip
            if len(cols) < 2 or not cols[1].strip():
                raise located(name, number, "field 'text' (second column) is missing or empty")
            rid, text = cols[0].strip(), cols[1]
            if not rid:
                raise located(name, number, "field 'id' (first column) is empty")
            if len(cols) > 2 and cols[2].strip():
                text = f"{cols[2]} {text}"
        else:
            rid, text = str(number), line
        if rid in first_seen:
            raise located(name, number, f"duplicate id '{rid}' (first seen on line {first_seen[rid]})")
        first_seen[rid] = number
        records.append(TextRecord(rid, text))
    if not records:
        raise located(name, None, "no texts found (empty corpus)")
    return records


def _string_list(name: str, number: int, row: dict, key: str, required: bool) -> list[str]:
    value = row.get(key)
    if value is None:
        if required:
            raise located(name, number, f"field '{key}' is missing")
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise located(name, number, f"field '{key}' must be a non-empty string or a list of non-empty strings")
    if required and not items:
        raise located(name, number, f"field '{key}' is empty")
    return list(items)


HUB_PREFIX = "hf:"


def iter_dataset_rows(spec: str) -> Iterator[tuple[int, dict]]:
    """Rows of a `datasets` dataset named `hf:NAME[:SPLIT]` (split `train` unless named).

    NAME is a hub id (needs a network, or the Hugging Face cache) or a local folder of parquet, json or
    csv files. Columns `anchor` (sentence-transformers' name) is read as `query`.
    """
    name, _, split = spec[len(HUB_PREFIX) :].partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many kinds: offline, not found, bad split, bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UllmeError(f"{spec}: cannot load this dataset ({reason}); with no network, load it once on a machine "
                         "with one (it stays in the Hugging Face cache) or point at a local folder") from None  # fmt: skip
    for number, row in enumerate(dataset, start=1):
        if "query" not in row and "anchor" in row:
            row = {**row, "query": row["anchor"]}
        yield number, row


def read_training_examples(path: str, skip_bad_rows: bool = False) -> tuple[list[TrainingExample], int]:
    """Read training rows (DESIGN.md §5) from jsonl, stdin, or a `datasets` dataset (`hf:NAME[:SPLIT]`).

    Returns the examples and the number of rows skipped. A bad row is an error naming file and line (row,
    for a dataset), unless `skip_bad_rows`, when it is counted and dropped.
    """
    name = "<stdin>" if path == STDIN else path
    examples: list[TrainingExample] = []
    skipped = 0
    rows = iter_dataset_rows(path) if path.startswith(HUB_PREFIX) else iter_lines(path)
    for number, line in rows:
        try:
            row = line if isinstance(line, dict) else parse_json_line(name, number, line)
            query = _string_field(name, number, row, "query")
            positives = _string_list(name, number, row, "positive", required=True)
            negatives = _string_list(name, number, row, "negative", required=False)
            instruction = _string_field(name, number, row, "instruction", required=False)
        except UllmeError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        examples.append(TrainingExample(query, positives, negatives, instruction))
    if not examples:
        raise located(name, None, "no training examples found")
    return examples, skipped


@dataclass
class RetrievalSet:
    """A BEIR-layout retrieval set: corpus, queries and graded relevance judgements."""

    corpus: list[TextRecord]
    queries: list[TextRecord]
    qrels: dict[str, dict[str, int]]


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """Read BEIR qrels tsv (`query-id corpus-id score`, header optional) or TREC qrels (`qid 0 docid rel`)."""
    qrels: dict[str, dict[str, int]] = {}
    for number, line in iter_lines(path):
        cols = line.split("\t") if "\t" in line else line.split()
        if number == 1 and not cols[-1].strip().lstrip("-").isdigit():
            continue
        if len(cols) == 4:
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise located(path, number, "expected 'query-id corpus-id score' (3 columns) or TREC qrels (4)")
        qid, did, score = (c.strip() for c in cols)
        try:
            qrels.setdefault(qid, {})[did] = int(score)
        except ValueError:
            raise located(path, number, f"field 'score' must be an integer, got '{score}'") from None
    if not qrels:
        raise located(path, None, "no relevance judgements found")
    return qrels


def read_beir_folder(folder: str, split: str = "test") -> RetrievalSet:
    root = Path(folder)
    if not root.is_dir():
        raise located(folder, None, "task folder not found")
    qrels_path = root / "qrels" / f"{split}.tsv"
    for required in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not required.exists():
            raise located(str(required), None, "missing: a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    corpus = read_corpus(str(root / "corpus.jsonl"), "jsonl")
    queries = read_corpus(str(root / "queries.jsonl"), "jsonl")
    qrels = read_qrels(str(qrels_path))
    known = {q.id for q in queries}
    unknown = sorted(set(qrels) - known)
    if unknown:
        raise located(str(qrels_path), None, f"query id '{unknown[0]}' is not in queries.jsonl")
    return RetrievalSet(corpus, queries, qrels)
