"""The one reader (docs/design.md §10.1): every input format becomes rows of named fields by this path.

- Line formats (jsonl, tsv, text) and csv are read here, byte for byte, with line numbers. Every value is
  the string the file holds: `001`, `NA`, `nan`, `1e3`, `true` and ` 7 ` stay exactly as written.
- Table formats that carry types (parquet, a `save_to_disk` folder, `hf:NAME[:SPLIT]`) go through
  `datasets`, with row numbers; an integer id there becomes its decimal string.
- A UTF-8 byte-order mark at the start of a file is dropped.
- Header rule. A csv's first row is always its header. A tsv's first row is a header when any of its
  cells (spaces trimmed) is a field name ullme reads (`FIELD_NAMES`). Otherwise it is data, and the
  columns are named by position (`id, text, title` for a corpus). Without a header or positional
  names, the file is refused. So a header is never read as a document.
- Aliases. A field may be spelt as the neighbours spell it (BEIR, Tevatron, FlagEmbedding,
  sentence-transformers). A row that gives two spellings of one field with different values is refused,
  naming both (`field_value`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Iterator

from ullme_cli.constants import INPUT_FORMATS
from ullme_cli.errors import UllmeError, located
from ullme_cli.io.outputs import HUB_PREFIX, STDIO

STDIN = STDIO
TABLE_FORMATS = ("parquet", "dataset")
FORMATS = INPUT_FORMATS
BOM = "\ufeff"

# Each field's spellings, ours first: BEIR, Tevatron, FlagEmbedding, sentence-transformers.
ID_FIELDS = ("id", "_id", "docid", "query_id", "qid")
TEXT_FIELDS = ("text", "query", "contents")
QUERY_FIELDS = ("query", "anchor", "question")
POSITIVE_FIELDS = ("positive", "pos", "positive_passages", "positives")
NEGATIVE_FIELDS = ("negative", "neg", "negative_passages", "negatives")
OTHER_FIELDS = ("title", "instruction", "generation_instruction", "prompt", "pos_scores", "neg_scores", "label", "cluster",
                "score", "sentence1", "sentence2")  # fmt: skip
FIELD_NAMES = frozenset({*ID_FIELDS, *TEXT_FIELDS, *QUERY_FIELDS, *POSITIVE_FIELDS, *NEGATIVE_FIELDS, *OTHER_FIELDS})


class Where(str):
    """Where a row came from, as errors name it: `file:LINE` for line formats, `file: row N` for tables."""

    def __new__(cls, name: str, number: int, unit: str = "line"):
        where = super().__new__(cls, f"{name}:{number}" if unit == "line" else f"{name}: row {number}")
        where.position, where.number = f"{unit} {number}", number
        return where

    def error(self, message: str) -> UllmeError:
        return UllmeError(f"{self}: {message}")


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def read_bytes(path: str) -> bytes:
    if path == STDIN:
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise located(path, None, "file not found")
    if p.is_dir():
        raise located(path, None, "is a folder, expected a file")
    return p.read_bytes()


def decode(path: str, data: bytes) -> str:
    """UTF-8 text without a leading byte-order mark; a bad byte is located by line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise located(display_name(path), line, f"not valid UTF-8 (byte {e.start})") from None
    return text[1:] if text.startswith(BOM) else text


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) for every non-blank line; a trailing `\\r` is dropped."""
    for number, line in enumerate(decode(path, read_bytes(path)).split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def iter_jsonl_lines(path: str) -> Iterator[tuple[Where, int, dict]]:
    """A jsonl file's rows one line at a time, never the whole file: (where, byte offset of the line, row),
    for sources read as streams (training/mixture.py). Same rules as `iter_rows` for jsonl."""
    name = display_name(path)
    if not Path(path).is_file():
        raise located(path, None, "file not found" if not Path(path).exists() else "is a folder, expected a file")
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            line = decode_line(name, number, raw)
            if line.strip():
                yield Where(name, number), start, parse_json_line(Where(name, number), line)


def read_jsonl_line(path: str, offset: int, number: int) -> tuple[Where, dict]:
    """The row of line `number` of a jsonl file, which starts at byte `offset` (`iter_jsonl_lines`)."""
    where = Where(display_name(path), number)
    with open(path, "rb") as handle:
        handle.seek(offset)
        raw = handle.readline()
    return where, parse_json_line(where, decode_line(display_name(path), number, raw))


def decode_line(name: str, number: int, raw: bytes) -> str:
    """One line of a file as text, without its line end, nor a byte-order mark on line 1."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
        return line[1:] if number == 1 and line.startswith(BOM) else line
    except UnicodeDecodeError as e:
        raise located(name, number, f"not valid UTF-8 (byte {e.start} of the line)") from None


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


def is_header(cells: list[str]) -> bool:
    """The header rule of a tsv: any cell is a field name ullme reads."""
    return any(c.strip().lower() in FIELD_NAMES for c in cells)


def iter_rows(path: str, fmt: str = "auto", tsv_columns: tuple[str, ...] | None = None) -> Iterator[tuple[Where, dict]]:
    """Every input's rows as dicts, by one path. `-` is stdin (jsonl, tsv, text or csv).

    tsv: see the header rule above; without a header, `tsv_columns` name the columns by position.
    text: one row a line, `{"id": line number, "text": line}`.
    """
    if fmt not in FORMATS:
        raise UllmeError(f"unknown input format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "auto" and (by_name := detect_format(path)) in (*TABLE_FORMATS, "csv"):
        fmt = by_name
    if fmt in TABLE_FORMATS:
        yield from _table_rows(path, fmt)
        return
    if fmt == "csv":
        yield from _csv_rows(path)
        return
    name = display_name(path)
    lines = iter_lines(path)
    first = next(lines, None)
    if first is None:
        return
    fmt = detect_format(path, first[1]) if fmt == "auto" else fmt
    columns = tsv_columns
    if fmt == "tsv":
        cells = first[1].split("\t")
        if is_header(cells):  # positions past the header keep their positional names
            columns, first = (*(c.strip() for c in cells), *(tsv_columns or ())[len(cells) :]), None
        elif tsv_columns is None:
            raise located(name, first[0], f"a tsv file here needs a header row naming its fields (such as {', '.join(sorted(FIELD_NAMES)[:6])}, ...)")
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


def _csv_rows(path: str) -> Iterator[tuple[Where, dict]]:
    """csv (RFC 4180: quotes, embedded commas and newlines): the first row names the fields, every value a
    string as written. A row is numbered by the line it starts on."""
    name = display_name(path)
    text = decode(path, read_bytes(path))
    stream = io.StringIO(text, newline="")
    reader = csv.reader(stream, strict=True)
    header: list[str] | None = None
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise located(name, reader.line_num, f"malformed csv ({e})") from None
        where, start = Where(name, start), reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        if len(cells) > len(header):
            raise where.error(f"{len(cells)} comma-separated values; the header names {len(header)} ({', '.join(header)})")
        yield where, dict(zip(header, cells))


def _table_rows(path: str, fmt: str) -> Iterator[tuple[Where, dict]]:
    """Rows of a parquet file, a `save_to_disk` folder or `hf:NAME[:SPLIT]`, through `datasets`."""
    if path == STDIN:
        raise UllmeError(f"stdin holds jsonl, tsv, text or csv, not {fmt}")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is reported here, in one line, not also by datasets
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
            if fmt == "parquet" and _parquet_rows(path) == 0:
                return  # a valid file with no rows: the caller says "no texts found" (datasets cannot load one)
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


def _parquet_rows(path: str) -> int | None:
    """The row count a parquet file's footer states; None when the footer cannot be read (datasets then says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not parquet: the load below reports it in one line
        return None


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold one object (a meta file, a manifest, ullme.json); errors name the file."""
    return parse_json_object(str(path), Path(path).read_bytes())


def parse_json_object(path: str, data: bytes) -> dict:
    """`read_json_object` on bytes already read from `path`."""
    try:
        value = json.loads(decode(path, data))
    except ValueError as e:
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
    if SURROGATE_ESCAPE.search(line):  # only a \uD800-\uDFFF escape can put a lone surrogate into a parsed row
        for key, value in row.items():
            if (position := lone_surrogate(value)) is not None:
                raise UllmeError(f"{where}: field '{key}' holds a lone surrogate ({position}), which is not Unicode text")
    return row


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(value) -> str | None:
    """Where a string (or the strings of a list or mapping) holds a surrogate code point with no partner, as
    `U+D800 at character 3`; None when it holds none. JSON's escapes can spell one; no encoder can write it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"U+{ord(value[e.start]):04X} at character {e.start}"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := lone_surrogate(item)) is not None), None)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip())


def field_value(where: Where, row: dict, names: tuple[str, ...]):
    """(the spelling used, its value) of the first of `names` present; (names[0], None) when none is.
    Two spellings with different values are refused."""
    present = [(key, row[key]) for key in names if key in row and not missing(row[key])]
    for key, value in present[1:]:
        if value != present[0][1]:
            raise where.error(f"fields '{present[0][0]}' and '{key}' name the same thing with different values; keep one")
    return present[0] if present else (names[0], None)


def also_read_from(names: tuple[str, ...]) -> str:
    return f" (also read from {', '.join(names[1:])})" if len(names) > 1 else ""


def string_field(where: Where, row: dict, names: tuple[str, ...] | str, required: bool = True) -> str | None:
    """A string field, under any of its spellings. An integer (from a typed table) becomes its digits."""
    names = (names,) if isinstance(names, str) else names
    key, value = field_value(where, row, names)
    if value is None:
        if required:
            raise where.error(f"field '{names[0]}' is missing or empty{also_read_from(names)}")
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error(f"field '{key}' must be a string")
    return str(value)
