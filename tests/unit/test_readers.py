"""The one reader (ullme_cli/io/rows.py): what a file says is what ullme reads, in every input format.

A property test writes random records through each format (unicode, quotes, tabs and newlines where the
format allows them; ids that look like numbers, booleans, NaN or carry spaces) and reads them back: the ids
and texts must be identical. The rest pins the header rule, byte-order marks and aliases.
"""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ullme_cli.data import read_corpus, read_training_examples
from ullme_cli.errors import UllmeError
from ullme_cli.io.rows import is_header

# Ids that a type-guessing reader turns into something else: 001 -> 1, NA -> missing, 1e3 -> 1000.0, ...
TRICKY_IDS = ["001", "002", "010", "NA", "nan", "NaN", "null", "None", "1e3", "true", "False", " 7 ", "0x1F", "-0", "1,000", "١٢"]


def texts(alphabet: st.SearchStrategy) -> st.SearchStrategy:
    """Non-blank texts (a blank text is a missing field by design)."""
    return st.text(alphabet, min_size=1, max_size=30).filter(lambda t: t.strip())


ANY = st.characters(exclude_categories=("Cs",), exclude_characters="\x00\ufeff")
# One line, no tab: what a tsv cell or a text line can hold. \r and the other line breaks that
# str.splitlines() knows stay out of line formats, which split on \n only but trim a trailing \r.
ONE_LINE = st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters="\ufeff")

# The formats that write ids and texts, with what their values may hold.
FORMAT_ALPHABETS = {"jsonl": ANY, "csv": ANY, "parquet": ANY, "dataset": ANY, "tsv": ONE_LINE}


def records(alphabet) -> st.SearchStrategy:
    ids = st.one_of(st.sampled_from(TRICKY_IDS), texts(alphabet))
    return st.lists(st.tuples(ids, texts(alphabet)), min_size=1, max_size=12, unique_by=lambda r: r[0])


def write(tmp_path, fmt: str, rows: list[tuple[str, str]]) -> str:
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    elif fmt == "tsv":
        path = tmp_path / "c.tsv"
        path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in rows), encoding="utf-8")
    elif fmt == "csv":
        path = tmp_path / "c.csv"
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["id", "text"])
        writer.writerows(rows)
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    else:
        from datasets import Dataset

        table = Dataset.from_dict({"id": [i for i, _ in rows], "text": [t for _, t in rows]})
        if fmt == "parquet":
            path = tmp_path / "c.parquet"
            table.to_parquet(str(path))
        else:
            path = tmp_path / "c-dataset"
            table.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", list(FORMAT_ALPHABETS))
def test_every_format_reads_back_exactly_what_was_written(fmt, tmp_path_factory):
    @settings(max_examples=25 if fmt in ("jsonl", "tsv", "csv") else 5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=records(FORMAT_ALPHABETS[fmt]))
    def check(rows):
        folder = tmp_path_factory.mktemp(fmt)
        read = read_corpus(write(folder, fmt, rows))
        assert [(r.id, r.text) for r in read] == rows

    check()


@settings(max_examples=30, deadline=None)
@given(lines=st.lists(texts(ONE_LINE), min_size=1, max_size=12))
def test_text_format_and_stdin_read_back_exactly(lines):
    data = "".join(line + "\n" for line in lines).encode()
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    old, sys.stdin = sys.stdin, stdin
    try:
        read = read_corpus("-", "text")
    finally:
        sys.stdin = old
    assert [r.text for r in read] == lines and [r.id for r in read] == [str(n) for n in range(1, len(lines) + 1)]


def test_csv_ids_stay_strings_as_written(tmp_path):
    """Seen: `001,002,010` became "1","2","10" (pandas' type guessing), and `NA` became missing."""
    (tmp_path / "c.csv").write_text("id,text\n001,a\n002,b\n010,c\nNA,d\nnan,e\n1e3,f\ntrue,g\n 7 ,h\n")
    assert [r.id for r in read_corpus(str(tmp_path / "c.csv"))] == ["001", "002", "010", "NA", "nan", "1e3", "true", " 7 "]


def test_a_bom_is_stripped_in_every_line_format(tmp_path):
    bom = "\ufeff"
    (tmp_path / "c.tsv").write_text(bom + "id\ttext\na\tx\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text(bom + "id,text\na,x\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(bom + '{"id": "a", "text": "x"}\n', encoding="utf-8")
    (tmp_path / "c.txt").write_text(bom + "x\n", encoding="utf-8")
    for name in ("c.tsv", "c.csv", "c.jsonl"):
        assert [(r.id, r.text) for r in read_corpus(str(tmp_path / name))] == [("a", "x")], name
    assert [(r.id, r.text) for r in read_corpus(str(tmp_path / "c.txt"))] == [("1", "x")]


def test_a_tsv_header_is_never_read_as_a_document(tmp_path):
    """Seen: a header `doc_id<TAB>text` became a document with id `doc_id` (and `\\ufeffid` with a BOM)."""
    (tmp_path / "c.tsv").write_text("doc_id\ttext\n1\tx\n")
    with pytest.raises(UllmeError, match=r"c\.tsv:2: field 'id' is missing"):
        read_corpus(str(tmp_path / "c.tsv"))
    (tmp_path / "d.tsv").write_text("\ufeffdocid\ttext\n1\tx\n", encoding="utf-8")
    assert [(r.id, r.text) for r in read_corpus(str(tmp_path / "d.tsv"))] == [("1", "x")]
    (tmp_path / "e.tsv").write_text("1\tx\n2\ty\n")  # no header: positional id, text
    assert [r.id for r in read_corpus(str(tmp_path / "e.tsv"))] == ["1", "2"]
    assert is_header(["doc_id", "text"]) and is_header([" TITLE "]) and not is_header(["1", "hello world"])


@pytest.mark.parametrize("row, fields", [
    ({"query": "q", "anchor": "other", "positive": "p"}, ("query", "anchor")),
    ({"query": "q", "positive": "p", "pos": ["other"]}, ("positive", "pos")),
    ({"query": "q", "positive": "p", "negative": "n", "neg": "m"}, ("negative", "neg")),
])  # fmt: skip
def test_two_spellings_of_one_field_with_different_values_are_refused(tmp_path, row, fields):
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UllmeError, match=rf"t\.jsonl:1: fields '{fields[0]}' and '{fields[1]}' name the same thing with different values"):
        read_training_examples(str(tmp_path / "t.jsonl"))
    same = {**row, fields[1]: row[fields[0]]}  # the same value twice is one value
    (tmp_path / "u.jsonl").write_text(json.dumps(same) + "\n")
    assert read_training_examples(str(tmp_path / "u.jsonl"))[0]


def test_fields_ullme_does_not_read_are_carried_through(tmp_path):
    row = {"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "Represent this", "pos_scores": [0.9], "neg_scores": [0.1], "source": "x"}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    example = read_training_examples(str(tmp_path / "t.jsonl"))[0][0]
    assert example.to_json() == {"prompt": "Represent this", "pos_scores": [0.9], "neg_scores": [0.1], "source": "x",
                                 "query": "q", "positive": ["p"], "negative": ["n"]}  # fmt: skip
