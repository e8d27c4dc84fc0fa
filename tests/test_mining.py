"""`ullme mine` controls on the bundled TREC QA rows: rank range, sampling, margin and score ceiling."""

import json

import numpy as np
import pytest
from conftest import RESOURCES, run_cli

from ullme_cli.artifacts import load_embeddings
from ullme_cli.data import read_training_examples
from ullme_cli.model_setup import Runtime, resolve_setup
from ullme_cli.models.embedder import Embedder
from ullme_cli.retrieval.mine import MiningOptions, mine_negatives

TRAIN = RESOURCES / "trecqa-train" / "train.jsonl"


@pytest.fixture(scope="module")
def trecqa(tiny_llama, tmp_path_factory):
    """The first 20 bundled training rows, and a corpus of every sentence of all rows."""
    folder = tmp_path_factory.mktemp("mining")
    examples, _ = read_training_examples(str(TRAIN))
    texts = sorted({t for ex in examples for t in ex.positives + ex.negatives})
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    (folder / "train.jsonl").write_text("".join(json.dumps({"query": ex.query, "positive": ex.positives}) + "\n" for ex in examples[:20]))
    return folder


# float32 on both sides: under bf16 the compile policy decides from measured rates, so a busy machine could
# compile one run and not the other, and near-tied ranks would then flip between mine and this reference.
def mine(tiny_llama, folder, name, **options):
    out = folder / f"{name}.jsonl"
    mine_negatives(str(folder / "train.jsonl"), str(folder / "corpus.jsonl"), str(out), resolve_setup(str(tiny_llama)), Runtime("float32"),
                   options=MiningOptions(**options), overwrite=True, show_progress=False)  # fmt: skip
    return [json.loads(line) for line in out.read_text().splitlines()]


def scored(tiny_llama, folder, rows):
    """Each row's corpus texts in rank order with their scores, and the row's weakest positive score."""
    matrix, ids, _ = load_embeddings(str(next(folder.glob("*.cache")) / "corpus.npy"))
    texts = [json.loads(line)["text"] for line in (folder / "corpus.jsonl").read_text().splitlines()]
    embedder = Embedder.load(str(tiny_llama), dtype="float32")
    queries = embedder.encode([r["query"] for r in rows], kind="query")
    result = []
    for row, q in zip(rows, queries):
        scores = matrix @ q
        order = np.argsort(-scores, kind="stable")
        positives = embedder.encode(row["positive"], kind="passage") @ q
        result.append(([texts[i] for i in order], {texts[i]: float(scores[i]) for i in order}, float(positives.min())))
    return result


def test_range_sample_margin_and_max_score(tiny_llama, trecqa):
    top = mine(tiny_llama, trecqa, "top", negatives=3, start=2, stop=12)
    for row, (ranked, scores, _) in zip(top, scored(tiny_llama, trecqa, top)):
        window = [t for t in ranked[2:12] if t not in row["positive"]]
        assert row["negative"] == window[:3]  # the best three of ranks 2..11, positives left out

    sampled = mine(tiny_llama, trecqa, "sampled", negatives=3, start=2, stop=12, sample=True, seed=1)
    again = mine(tiny_llama, trecqa, "again", negatives=3, start=2, stop=12, sample=True, seed=1)
    assert sampled == again  # seeded
    assert any(a["negative"] != b["negative"] for a, b in zip(sampled, top))
    for row, (ranked, _, _) in zip(sampled, scored(tiny_llama, trecqa, sampled)):
        assert set(row["negative"]) <= set(ranked[2:12]) and not set(row["negative"]) & set(row["positive"])

    margin = mine(tiny_llama, trecqa, "margin", negatives=3, start=0, margin=0.02)
    dropped = 0
    for row, (ranked, scores, weakest) in zip(margin, scored(tiny_llama, trecqa, margin)):
        assert all(scores[n] <= weakest - 0.02 for n in row["negative"])
        dropped += any(scores[t] > weakest - 0.02 for t in ranked[:3] if t not in row["positive"])
    assert dropped > 0  # the margin did remove likely false negatives somewhere

    relative = mine(tiny_llama, trecqa, "relative", negatives=3, start=0, relative_margin=0.05)
    dropped = 0
    for row, (ranked, scores, weakest) in zip(relative, scored(tiny_llama, trecqa, relative)):
        assert all(scores[n] <= weakest * 0.95 + 1e-6 for n in row["negative"])
        dropped += any(scores[t] > weakest * 0.95 for t in ranked[:3] if t not in row["positive"])
    assert dropped > 0  # sentence-transformers' relative margin removed some candidates

    # A ceiling in the middle of the candidate pool (the top 100 ranks): the best candidates are cut.
    ceiling = float(np.median([scores[t] for ranked, scores, _ in scored(tiny_llama, trecqa, top) for t in ranked[:100]]))
    capped = mine(tiny_llama, trecqa, "capped", negatives=3, start=0, max_score=ceiling)
    for row, (ranked, scores, _) in zip(capped, scored(tiny_llama, trecqa, capped)):
        assert all(scores[n] <= ceiling for n in row["negative"])
    assert sum(bool(row["negative"]) for row in capped) >= len(capped) // 2
    assert any(row["negative"] != top_row["negative"] for row, top_row in zip(capped, top))


def test_the_cli_takes_the_same_options(tiny_llama, trecqa, tmp_path):
    """Also: training rows in sentence-transformers' layout as parquet, the corpus as csv, the model options."""
    from datasets import Dataset

    train = [json.loads(line) for line in (trecqa / "train.jsonl").read_text().splitlines()]
    Dataset.from_list([{"anchor": r["query"], "positive": r["positive"]} for r in train]).to_parquet(str(tmp_path / "t.parquet"))
    corpus = [json.loads(line) for line in (trecqa / "corpus.jsonl").read_text().splitlines()]
    Dataset.from_list(corpus).to_csv(str(tmp_path / "c.csv"), index=False)
    out = tmp_path / "m.jsonl"
    result = run_cli("mine", tmp_path / "t.parquet", "--corpus", tmp_path / "c.csv", "-o", out, "--model", tiny_llama,
                     "--negatives", "2", "--range", "1:8", "--sample", "--seed", "3", "--margin", "0.01", "--max-score", "0.99",
                     "--attention", "bidirectional", "--max-length", "64", "--device", "cpu", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["negative"]) <= 2 for r in rows)
