"""Long documents (docs/design.md §6, "Chunk vectors"): texts cut into windows of the tokenizer's own tokens,
embedded one vector per window or pooled by their token-weighted mean, indexed with their chunk map, and
ranked by document in `search`, `mine` and `serve`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import RESOURCES, demo_texts, run_cli, write_corpus
from hypothesis import assume, given
from hypothesis import strategies as st

from ullme_cli.artifacts import load_chunked_embeddings, load_embeddings
from ullme_cli.models.chunking import chunk_texts, windows

TRECQA = RESOURCES / "trecqa-test"
QUERY_INSTRUCTION = "Given a question, retrieve sentences that answer the question"


def corpus_texts() -> dict[str, str]:
    rows = [json.loads(line) for line in (TRECQA / "corpus.jsonl").read_text().splitlines()]
    return {row["_id"]: row["text"] for row in rows}


@given(count=st.integers(0, 400), size=st.integers(1, 64), overlap=st.integers(0, 63))
def test_windows_cover_every_token_in_order_with_the_overlap(count, size, overlap):
    assume(overlap < size)
    spans = windows(count, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == count
    assert all(0 <= b - a <= size for a, b in spans)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert b0 == a0 + size, "every window but the last is full"
        assert a1 == a0 + size - overlap and b0 - a1 == overlap, "consecutive windows share exactly the overlap"
    assert len(spans) == 1 or spans[-2][1] < count, "no window lies wholly past the end"


@pytest.fixture(scope="module")
def embedder(tiny_llama):
    from ullme_cli.models.embedder import Embedder

    return Embedder.load(str(tiny_llama), dtype="float32", max_length=48, query_instruction="Find the passage that answers")


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_chunk_boundaries_token_counts_overlap_and_spans(embedder, kind):
    texts = demo_texts(60)
    size, overlap = 12, 3
    chunks = chunk_texts(embedder, texts, kind, None, size, overlap)
    whole = embedder.tokenize(texts, kind, max_length=10_000)
    special = set(embedder.tokenizer.all_special_ids)
    assert (whole[0].instruction_tokens > 1) == (kind == "query")
    for doc, text in enumerate(texts):
        instruction = whole[doc].instruction_tokens  # the text's own count: its first word may merge with the prefix's end
        mine = [c for c in chunks if c.doc == doc]
        assert [c.number for c in mine] == list(range(len(mine)))
        content = []
        for c in mine:
            ids = c.tokens.ids
            assert len(ids) <= embedder.setup.max_length and 0 < c.count <= size
            assert c.tokens.instruction_tokens == instruction and ids[:instruction] == whole[doc].ids[:instruction], "the instruction leads every window"
            body = [i for i in ids[instruction:] if i not in special]
            assert len(body) == c.count
            if c.number:
                assert content[-overlap:] == body[:overlap], "consecutive windows share the overlap's tokens"
                content += body[overlap:]
            else:
                content += body
            assert 0 <= c.start <= c.end <= len(text)
            assert " ".join(embedder.tokenizer.decode(body).split()) == " ".join(text[c.start : c.end].split()), "the span slices the window's text"
        assert content == [i for i in whole[doc].ids[instruction:] if i not in special], "the windows cover the whole text's tokens, in order"
        if len(mine) == 1:
            assert mine[0].tokens == embedder.tokenize([text], kind)[0], "a text of one window is tokenized as without chunking"
    assert any(c.number > 0 for c in chunks), "some texts are longer than one window"


@pytest.fixture(scope="module")
def chunked(tiny_llama, tmp_path_factory):
    """The TREC QA test corpus as chunk vectors (none), pooled vectors (mean), plain vectors, its index, and queries."""
    root = tmp_path_factory.mktemp("chunked")
    common = ["-m", tiny_llama, "--dtype", "float32", "--max-length", "64", "--query-instruction", QUERY_INSTRUCTION, "-q"]
    corpus = TRECQA / "corpus.jsonl"
    for name, extra in {"chunks": ["--chunk-tokens", "16", "--chunk-overlap", "4"], "mean": ["--chunk-tokens", "16", "--chunk-overlap", "4", "--chunk-pool", "mean"],
                        "plain": []}.items():  # fmt: skip
        result = run_cli("encode", corpus, "-o", root / f"{name}.npy", *common, *extra)
        assert result.returncode == 0, result.stderr.decode()
    assert run_cli("encode", TRECQA / "queries.jsonl", "-o", root / "q.npy", "--kind", "query", *common).returncode == 0
    assert run_cli("index", root / "chunks.npy", "-o", root / "index", "-q").returncode == 0
    return root


def test_the_pooled_vector_is_the_token_weighted_mean_of_the_chunk_vectors(chunked):
    chunks, chunk_ids, meta, chunk_map = load_chunked_embeddings(str(chunked / "chunks.npy"))
    pooled, doc_ids, pooled_meta = load_embeddings(str(chunked / "mean.npy"))
    plain, plain_ids, _ = load_embeddings(str(chunked / "plain.npy"))
    assert meta["chunking"] == {"tokens": 16, "overlap": 4, "pool": "none"} and pooled_meta["chunking"]["pool"] == "mean"
    assert doc_ids == plain_ids and chunk_ids == [f"{row['doc']}#{row['chunk']}" for row in chunk_map]
    texts = corpus_texts()
    for row in chunk_map:
        assert texts[row["doc"]][row["start"] : row["end"]].strip(), "every span holds text"
    for position, doc in enumerate(doc_ids):
        rows = [i for i, row in enumerate(chunk_map) if row["doc"] == doc]
        weights = np.array([chunk_map[i]["tokens"] for i in rows], dtype=np.float64)
        expected = (weights[:, None] * chunks[rows].astype(np.float64)).sum(0)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(pooled[position], expected, atol=1e-6)
        if len(rows) == 1:  # one window: the very vector of the text encoded whole
            np.testing.assert_array_equal(pooled[position], chunks[rows[0]])
            np.testing.assert_allclose(chunks[rows[0]], plain[position], atol=1e-6)
    assert max(row["chunk"] for row in chunk_map) >= 2, "the corpus has texts of several windows"


def test_an_interrupted_chunked_encode_resumes_and_equals_an_uninterrupted_one(tiny_llama, tmp_path, caplog):
    from ullme_cli.encoding import EncodeOptions, encode_corpus
    from ullme_cli.model_setup import Runtime, resolve_setup
    from ullme_cli.models.embedder import load_embedder

    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(400))
    setup = resolve_setup(str(tiny_llama), max_length=64)
    options = EncodeOptions(chunk_tokens=8, chunk_overlap=2, token_budget=256)
    runtime = Runtime("float32")
    crashing = load_embedder(setup, runtime)
    original, calls = crashing.encode_batch, []

    def crash_after_some(items):
        calls.append(1)
        if len(calls) > 40:
            raise KeyboardInterrupt("killed")
        return original(items)

    crashing.encode_batch = crash_after_some
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(str(corpus), str(tmp_path / "e.npy"), setup, runtime, options, show_progress=False, embedder=crashing)
    done = list((tmp_path / "e.npy.partial").glob("chunk-*.npy"))
    assert done and not (tmp_path / "e.npy").exists()
    with caplog.at_level(logging.INFO, logger="ullme_cli.encoding"):
        encode_corpus(str(corpus), str(tmp_path / "e.npy"), setup, runtime, options, show_progress=False)
    assert f"{len(done)} of" in caplog.text, caplog.text
    encode_corpus(str(corpus), str(tmp_path / "fresh.npy"), setup, runtime, options, show_progress=False)
    resumed, fresh = load_chunked_embeddings(str(tmp_path / "e.npy")), load_chunked_embeddings(str(tmp_path / "fresh.npy"))
    assert resumed[1] == fresh[1] and resumed[3] == fresh[3]
    np.testing.assert_array_equal(resumed[0], fresh[0])


def test_shards_of_a_chunked_encode_join_into_the_whole(tiny_llama, chunked, tmp_path):
    common = ["-m", tiny_llama, "--dtype", "float32", "--max-length", "64", "-q", "--chunk-tokens", "16", "--chunk-overlap", "4"]
    for shard in ("1/2", "0/2"):
        assert run_cli("encode", TRECQA / "corpus.jsonl", "-o", tmp_path / f"s{shard[0]}.npy", "--shard", shard, *common).returncode == 0
    joined = run_cli("join", tmp_path / "s0.npy", tmp_path / "s1.npy", "-o", tmp_path / "j.npy", "-q")
    assert joined.returncode == 0, joined.stderr.decode()
    whole, parts = load_chunked_embeddings(str(chunked / "chunks.npy")), load_chunked_embeddings(str(tmp_path / "j.npy"))
    assert parts[1] == whole[1] and parts[3] == whole[3]
    np.testing.assert_allclose(parts[0], whole[0], atol=1e-6)
    plain = run_cli("encode", TRECQA / "corpus.jsonl", "-o", tmp_path / "p1.npy", "--shard", "1/2", *common[:6])
    assert plain.returncode == 0
    mixed = run_cli("join", tmp_path / "s0.npy", tmp_path / "p1.npy", "-o", tmp_path / "m.npy")
    assert mixed.returncode == 2 and "'chunking' is None here but" in mixed.stderr.decode()


def brute_force(chunked, aggregate: str):
    """Every query's score of every document over all its chunks, and the chunks that reach its best score."""
    queries, qids, _ = load_embeddings(str(chunked / "q.npy"))
    vectors, _, _, chunk_map = load_chunked_embeddings(str(chunked / "chunks.npy"))
    scores = (queries.astype(np.float64) @ vectors.T.astype(np.float64))
    expected = {}
    for q, qid in enumerate(qids):
        by_doc: dict[str, list[int]] = {}
        for i, row in enumerate(chunk_map):
            by_doc.setdefault(row["doc"], []).append(i)
        value, best = {}, {}
        for doc, rows in by_doc.items():
            top = max(scores[q, rows])
            value[doc] = top if aggregate == "max" else float(scores[q, rows].sum())
            best[doc] = {f"{doc}#{chunk_map[i]['chunk']}": [chunk_map[i]["start"], chunk_map[i]["end"]] for i in rows if scores[q, i] >= top - 1e-6}
        expected[qid] = (value, best)
    return expected


@pytest.mark.parametrize("aggregate, depth", [("max", []), ("sum", ["--chunk-depth", "100000"])])
def test_search_ranks_documents_as_the_brute_force_reference(chunked, aggregate, depth):
    """Over every chunk, a document's score is its best chunk's (max) or all its chunks' sum (sum, with a depth
    that takes every chunk in). Ties (documents sharing a passage) may come in either order."""
    result = run_cli("search", chunked / "index", "--embeddings", chunked / "q.npy", "-k", "5", "--aggregate", aggregate, *depth, "-q")
    assert result.returncode == 0, result.stderr.decode()
    expected = brute_force(chunked, aggregate)
    for line in result.stdout.decode().splitlines():
        found = json.loads(line)
        value, best = expected[found["qid"]]
        top = sorted(value.values(), reverse=True)[:5]
        np.testing.assert_allclose([h["score"] for h in found["hits"]], top, atol=2e-5)
        np.testing.assert_allclose([h["score"] for h in found["hits"]], [value[h["id"]] for h in found["hits"]], atol=2e-5)
        assert len({h["id"] for h in found["hits"]}) == 5
        for hit in found["hits"]:
            assert best[hit["id"]].get(hit["chunk"]) == hit["span"], "the hit names its best chunk and that chunk's span"


def test_search_chunks_returns_chunks_and_trec_runs_name_documents(chunked):
    chunks = run_cli("search", chunked / "index", "--embeddings", chunked / "q.npy", "-k", "3", "--chunks", "-q")
    first = json.loads(chunks.stdout.decode().splitlines()[0])
    assert all("#" in h["id"] and h["chunk"] == h["id"] for h in first["hits"])
    trec = run_cli("search", chunked / "index", "--embeddings", chunked / "q.npy", "-k", "3", "--format", "trec", "-q")
    assert trec.returncode == 0 and all("#" not in line.split()[2] for line in trec.stdout.decode().splitlines())
    run = chunked / "run.trec"
    run.write_bytes(trec.stdout)
    scored = run_cli("evaluate", "--run", run, "--qrels", TRECQA / "qrels" / "test.tsv", "-q")
    assert scored.returncode == 0, scored.stderr.decode()


def test_mine_on_a_chunked_corpus_takes_documents_and_writes_their_best_chunk(tiny_llama, chunked, tmp_path):
    training = tmp_path / "train.jsonl"
    training.write_text("".join(line + "\n" for line in (RESOURCES / "trecqa-train" / "train.jsonl").read_text().splitlines()[:6]))
    mined = run_cli("mine", training, "--corpus", TRECQA / "corpus.jsonl", "-o", tmp_path / "m.jsonl", "-m", tiny_llama, "--dtype", "float32",
                    "--max-length", "64", "--corpus-embeddings", chunked / "chunks.npy", "--negatives", "3", "--range", "0:", "-q")  # fmt: skip
    assert mined.returncode == 0, mined.stderr.decode()
    _, _, _, chunk_map = load_chunked_embeddings(str(chunked / "chunks.npy"))
    texts = corpus_texts()
    passage_of = {texts[row["doc"]][row["start"] : row["end"]]: row["doc"] for row in chunk_map}
    from ullme_cli.models.embedder import Embedder

    embedder = Embedder.load(str(tiny_llama), dtype="float32", max_length=64)
    vectors, _, _, _ = load_chunked_embeddings(str(chunked / "chunks.npy"))
    for line in (tmp_path / "m.jsonl").read_text().splitlines():
        row = json.loads(line)
        negatives = row["negative"]
        assert len(negatives) == 3 and all(n in passage_of for n in negatives), "each negative is a chunk's text"
        assert len({passage_of[n] for n in negatives}) == 3, "one negative per document"
        query = embedder.encode([row["query"]], kind="query")[0]
        best = {}
        for score, chunk in sorted(zip((vectors @ query).tolist(), chunk_map), key=lambda x: -x[0]):
            best.setdefault(chunk["doc"], texts[chunk["doc"]][chunk["start"] : chunk["end"]])
        blocked = {" ".join(p.split()).lower() for p in row["positive"]} | {" ".join(row["query"].split()).lower()}
        expected = [t for d, t in best.items() if " ".join(t.split()).lower() not in blocked and " ".join(texts[d].split()).lower() not in blocked][:3]
        assert negatives == expected, "the best documents by max-sim, each as its best chunk"


def test_serve_follows_its_long_input_policy_and_searches_documents(tiny_llama, chunked, tmp_path):
    """`--on-long mean` embeds an over-long input as windows of max_length pooled by their token-weighted mean
    (= `encode --chunk-tokens <room> --chunk-pool mean`), for documents and for queries with their instruction;
    `truncate` cuts it as encode does, `error` is a 413 (tests/test_serve.py); usage says what happened.
    /v1/search over a chunk index returns documents."""
    httpx = pytest.importorskip("httpx")
    from test_serve import Server

    long_text = " ".join(demo_texts(12))
    texts = [demo_texts(1)[0], long_text]
    corpus = write_corpus(tmp_path / "c.jsonl", texts)
    common = ["-m", tiny_llama, "--dtype", "float32", "--max-length", "64", "-q"]
    for name, extra in {"mean": ["--chunk-tokens", "63", "--chunk-pool", "mean"], "plain": [], "chunks": ["--chunk-tokens", "63"]}.items():
        assert run_cli("encode", corpus, "-o", tmp_path / f"{name}.npy", *common, *extra).returncode == 0
    windows_of_long = sum(1 for i in load_embeddings(str(tmp_path / "chunks.npy"))[1] if i.startswith("d1#"))
    assert windows_of_long >= 3
    # A query's windows leave room for its instruction: as many tokens as max_length leaves beside it.
    from ullme_cli.models.embedder import Embedder

    embedder = Embedder.load(str(tiny_llama), dtype="float32", max_length=64, query_instruction=QUERY_INSTRUCTION)
    query_windows = chunk_texts(embedder, texts, "query", None, None)
    room = next(w for w in query_windows if w.doc == 1).count
    queries_over = len({w.doc for w in query_windows if w.number > 0})
    assert run_cli("encode", corpus, "-o", tmp_path / "query-mean.npy", *common, "--kind", "query", "--query-instruction", QUERY_INSTRUCTION,
                   "--chunk-tokens", str(room), "--chunk-pool", "mean").returncode == 0  # fmt: skip
    for policy, expected_file in (("mean", "mean.npy"), ("truncate", "plain.npy")):
        server = Server(tiny_llama, "--dtype", "float32", "--max-length", "64", "--on-long", policy, "--index", chunked / "index",
                        "--query-instruction", QUERY_INSTRUCTION)  # fmt: skip
        try:
            answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=60).json()
            served = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
            expected = np.load(tmp_path / expected_file)
            cosines = (served * expected).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(expected, axis=1)
            assert cosines.min() >= 0.9999, (policy, cosines)
            usage = answer["usage"]
            if policy == "mean":
                assert usage["chunked_inputs"] == 1 and usage["chunks"] == 1 + windows_of_long, usage
            else:
                assert usage["truncated_inputs"] == 1 and "chunks" not in usage, usage
            if policy == "mean":
                answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts, "input_type": "query"}, timeout=60).json()
                served = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
                expected = np.load(tmp_path / "query-mean.npy")
                cosines = (served * expected).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(expected, axis=1)
                assert cosines.min() >= 0.9999 and answer["usage"]["chunked_inputs"] == queries_over, (cosines, answer["usage"])
            else:  # `ullme search` cuts over-long queries as this server does (the instruction fills most of 64 tokens here)
                queries = [json.loads(line)["text"] for line in (TRECQA / "queries.jsonl").read_text().splitlines()][:4]
                response = httpx.post(f"{server.url}/v1/search", json={"query": queries, "k": 3}, timeout=60)
                assert response.status_code == 200, response.text
                hits = response.json()["data"]
                cli = run_cli("search", chunked / "index", TRECQA / "queries.jsonl", "-k", "3", "-q", "--dtype", "float32")
                reference = [json.loads(line) for line in cli.stdout.decode().splitlines()][:4]
                for mine, theirs in zip(hits, reference):
                    assert [(h["id"], h["chunk"], h["span"]) for h in mine["hits"]] == [(h["id"], h["chunk"], h["span"]) for h in theirs["hits"]]
                    assert all("#" not in h["id"] for h in mine["hits"]), "documents, not chunks"
        finally:
            assert server.stop() == 0


def test_latent_attention_pooling_chunks_like_the_others(tiny_llama, tmp_path):
    """Each window goes through the latent head, then the windows are averaged: a text of one window keeps its
    unchunked vector, and the mean is the token-weighted mean of the windows' vectors."""
    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(30))
    common = ["-m", tiny_llama, "--dtype", "float32", "--pooling", "latent-attention", "-q"]
    for name, extra in {"plain": [], "chunks": ["--chunk-tokens", "48"], "mean": ["--chunk-tokens", "48", "--chunk-pool", "mean"]}.items():
        result = run_cli("encode", corpus, "-o", tmp_path / f"{name}.npy", *common, *extra)
        assert result.returncode == 0, result.stderr.decode()
    plain, ids, _ = load_embeddings(str(tmp_path / "plain.npy"))
    chunks, _, _, chunk_map = load_chunked_embeddings(str(tmp_path / "chunks.npy"))
    pooled, _, _ = load_embeddings(str(tmp_path / "mean.npy"))
    singles = 0
    for position, doc in enumerate(ids):
        rows = [i for i, row in enumerate(chunk_map) if row["doc"] == doc]
        weights = np.array([chunk_map[i]["tokens"] for i in rows], dtype=np.float64)
        expected = (weights[:, None] * chunks[rows].astype(np.float64)).sum(0)
        np.testing.assert_allclose(pooled[position], expected / np.linalg.norm(expected), atol=1e-6)
        if len(rows) == 1:
            singles += 1
            np.testing.assert_allclose(chunks[rows[0]], plain[position], atol=1e-6)
    assert 0 < singles < len(ids), "both texts of one window and longer ones"


def test_deep_searches_hold_a_bounded_block_of_hits_and_rank_the_same(chunked, monkeypatch):
    """Document ranking and mining search a block of queries at a time (HITS_AT_ONCE hits): with a block of a
    single query, every query is ranked as in one batch."""
    from ullme_cli.retrieval import mine, search

    queries, qids, _ = load_embeddings(str(chunked / "q.npy"))
    opened = search.open_indexes([str(chunked / "index")])
    for aggregate in ("max", "sum"):
        whole = [[tuple(h) + (h.chunk,) for h in hits] for _, hits in search.search_opened(opened, qids, queries, 5, aggregate=aggregate)]
        monkeypatch.setattr(search, "HITS_AT_ONCE", 1)
        blocked = [[tuple(h) + (h.chunk,) for h in hits] for _, hits in search.search_opened(opened, qids, queries, 5, aggregate=aggregate)]
        monkeypatch.undo()
        assert blocked == whole, aggregate
    index = opened[0].index
    whole = list(mine.searched_in_blocks(index, queries, 40))
    monkeypatch.setattr(mine, "HITS_AT_ONCE", 1)
    blocked = list(mine.searched_in_blocks(index, queries, 40))
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(whole, blocked)) and len(whole) == len(blocked) == len(queries)


def test_a_damaged_chunk_map_is_one_line_naming_the_file(chunked, tmp_path):
    import shutil

    shutil.copytree(chunked / "index", tmp_path / "index")
    (tmp_path / "index" / "chunks.jsonl").write_text('{"doc": "d0", "chunk": 0,\n')
    result = run_cli("search", tmp_path / "index", "--embeddings", chunked / "q.npy", "-q")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "chunks.jsonl: its chunk map is not JSON lines" in lines[0], lines
