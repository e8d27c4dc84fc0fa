"""Typed readers over the one reader (`ullme_cli/io/rows.py`): corpora, queries, training rows, BEIR folders.

Every reader reports a bad row as `file:line: reason` (`file: row N` for a table), through `UllmeError`.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ullme_cli.errors import UllmeError, located
from ullme_cli.fingerprints import JsonDigest
from ullme_cli.io.rows import (  # noqa: F401 - the readers' names, used across ullme
    FORMATS,
    ID_FIELDS,
    NEGATIVE_FIELDS,
    POSITIVE_FIELDS,
    QUERY_FIELDS,
    STDIN,
    TEXT_FIELDS,
    Where,
    also_read_from,
    display_name,
    field_value,
    iter_jsonl_lines,
    iter_lines,
    iter_rows,
    missing,
    read_json_object,
    read_jsonl_line,
    string_field,
)

# The fields of a training row that ullme reads itself; any other field is carried through (`extra`).
TRAINING_FIELDS = frozenset({*QUERY_FIELDS, *POSITIVE_FIELDS, *NEGATIVE_FIELDS, "instruction", "generation_instruction"})


@dataclass(frozen=True)
class TextRecord:
    id: str
    text: str


@dataclass
class TrainingExample:
    """One training row (docs/design.md §5): a query, its positives and hard negatives."""

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None
    generation_instruction: str | None = None  # this row's GRL/DPO/SFT prompt prefix; None: the recipe's
    extra: dict = field(default_factory=dict)  # fields ullme does not read (FlagEmbedding's prompt, scores, ...), kept
    in_batch_negatives: bool = True  # its source's setting (training/mixture.py); False: scored against its own candidates only

    @property
    def has_teacher_scores(self) -> bool:
        return "pos_scores" in self.extra or "neg_scores" in self.extra

    def to_json(self) -> dict:
        row = {**self.extra, "query": self.query, "positive": self.positives, "negative": self.negatives}
        if self.instruction is not None:
            row["instruction"] = self.instruction
        if self.generation_instruction is not None:
            row["generation_instruction"] = self.generation_instruction
        return row


def read_corpus(path: str, fmt: str = "auto") -> list[TextRecord]:
    """Read texts with ids, from any input `iter_rows` reads.

    Fields: an id (`id`, BEIR `_id`, Tevatron `docid`/`query_id`) and a text (`text`, or `query` for query
    files); a `title` is prepended as in BEIR. tsv without a header: `id<TAB>text[<TAB>title]`. text: one
    text a line, whose id is the line number.
    """
    name = display_name(path)
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
    key, value = field_value(where, row, names)
    numbered = sorted((k for k in row if k.startswith(f"{names[0]}_") and k[len(names[0]) + 1 :].isdigit()), key=lambda k: int(k.rpartition("_")[2]))
    values = [] if value is None else [value] if isinstance(value, (str, dict)) else value
    if not isinstance(values, list):
        raise where.error(f"field '{key}' must be a string or a list")
    passages = [_passage_text(where, v, key) for v in values] + [_passage_text(where, row[k], k) for k in numbered if not missing(row[k])]
    if required and not passages:
        raise where.error(f"field '{names[0]}' is missing or empty{also_read_from(names)}")
    return passages


def _numbered(key: str) -> bool:
    """sentence-transformers' numbered columns (`negative_1`, `positive_2`): read into the lists."""
    stem, _, number = key.rpartition("_")
    return number.isdigit() and stem in (POSITIVE_FIELDS[0], NEGATIVE_FIELDS[0])


def read_training_examples(path: str, skip_bad_rows: bool = False) -> tuple[list[TrainingExample], int]:
    """Read training rows (docs/design.md §5) from any input `iter_rows` reads (tsv needs a header row).

    Fields, with the neighbours' names: `query` (`anchor`, `question`); `positive` (`pos`,
    `positive_passages`); `negative` (`neg`, `negative_passages`, `negative_1`, ...); `instruction` (the
    query's); `generation_instruction` (the prompt prefix of the generation losses, for this row).
    Returns the examples and the number of rows skipped. A bad row is an error naming file and line (row,
    for a table), unless `skip_bad_rows`, when it is counted and dropped.
    """
    name = display_name(path)
    examples: list[TrainingExample] = []
    skipped = 0
    for where, row in iter_rows(path):
        try:
            examples.append(training_example(where, row))
        except UllmeError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not examples:
        raise located(name, None, "no training examples found")
    return examples, skipped


def training_example(where, row: dict) -> TrainingExample:
    """One training row as a TrainingExample (`read_training_examples` gives the fields); UllmeError naming
    `where` and the field when the row is bad."""
    query = string_field(where, row, QUERY_FIELDS)
    positives = passage_list(where, row, POSITIVE_FIELDS, required=True)
    negatives = passage_list(where, row, NEGATIVE_FIELDS, required=False)
    instruction = string_field(where, row, "instruction", required=False)
    generation_instruction = string_field(where, row, "generation_instruction", required=False)
    extra = {k: v for k, v in row.items() if k not in TRAINING_FIELDS and not _numbered(k)}
    for key, passages in (("pos_scores", positives), ("neg_scores", negatives)):
        if extra.get(key) is not None:
            extra[key] = teacher_scores(where, extra[key], key, len(passages))
    return TrainingExample(query, positives, negatives, instruction, generation_instruction, extra)


def cluster_key(value) -> int:
    """A row's cluster as a stable integer (0: none), the same whether its source is streamed or not."""
    return 0 if value is None else int(hashlib.sha256(str(value).encode()).hexdigest()[:15], 16)


class StreamedExamples:
    """A jsonl file of training rows read as a stream: one pass checks every row (as `read_training_examples`
    does) and keeps only each row's byte offset and line number, its cluster's hash (for caps) and a content
    hash of the rows; a row is parsed again when a step asks for it. Memory: 16 bytes a row plus 8 for the
    cluster, whatever the rows hold."""

    def __init__(self, path: str, skip_bad_rows: bool = False):
        self.path = path
        self.offsets, self.lines, self.clusters = array("q"), array("q"), array("q")
        self.skipped, self.has_teacher_scores = 0, False
        digest = JsonDigest()
        for where, offset, row in iter_jsonl_lines(path):
            try:
                example = training_example(where, row)
            except UllmeError:
                if not skip_bad_rows:
                    raise
                self.skipped += 1
                continue
            self.offsets.append(offset)
            self.lines.append(where.number)
            self.clusters.append(cluster_key(example.extra.get("cluster")))
            self.has_teacher_scores = self.has_teacher_scores or example.has_teacher_scores
            digest.update(example.to_json())
        if not self.offsets:
            raise located(display_name(path), None, "no training examples found")
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> TrainingExample:
        return training_example(*read_jsonl_line(self.path, self.offsets[index], self.lines[index]))


def teacher_scores(where, value, key: str, count: int) -> list[float]:
    """A row's `pos_scores` or `neg_scores` (FlagEmbedding's and Tevatron's teacher scores): one number per
    positive or negative, in their order (the distill term reads them)."""
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise where.error(f"field '{key}' must be a list of numbers, got {value!r}"[:300])
    if len(value) != count:
        raise where.error(f"field '{key}' has {len(value)} scores for {count} {'positives' if key == 'pos_scores' else 'negatives'}")
    for position, v in enumerate(value):  # JSON readers accept NaN and Infinity; a teacher score must be a number
        if not math.isfinite(v):
            raise where.error(f"field '{key}'[{position}] is {v}; teacher scores must be finite numbers")
    return [float(v) for v in value]


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
    check_qrels_ids(str(qrels_path), qrels, {q.id for q in queries}, {d.id for d in corpus})
    return RetrievalSet(corpus, queries, qrels)


def check_qrels_ids(path: str, qrels: dict[str, dict[str, int]], query_ids: set[str], corpus_ids: set[str]) -> None:
    """Judgements name queries and documents that exist: an id absent from the set (`001` against `1`, a
    qrels file of another corpus) would score as a miss, so it is an error that gives the counts."""
    unknown_queries = sorted(set(qrels) - query_ids)
    if unknown_queries:
        raise located(path, None, f"{len(unknown_queries)} of {len(qrels)} judged query ids are not in queries.jsonl (first: '{unknown_queries[0]}')")
    judged = {d for docs in qrels.values() for d in docs}
    unknown_docs = sorted(judged - corpus_ids)
    if unknown_docs:
        raise located(path, None, f"{len(unknown_docs)} of {len(judged)} judged document ids are not in corpus.jsonl (first: '{unknown_docs[0]}')")
