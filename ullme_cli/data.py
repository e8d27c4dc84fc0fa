"""Readers for the text files that ullme takes: corpora, queries, training examples, BEIR folders.

Every reader reports a bad row as `file:line: reason`, through `UllmeError`.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ullme_cli.errors import UllmeError, located

STDIN = "-"
HUB_PREFIX = "hf:"
# Line formats are read here, with line numbers; table formats (csv, parquet, a `save_to_disk` folder,
# `hf:NAME[:SPLIT]`) through `datasets`, with row numbers. Every reader takes rows from `iter_rows`.
LINE_FORMATS = ("jsonl", "tsv", "text")
TABLE_FORMATS = ("csv", "parquet", "dataset")
FORMATS = ("auto", *LINE_FORMATS, *TABLE_FORMATS)

# The field names of the neighbours, each read as ours (first present wins): BEIR, Tevatron, FlagEmbedding,
# sentence-transformers.
ID_FIELDS = ("id", "_id", "docid", "query_id", "qid")
TEXT_FIELDS = ("text", "query", "contents")
QUERY_FIELDS = ("query", "anchor", "question")
POSITIVE_FIELDS = ("positive", "pos", "positive_passages", "positives")
NEGATIVE_FIELDS = ("negative", "neg", "negative_passages", "negatives")

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
    generation_instruction: str | None = None  # this row's GRL/DPO/SFT prompt prefix; None: the recipe's

    def to_json(self) -> dict:
        row = {"query": self.query, "positive": self.positives, "negative": self.negatives}
        if self.instruction is not None:
            row["instruction"] = self.instruction
        if self.generation_instruction is not None:
            row["generation_instruction"] = self.generation_instruction
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


def detect_format(path: str, first_line: str | None = None) -> str:
    if path.startswith(HUB_PREFIX) or (path != STDIN and Path(path).is_dir()):
        return "dataset"
    suffix = Path(path).suffix.lower() if path != STDIN else ""
    by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".txt": "text", ".text": "text",
                 ".csv": "csv", ".parquet": "parquet"}  # fmt: skip
    if suffix in by_suffix:
        return by_suffix[suffix]
    if first_line is not None and first_line.lstrip().startswith("{"):
        return "jsonl"
    if first_line is not None and "\t" in first_line:
        return "tsv"
    return "text"


class Where(str):
    """Where a row came from, as errors name it: `file:LINE` for line formats, `file: row N` for tables."""

    def __new__(cls, name: str, number: int, unit: str = "line"):
        where = super().__new__(cls, f"{name}:{number}" if unit == "line" else f"{name}: row {number}")
        where.position = f"{unit} {number}"
        return where

    def error(self, message: str) -> UllmeError:
        return UllmeError(f"{self}: {message}")


def iter_rows(path: str, fmt: str = "auto", tsv_columns: tuple[str, ...] | None = None) -> Iterator[tuple[Where, dict]]:
    """Every input's rows as dicts, by one path: jsonl, tsv, text, csv, parquet, a `save_to_disk` folder, `hf:NAME[:SPLIT]`.

    tsv: a first row that names fields is the header; without one, `tsv_columns` name the columns by position.
    text: one row a line, `{"id": line number, "text": line}`. `-` is stdin (a line format).
    """
    if fmt not in FORMATS:
        raise UllmeError(f"unknown input format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "auto" and (by_name := detect_format(path)) in TABLE_FORMATS:
        fmt = by_name
    if fmt in TABLE_FORMATS:
        yield from _table_rows(path, fmt)
        return
    name = "<stdin>" if path == STDIN else path
    lines = iter_lines(path)
    first = next(lines, None)
    if first is None:
        return
    fmt = detect_format(path, first[1]) if fmt == "auto" else fmt
    columns = tsv_columns
    if fmt == "tsv":
        cells = [c.strip() for c in first[1].split("\t")]
        if cells[0].lower() in {*ID_FIELDS, *TEXT_FIELDS, *QUERY_FIELDS}:  # a header; positions past it keep their names
            columns, first = (*cells, *(tsv_columns or ())[len(cells) :]), None
        elif tsv_columns is None:
            raise located(name, first[0], "a tsv file here needs a header row naming its fields")
    for number, line in itertools.chain([first] if first else [], lines):
        where = Where(name, number)
        if fmt == "jsonl":
            yield where, parse_json_line(where, line)
        elif fmt == "tsv":
            cells = line.split("\t")
            if len(cells) > len(columns):
                raise where.error(f"{len(cells)} tab-separated columns; expected {', '.join(columns)} (a tab inside a text needs jsonl)")
            yield where, dict(zip(columns, cells))
        else:
            yield where, {"id": str(number), "text": line}


def _table_rows(path: str, fmt: str) -> Iterator[tuple[Where, dict]]:
    """Rows of a csv or parquet file, a `save_to_disk` folder or `hf:NAME[:SPLIT]`, through `datasets`."""
    if path == STDIN:
        raise UllmeError(f"stdin holds line formats only (jsonl, tsv, text), not {fmt}")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.startswith(HUB_PREFIX):
            hub_name, _, split = path[len(HUB_PREFIX) :].partition(":")
            table = datasets.load_dataset(hub_name, split=split or "train")
        elif fmt == "dataset":
            if not Path(path).is_dir():
                raise located(path, None, "not a folder (a `datasets` save_to_disk folder is expected)")
            if not any((Path(path) / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
                raise located(path, None, "is a folder, but not a `datasets` save_to_disk folder (no dataset_info.json)")
            table = datasets.load_from_disk(path)
            if isinstance(table, datasets.DatasetDict):
                split = "train" if "train" in table else (next(iter(table)) if len(table) == 1 else None)
                if split is None:
                    raise located(path, None, f"a DatasetDict with splits {', '.join(table)}: save one split, or name it as hf:{path}:SPLIT")
                table = table[split]
        else:
            if not Path(path).is_file():
                raise located(path, None, "file not found")
            table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except UllmeError:
        raise
    except Exception as e:  # datasets raises many kinds: offline, not found, bad split, unreadable files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.startswith(HUB_PREFIX):
            raise UllmeError(f"{path}: cannot load this dataset ({reason}); with no network, load it once where there is one "
                             "(it stays in the Hugging Face cache) or use a local folder") from None  # fmt: skip
        raise UllmeError(f"{path}: cannot read it as {fmt} ({reason})") from None
    for number, row in enumerate(table, start=1):
        yield Where(path, number, "row"), row


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold one object (a meta file, a manifest, ullme.json); errors name the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise located(str(path), None, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise located(str(path), None, "expected a JSON object")
    return value


def parse_json_line(where: str, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UllmeError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise UllmeError(f"{where}: expected a JSON object")
    return row


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip())


def _first_present(row: dict, names: tuple[str, ...]):
    for key in names:
        if not _missing(row.get(key)):
            return key, row[key]
    return names[0], None


def _also(names: tuple[str, ...]) -> str:
    return f" (also read from {', '.join(names[1:])})" if len(names) > 1 else ""


def string_field(where: Where, row: dict, names: tuple[str, ...] | str, required: bool = True) -> str | None:
    names = (names,) if isinstance(names, str) else names
    key, value = _first_present(row, names)
    if value is None:
        if required:
            raise where.error(f"field '{names[0]}' is missing or empty{_also(names)}")
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error(f"field '{key}' must be a string")
    return str(value)


def read_corpus(path: str, fmt: str = "auto") -> list[TextRecord]:
    """Read texts with ids, from any input `iter_rows` reads.

    Fields: an id (`id`, BEIR `_id`, Tevatron `docid`/`query_id`) and a text (`text`, or `query` for query
    files); a `title` is prepended as in BEIR. tsv without a header: `id<TAB>text[<TAB>title]`. text: one
    text a line, whose id is the line number.
    """
    name = "<stdin>" if path == STDIN else path
    records: list[TextRecord] = []
    first_seen: dict[str, Where] = {}
    for where, row in iter_rows(path, fmt, tsv_columns=("id", "text", "title")):
        rid = string_field(where, row, ID_FIELDS)
        text = string_field(where, row, TEXT_FIELDS)
        title = string_field(where, row, "title", required=False)
        if title:
            text = f"{title} {text}"
        if rid in first_seen:
            raise where.error(f"duplicate id '{rid}' (first seen on {first_seen[rid].position})")
        first_seen[rid] = where
        records.append(TextRecord(rid, text))
    if not records:
        raise located(name, None, "no texts found (empty corpus)")
    return records


def _passage_text(where: Where, value, key: str) -> str:
    """A passage given as a string, or as a Tevatron `{docid, title, text}` object."""
    if isinstance(value, dict):
        text = string_field(where, value, "text")
        title = string_field(where, value, "title", required=False)
        return f"{title} {text}" if title else text
    if isinstance(value, str) and value.strip():
        return value
    raise where.error(f"field '{key}' must hold non-empty strings or {{title, text}} objects")


def passage_list(where: Where, row: dict, names: tuple[str, ...], required: bool) -> list[str]:
    """Passages from the first of `names` present (a string or a list), plus sentence-transformers' numbered
    columns (`negative_1`, `negative_2`, ...)."""
    key, value = _first_present(row, names)
    numbered = sorted((k for k in row if k.startswith(f"{names[0]}_") and k[len(names[0]) + 1 :].isdigit()), key=lambda k: int(k.rpartition("_")[2]))
    values = [] if value is None else [value] if isinstance(value, (str, dict)) else value
    if not isinstance(values, list):
        raise where.error(f"field '{key}' must be a string or a list")
    passages = [_passage_text(where, v, key) for v in values] + [_passage_text(where, row[k], k) for k in numbered if not _missing(row[k])]
    if required and not passages:
        raise where.error(f"field '{names[0]}' is missing or empty{_also(names)}")
    return passages


def read_training_examples(path: str, skip_bad_rows: bool = False) -> tuple[list[TrainingExample], int]:
    """Read training rows (DESIGN.md §5) from any input `iter_rows` reads (tsv needs a header row).

    Fields, with the neighbours' names: `query` (`anchor`, `question`); `positive` (`pos`,
    `positive_passages`); `negative` (`neg`, `negative_passages`, `negative_1`, ...); `instruction` (the
    query's); `generation_instruction` (the prompt prefix of the generation losses, for this row).
    Returns the examples and the number of rows skipped. A bad row is an error naming file and line (row,
    for a table), unless `skip_bad_rows`, when it is counted and dropped.
    """
    name = "<stdin>" if path == STDIN else path
    examples: list[TrainingExample] = []
    skipped = 0
    for where, row in iter_rows(path):
        try:
            query = string_field(where, row, QUERY_FIELDS)
            positives = passage_list(where, row, POSITIVE_FIELDS, required=True)
            negatives = passage_list(where, row, NEGATIVE_FIELDS, required=False)
            instruction = string_field(where, row, "instruction", required=False)
            generation_instruction = string_field(where, row, "generation_instruction", required=False)
        except UllmeError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        examples.append(TrainingExample(query, positives, negatives, instruction, generation_instruction))
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
