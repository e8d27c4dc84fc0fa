"""ullme index / search / mine: round trips, recall against Flat, TREC output, shard merging, refusals."""

import json

import numpy as np
import pytest
from conftest import DEMO_CORPUS, RESOURCES, demo_texts, run_cli

from ullme_cli.artifacts import load_embeddings, save_embeddings
from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import ModelSetup, Runtime
from ullme_cli.retrieval.index import build_index
from ullme_cli.retrieval_options import IndexOptions, SearchOptions
from ullme_cli.retrieval.search import search

META = {**ModelSetup(model="m", fingerprint="f" * 64, instruction_template="{instruction}").record(),
        "truncate_dim": None, "dtype": "float32", "kind": "passage", "instruction": "", "compute_dtype": "float32", "corpus_fingerprint": "c0"}  # fmt: skip


def clustered_vectors(n: int, dim: int = 64, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around cluster centres: the shape real embeddings have (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(path, vectors, prefix="d", **meta):
    ids = [f"{prefix}{i}" for i in range(len(vectors))]
    save_embeddings(str(path), vectors, ids, {**META, "corpus_fingerprint": f"{path}", **meta, "dim": vectors.shape[1]})
    return ids


@pytest.fixture(scope="module")
def demo_index(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert run_cli("encode", DEMO_CORPUS, "-o", folder / "emb.npy", "--model", tiny_llama, "-q").returncode == 0
    result = run_cli("index", folder / "emb.npy", "-o", folder / "idx")
    assert result.returncode == 0, result.stderr.decode()
    assert b"factory auto -> Flat" in result.stderr
    return folder


def test_flat_round_trip_finds_each_passage_as_its_own_top_hit(demo_index, tmp_path):
    result = run_cli("search", demo_index / "idx", DEMO_CORPUS, "-k", "1", "-q")
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(rows) == len(demo_texts())
    assert all(row["hits"][0]["id"] == row["qid"] for row in rows)
    manifest = json.loads((demo_index / "idx" / "manifest.json").read_text())
    assert manifest["factory"] == "Flat" and manifest["metric"] == "ip" and manifest["count"] == len(rows)


@pytest.mark.parametrize("factory", ["IVF512,Flat", "HNSW32"])
def test_approximate_indexes_reach_recall_095_at_defaults(tmp_path, factory):
    corpus, queries = clustered_vectors(20_000), clustered_vectors(200, seed=1)
    write_vectors(tmp_path / "c.npy", corpus)
    write_vectors(tmp_path / "q.npy", queries, prefix="q", kind="query")
    build_index(str(tmp_path / "c.npy"), str(tmp_path / "flat"), IndexOptions("Flat"))
    build_index(str(tmp_path / "c.npy"), str(tmp_path / "ann"), IndexOptions(factory))
    exact = dict(search([str(tmp_path / "flat")], embeddings=str(tmp_path / "q.npy"), show_progress=False))
    approx = dict(search([str(tmp_path / "ann")], embeddings=str(tmp_path / "q.npy"), show_progress=False))
    recall = np.mean([len({d for d, _ in approx[q]} & {d for d, _ in exact[q]}) / 10 for q in exact])
    assert recall >= 0.95, recall


def test_trec_run_is_read_by_pytrec_eval(demo_index, tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    queries = RESOURCES / "demo" / "queries.jsonl"
    result = run_cli("search", demo_index / "idx", queries, "-k", "20", "--format", "trec", "-o", tmp_path / "run.trec", "-q")
    assert result.returncode == 0, result.stderr.decode()
    with open(tmp_path / "run.trec") as f:
        run = pytrec_eval.parse_run(f)
    assert len(run) == 25 and all(len(hits) == 20 for hits in run.values())
    qrels = {q: {d: 1 for d in list(hits)[:1]} for q, hits in run.items()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert all(s["ndcg_cut_10"] > 0 for s in scores.values())


def test_merging_shard_indexes_gives_the_same_top_k_as_one_index(tmp_path):
    corpus, queries = clustered_vectors(3000), clustered_vectors(50, seed=2)
    ids = write_vectors(tmp_path / "all.npy", corpus)
    save_embeddings(str(tmp_path / "a.npy"), corpus[:1000], ids[:1000], {**META, "dim": 64, "corpus_fingerprint": "a"})
    save_embeddings(str(tmp_path / "b.npy"), corpus[1000:], ids[1000:], {**META, "dim": 64, "corpus_fingerprint": "b"})
    write_vectors(tmp_path / "q.npy", queries, prefix="q", kind="query")
    for name in ("all", "a", "b"):
        build_index(str(tmp_path / f"{name}.npy"), str(tmp_path / f"idx-{name}"), IndexOptions("Flat"))
    one = list(search([str(tmp_path / "idx-all")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10), show_progress=False))
    merged = list(search([str(tmp_path / "idx-a"), str(tmp_path / "idx-b")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10), show_progress=False))
    assert [[d for d, _ in hits] for _, hits in one] == [[d for d, _ in hits] for _, hits in merged]
    mapped = list(search([str(tmp_path / "idx-all")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10, mmap=True), show_progress=False))
    assert mapped == one


def test_add_appends_and_pq_rerank_recovers_exact_order(tmp_path):
    corpus, queries = clustered_vectors(6000, seed=3), clustered_vectors(100, seed=4)
    write_vectors(tmp_path / "a.npy", corpus[:3000])
    save_embeddings(str(tmp_path / "b.npy"), corpus[3000:], [f"e{i}" for i in range(3000)], {**META, "dim": 64, "corpus_fingerprint": "b"})
    write_vectors(tmp_path / "q.npy", queries, prefix="q", kind="query")
    build_index(str(tmp_path / "a.npy"), str(tmp_path / "pq"), IndexOptions("IVF64,PQ32x4"))
    manifest, _ = build_index(str(tmp_path / "b.npy"), str(tmp_path / "pq"), IndexOptions(add=True))
    assert manifest["count"] == 6000 and (tmp_path / "pq" / "vectors.npy").exists()
    exact = (queries @ corpus.T).argmax(1)
    all_ids = [f"d{i}" for i in range(3000)] + [f"e{i}" for i in range(3000)]
    def top1(rerank):
        hits = search([str(tmp_path / "pq")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=1, nprobe=64, rerank_exact=rerank), show_progress=False)
        return np.mean([h[0][0] == all_ids[e] for (_, h), e in zip(hits, exact)])
    reranked, compressed = top1(True), top1(False)
    assert reranked >= 0.95 and reranked > compressed


def test_index_refusals(tmp_path):
    write_vectors(tmp_path / "a.npy", clustered_vectors(100))
    build_index(str(tmp_path / "a.npy"), str(tmp_path / "idx"), IndexOptions("Flat"))
    write_vectors(tmp_path / "wide.npy", clustered_vectors(10, dim=32), prefix="w")
    with pytest.raises(UllmeError, match="dimension 32 does not match the index \\(64\\)"):
        build_index(str(tmp_path / "wide.npy"), str(tmp_path / "idx"), IndexOptions(add=True))
    write_vectors(tmp_path / "other.npy", clustered_vectors(10), prefix="o", fingerprint="e" * 64)
    with pytest.raises(UllmeError, match="does not agree with the index .*: the model files differ"):
        build_index(str(tmp_path / "other.npy"), str(tmp_path / "idx"), IndexOptions(add=True))
    write_vectors(tmp_path / "pooled.npy", clustered_vectors(10), prefix="o", pooling="cls")
    with pytest.raises(UllmeError, match="'pooling' is 'cls' here but 'mean' there"):
        build_index(str(tmp_path / "pooled.npy"), str(tmp_path / "idx"), IndexOptions(add=True))
    with pytest.raises(UllmeError, match="this corpus \\(the same ids and texts\\) is in the index"):
        build_index(str(tmp_path / "a.npy"), str(tmp_path / "idx"), IndexOptions(add=True))
    write_vectors(tmp_path / "clash.npy", clustered_vectors(10, seed=9))
    with pytest.raises(UllmeError, match="id 'd0' is already in the index"):
        build_index(str(tmp_path / "clash.npy"), str(tmp_path / "idx"), IndexOptions(add=True))
    (tmp_path / "a.ids.jsonl").write_text('"only-one"\n')
    with pytest.raises(UllmeError, match="1 ids for 100 embeddings"):
        build_index(str(tmp_path / "a.npy"), str(tmp_path / "idx2"))
    save_embeddings(str(tmp_path / "empty.npy"), np.zeros((0, 64), np.float32), [], META)
    result = run_cli("index", tmp_path / "empty.npy", "-o", tmp_path / "idx3")
    assert result.returncode == 2 and b"no embeddings (empty input)" in result.stderr
    assert not (tmp_path / "idx3").exists()
    write_vectors(tmp_path / "good.npy", clustered_vectors(100))
    result = run_cli("index", tmp_path / "good.npy", "-o", tmp_path / "idx4", "--factory", "Nonsense42")
    assert result.returncode == 2 and b"--factory 'Nonsense42'" in result.stderr


def test_mine_fills_negatives_skipping_positives_and_reuses_the_cache(tiny_llama, tmp_path):
    texts = demo_texts(60)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": texts[i], "positive": texts[i + 1]}) + "\n" for i in range(0, 20, 2)))
    args = ["mine", train, "--corpus", corpus, "-o", tmp_path / "mined.jsonl", "--model", tiny_llama, "--negatives", "3", "--range", "2:", "-q"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for row in rows:
        assert len(row["negative"]) == 3
        assert row["query"] not in row["negative"] and row["positive"][0] not in row["negative"]
    again = run_cli(*args)
    assert again.returncode == 2 and b"exists already; pass --overwrite" in again.stderr
    second = run_cli(*args[:-1], "--overwrite")  # without -q: the reuse is an info line
    assert second.returncode == 0 and b"reusing corpus embeddings" in second.stderr


def test_query_instruction_travels_from_encode_to_search(tiny_llama, tmp_path):
    from ullme_cli.models.embedder import Embedder

    instruction = "Given a question, retrieve sentences that answer it"
    assert run_cli("encode", DEMO_CORPUS, "-o", tmp_path / "e.npy", "--model", tiny_llama, "--query-instruction", instruction, "--dtype", "float32", "-q").returncode == 0
    assert run_cli("index", tmp_path / "e.npy", "-o", tmp_path / "idx").returncode == 0
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["query_instruction"] == instruction
    hits = dict(search([str(tmp_path / "idx")], queries=str(RESOURCES / "demo" / "queries.jsonl"), options=SearchOptions(k=3), runtime=Runtime("float32"), show_progress=False))
    embedder = Embedder.load(str(tiny_llama), dtype="float32", query_instruction=instruction)
    question = json.loads((RESOURCES / "demo" / "queries.jsonl").read_text().splitlines()[0])["text"]
    expected = embedder.encode([question], kind="query")[0]
    corpus, ids, _ = load_embeddings(str(tmp_path / "e.npy"))
    assert [d for d, _ in hits["q0"]] == [ids[i] for i in np.argsort(-(corpus @ expected))[:3]]
    overridden = dict(search([str(tmp_path / "idx")], queries=str(RESOURCES / "demo" / "queries.jsonl"), options=SearchOptions(k=3, instruction=""), runtime=Runtime("float32"), show_progress=False))
    assert overridden["q0"] != hits["q0"]


def test_ivf_shards_trained_from_one_index_merge_to_exactly_one_ivf_index(tmp_path):
    """The multi-node layout: one trained IVF index, a shard index per node built from its centroids
    (`--trained-from`), merged at search time, gives the same hits and scores as one IVF index over all
    vectors with the same centroids."""
    corpus, queries = clustered_vectors(8000, seed=5), clustered_vectors(100, seed=6)
    ids = write_vectors(tmp_path / "all.npy", corpus)
    write_vectors(tmp_path / "q.npy", queries, prefix="q", kind="query")
    build_index(str(tmp_path / "all.npy"), str(tmp_path / "trained"), IndexOptions("IVF64,Flat"))
    for shard in range(4):
        rows = slice(shard * 2000, (shard + 1) * 2000)
        save_embeddings(str(tmp_path / f"s{shard}.npy"), corpus[rows], ids[rows], {**META, "dim": 64, "corpus_fingerprint": f"s{shard}"})
    result = run_cli("index", tmp_path / "s0.npy", "-o", tmp_path / "idx-0", "--trained-from", tmp_path / "trained")
    assert result.returncode == 0, result.stderr.decode()
    for shard in range(1, 4):
        build_index(str(tmp_path / f"s{shard}.npy"), str(tmp_path / f"idx-{shard}"), IndexOptions(trained_from=str(tmp_path / "trained")))
    one = list(search([str(tmp_path / "trained")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10, nprobe=8), show_progress=False))
    merged = list(search([str(tmp_path / f"idx-{s}") for s in range(4)], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10, nprobe=8), show_progress=False))
    assert [[d for d, _ in hits] for _, hits in merged] == [[d for d, _ in hits] for _, hits in one]
    np.testing.assert_allclose([[s for _, s in hits] for _, hits in merged], [[s for _, s in hits] for _, hits in one], atol=1e-6)
    # nprobe 8 of 64 lists is approximate: the shards must agree with one IVF index, not with exact search
    exact = list(search([str(tmp_path / "trained")], embeddings=str(tmp_path / "q.npy"), options=SearchOptions(k=10, nprobe=64), show_progress=False))
    assert [[d for d, _ in h] for _, h in exact] != [[d for d, _ in h] for _, h in one]
