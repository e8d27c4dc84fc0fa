import pytest

from ullme_cli.data import read_beir_folder, read_corpus, read_qrels, read_training_examples
from ullme_cli.errors import UllmeError


def write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_jsonl_tsv_and_text_are_read_with_ids(tmp_path):
    jsonl = write(tmp_path, "c.jsonl", '{"id": "a", "text": "x", "title": "T"}\n\n{"_id": 7, "text": "y"}\n')
    assert [(r.id, r.text) for r in read_corpus(jsonl)] == [("a", "T x"), ("7", "y")]
    tsv = write(tmp_path, "c.tsv", "id\ttext\nd1\thello\nd2\tworld\tTitle\n")
    assert [(r.id, r.text) for r in read_corpus(tsv)] == [("d1", "hello"), ("d2", "Title world")]
    txt = write(tmp_path, "c.txt", "first\n\nthird\n")
    assert [(r.id, r.text) for r in read_corpus(txt)] == [("1", "first"), ("3", "third")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.jsonl", "", "c.jsonl: no texts found (empty corpus)"),
        ("c.jsonl", '{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "c.jsonl:2: malformed JSON"),
        ("c.jsonl", '{"id": "a"}\n', "c.jsonl:1: field 'text' is missing or empty"),
        ("c.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "c.jsonl:2: duplicate id 'a' (first seen on line 1)"),
        ("c.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff"}\n', "c.jsonl:2: not valid UTF-8"),
        ("c.jsonl", '["a", "b"]\n', "c.jsonl:1: expected a JSON object"),
        ("c.tsv", "d1\n", "c.tsv:1: field 'text' is missing or empty"),
    ],
)
def test_bad_corpus_rows_name_file_line_and_field(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(UllmeError) as error:
        read_corpus(path)
    assert str(error.value).startswith(str(tmp_path / message.split(":")[0]) + message[len(message.split(":")[0]):])


def test_missing_file(tmp_path):
    with pytest.raises(UllmeError, match="nope.jsonl: file not found"):
        read_corpus(str(tmp_path / "nope.jsonl"))


def test_training_rows_are_validated_or_skipped_and_counted(tmp_path):
    path = write(
        tmp_path,
        "t.jsonl",
        '{"query": "q", "positive": "p", "negative": ["n1", "n2"]}\n{"query": "q2", "positive": []}\n{"query": "q3", "positive": ["p3"]}\n',
    )
    with pytest.raises(UllmeError, match="t.jsonl:2: field 'positive'"):
        read_training_examples(path)
    examples, skipped = read_training_examples(path, skip_bad_rows=True)
    assert skipped == 1 and [e.query for e in examples] == ["q", "q3"]
    assert examples[0].positives == ["p"] and examples[0].negatives == ["n1", "n2"]


def test_bundled_beir_folder_reads(tmp_path):
    from conftest import RESOURCES

    data = read_beir_folder(str(RESOURCES / "trecqa-test"))
    assert len(data.queries) == 89 and len(data.corpus) > 1000
    assert all(qid in {q.id for q in data.queries} for qid in data.qrels)


def test_qrels_accept_trec_format_and_reject_bad_scores(tmp_path):
    assert read_qrels(write(tmp_path, "q.txt", "q1 0 d1 1\nq1 0 d2 0\n")) == {"q1": {"d1": 1, "d2": 0}}
    with pytest.raises(UllmeError, match="q.tsv:2: field 'score'"):
        read_qrels(write(tmp_path, "q.tsv", "q1\td1\t1\nq1\td2\thigh\n"))


def test_training_rows_from_a_datasets_folder(tmp_path):
    """`hf:FOLDER` goes through `datasets.load_dataset`; sentence-transformers' `anchor` column is the query."""
    from datasets import Dataset

    folder = tmp_path / "triples"
    folder.mkdir()
    rows = [
        {"anchor": "who wrote hamlet ?", "positive": "Shakespeare wrote Hamlet .", "negative": "Hamlet is a play ."},
        {"anchor": "capital of france ?", "positive": "Paris is the capital .", "negative": "France is large ."},
    ]
    Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    examples, skipped = read_training_examples(f"hf:{folder}")
    assert skipped == 0 and [(e.query, e.positives, e.negatives) for e in examples] == [
        (r["anchor"], [r["positive"]], [r["negative"]]) for r in rows
    ]
    with pytest.raises(UllmeError, match=r"hf:.*:test: cannot load this dataset"):
        read_training_examples(f"hf:{folder}:test")


def test_a_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UllmeError) as error:
        read_training_examples("hf:ullme-nonexistent/never-cached-triples")
    message = str(error.value)
    assert message.startswith("hf:ullme-nonexistent/never-cached-triples: cannot load this dataset") and "\n" not in message


# Every input format and the neighbours' field layouts, read by one path (`iter_rows`).
CORPUS = [{"id": "d1", "title": "Hamlet", "text": "A play by Shakespeare ."}, {"id": "d2", "title": "", "text": "Paris is in France ."}]
EXPECTED_CORPUS = [("d1", "Hamlet A play by Shakespeare ."), ("d2", "Paris is in France .")]


def corpus_in(fmt: str, folder, rows=CORPUS, id_key="id"):
    """The same rows written as `fmt`; the path to read."""
    import json

    from datasets import Dataset, DatasetDict

    rows = [{(id_key if k == "id" else k): v for k, v in r.items()} for r in rows]
    table = Dataset.from_list(rows)
    path = folder / f"corpus.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "tsv":
        path.write_text("\t".join(rows[0]) + "\n" + "".join("\t".join(r.values()) + "\n" for r in rows))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "dataset":
        table.save_to_disk(str(path))
    elif fmt == "datasetdict":
        DatasetDict({"train": table}).save_to_disk(str(path))
    elif fmt == "hf":
        path.mkdir()
        table.to_parquet(str(path / "train.parquet"))
        return f"hf:{path}"
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv", "parquet", "dataset", "datasetdict", "hf"])
def test_a_corpus_reads_the_same_from_every_format(tmp_path, fmt):
    assert [(r.id, r.text) for r in read_corpus(corpus_in(fmt, tmp_path))] == EXPECTED_CORPUS


@pytest.mark.parametrize("id_key", ["_id", "docid"])  # BEIR, Tevatron
def test_corpus_id_field_names_of_beir_and_tevatron(tmp_path, id_key):
    assert [(r.id, r.text) for r in read_corpus(corpus_in("jsonl", tmp_path, id_key=id_key))] == EXPECTED_CORPUS


def test_tevatron_query_rows_read_as_queries(tmp_path):
    path = write(tmp_path, "q.jsonl", '{"query_id": "q1", "query": "who wrote hamlet ?", "positive_passages": []}\n')
    assert [(r.id, r.text) for r in read_corpus(path)] == [("q1", "who wrote hamlet ?")]


def test_a_bad_table_row_is_named_by_line_or_row_and_field(tmp_path):
    from datasets import Dataset

    rows = Dataset.from_list([{"id": "a", "text": "x"}, {"id": "b", "text": ""}])
    rows.to_csv(str(tmp_path / "c.csv"), index=False)  # csv is read line by line: the header is line 1
    with pytest.raises(UllmeError, match=r"c\.csv:3: field 'text' is missing or empty"):
        read_corpus(str(tmp_path / "c.csv"))
    rows.to_parquet(str(tmp_path / "c.parquet"))  # a typed table has rows, not lines
    with pytest.raises(UllmeError, match=r"c\.parquet: row 2: field 'text' is missing or empty"):
        read_corpus(str(tmp_path / "c.parquet"))
    with pytest.raises(UllmeError, match=r"stdin holds jsonl, tsv, text or csv, not parquet"):
        list(read_corpus("-", "parquet"))


TRIPLE = ("who wrote hamlet ?", ["Shakespeare wrote Hamlet ."], ["Hamlet is a play .", "Marlowe wrote Faustus ."])


@pytest.mark.parametrize(
    "row",
    [
        {"query": TRIPLE[0], "positive": TRIPLE[1], "negative": TRIPLE[2]},  # ours
        {"query": TRIPLE[0], "pos": TRIPLE[1], "neg": TRIPLE[2]},  # FlagEmbedding
        {"anchor": TRIPLE[0], "positive": TRIPLE[1][0], "negative_1": TRIPLE[2][0], "negative_2": TRIPLE[2][1]},  # sentence-transformers
        {"query_id": "q1", "query": TRIPLE[0], "positive_passages": [{"docid": "1", "title": "", "text": TRIPLE[1][0]}],
         "negative_passages": [{"docid": "2", "text": t} for t in TRIPLE[2]]},  # Tevatron  # fmt: skip
    ],
    ids=["ullme", "flagembedding", "sentence-transformers", "tevatron"],
)
def test_training_rows_in_the_neighbours_layouts(tmp_path, row):
    import json

    (example,), _ = read_training_examples(write(tmp_path, "t.jsonl", json.dumps(row) + "\n"))
    assert (example.query, example.positives, example.negatives) == (TRIPLE[0], TRIPLE[1], TRIPLE[2])


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet", "dataset"])
def test_training_rows_from_table_formats(tmp_path, fmt):
    from datasets import Dataset

    rows = [{"anchor": TRIPLE[0], "positive": TRIPLE[1][0], "negative": TRIPLE[2][0]}]
    path = tmp_path / f"t.{fmt}"
    if fmt == "tsv":
        path.write_text("anchor\tpositive\tnegative\n" + "\t".join(rows[0].values()) + "\n")
    elif fmt == "dataset":
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        getattr(Dataset.from_list(rows), f"to_{fmt}")(str(path), **({"index": False} if fmt == "csv" else {}))
    (example,), _ = read_training_examples(str(path))
    assert (example.query, example.positives, example.negatives) == (TRIPLE[0], TRIPLE[1][:1], TRIPLE[2][:1])
