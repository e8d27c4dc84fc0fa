"""`ullme search`: top-k over one or more index folders, merged, as JSON lines or a TREC run.

Scores are "higher is better" for every metric: inner products as they are, L2 and Hamming distances
negated. Several folders (one per encode shard) are searched one after another and their top-k merged,
which gives the same hits as one index over all vectors (exact indexes) and lets a corpus outgrow memory.

Over an index of chunk vectors (`encode --chunk-tokens`), hits are documents by default: the query's top
`chunk_depth` chunk hits are grouped by document, and each document scores as its best chunk (`max`, the
max-sim of vector-search stacks) or as the sum of its chunks among those hits (`sum`). A query's depth doubles
until it has k documents (or every chunk is in), so `max` ranks exactly as scoring every chunk would. Each
document hit carries its best chunk's id and character span. `aggregate=None` (`--chunks`) returns the
chunks themselves.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from ullme_cli.artifacts import (
    dequantize,
    embedding_files,
    load_embeddings,
    quantize,
    truncate,
)
from ullme_cli.data import read_corpus
from ullme_cli.errors import UllmeError, located
from ullme_cli.io.agreement import SAME_LAYOUT, SAME_VECTORS, require_agreement
from ullme_cli.io.outputs import STDIO, atomic_path, guard_output, output_lock
from ullme_cli.model_setup import ModelSetup, Runtime
from ullme_cli.progress import progress_bar
from ullme_cli.retrieval.index import (
    VECTORS_FILE,
    load_faiss_index,
    read_chunk_map,
    read_ids,
    read_manifest,
)
from ullme_cli.retrieval_options import CHUNK_DEPTH, SearchOptions

log = logging.getLogger(__name__)

QUERY_BATCH = 1024
HITS_AT_ONCE = 2**22  # hits (query rows x depth) one deep search holds at once: about 50 MB of scores and positions


class Hit(tuple):
    """One hit, unpacked as (id, score). A hit from an index of chunk vectors also names the chunk that
    matched (a document's best one), its character span in the document's text, and its document."""

    def __new__(cls, id: str, score: float, chunk: str | None = None, span: tuple[int, int] | None = None, doc: str | None = None):
        hit = super().__new__(cls, (id, score))
        hit.chunk, hit.span, hit.doc = chunk, span, doc
        return hit


@dataclass
class OpenIndex:
    folder: str
    manifest: dict
    index: object
    ids: list[str]
    vectors: np.ndarray | None  # exact copies for --rerank-exact
    chunks: list[dict] | None = None  # the chunk map of chunk vectors, row for row with ids

    @property
    def metric(self) -> str:
        return self.manifest["metric"]


def open_indexes(folders: list[str], mmap: bool = False) -> list[OpenIndex]:
    opened = []
    for folder in folders:
        manifest = read_manifest(folder)
        vectors_path = Path(folder) / VECTORS_FILE
        vectors = np.load(vectors_path, mmap_mode="r") if vectors_path.exists() else None
        index, ids = load_faiss_index(folder, mmap), read_ids(folder)
        if len(ids) != index.ntotal:
            raise located(str(Path(folder) / "ids.jsonl"), None, f"{len(ids)} ids for {index.ntotal} vectors in the index; build it again")
        opened.append(OpenIndex(folder, manifest, index, ids, vectors, read_chunk_map(folder, manifest)))
    first = opened[0].manifest
    owner: dict[str, str] = {}
    for other in opened:
        require_agreement(other.manifest, first, other.folder, opened[0].folder, (*SAME_LAYOUT, "query_instruction", "dim", "metric"))
        for doc in other.ids:  # one merged ranking: a document in two folders would be listed twice
            if owner.setdefault(doc, other.folder) != other.folder:
                raise UllmeError(f"{other.folder}: id '{doc}' is in {owner[doc]} too; search folders that hold different documents (shards of one corpus)")
    return opened


def set_search_parameters(index, nprobe: int | None, ef_search: int | None) -> None:
    import faiss

    if not hasattr(index, "ntotal") or isinstance(index, faiss.IndexBinary):
        return
    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is not None:
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError:
                pass  # this index type has no such parameter (e.g. nprobe on HNSW)


def exact_scores(queries: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray:
    """queries (q, d), candidates (q, c, d) -> (q, c) scores, higher is better."""
    if metric == "ip":
        return np.einsum("qd,qcd->qc", queries, candidates)
    return -((candidates - queries[:, None, :]) ** 2).sum(-1)


def search_one(opened: OpenIndex, queries: np.ndarray, k: int, rerank_exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of shape (q, k), higher score first; position -1 marks an empty slot."""
    fetch = min(max(4 * k, 100), opened.index.ntotal) if rerank_exact else min(k, opened.index.ntotal)
    distances, positions = opened.index.search(queries, fetch)
    lower_is_better = opened.metric == "l2" or opened.manifest["dtype"] == "binary"
    scores = -distances.astype(np.float32) if lower_is_better else distances.astype(np.float32)
    if rerank_exact:
        if opened.vectors is None:
            raise UllmeError(f"{opened.folder}: --rerank-exact needs {VECTORS_FILE} (kept for PQ/SQ indexes at build time)")
        safe = np.where(positions < 0, 0, positions)
        scores = exact_scores(queries, np.asarray(opened.vectors[safe.ravel()], dtype=np.float32).reshape(*safe.shape, -1), opened.metric)
        scores = np.where(positions < 0, -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
    return np.where(positions < 0, -np.inf, scores), positions  # FAISS returns hits best first


def index_query_record(manifest: dict) -> dict:
    """The vector record that queries against this index must have."""
    return ModelSetup.from_dict(manifest).vector_record("query", None, manifest["compute_dtype"], manifest["truncate_dim"])


def require_query_agreement(embedder, manifest: dict, what: str) -> None:
    """The one check that a loaded model embeds queries as the index's passages expect (setup, weights
    fingerprint, instruction, dtype): `ullme search` and `ullme serve` both run it."""
    require_agreement(embedder.vector_record("query", truncate_dim=manifest["truncate_dim"]), index_query_record(manifest), what,
                      "the index's queries", SAME_VECTORS)  # fmt: skip


def query_vectors(manifest: dict, queries: str | None, embeddings: str | None, input_format: str, runtime: Runtime, show_progress: bool,
                  check_ids=lambda ids, source: None):  # fmt: skip
    """Query ids and vectors: from a ready embeddings file, or encoded as the manifest says. `check_ids`
    sees the query ids (and where they come from) before any query is encoded."""
    expected = index_query_record(manifest)
    if embeddings is not None:
        matrix, qids, meta = load_embeddings(embeddings)
        check_ids(qids, embeddings)
        require_agreement(meta, expected, embeddings, "the index's queries", SAME_VECTORS)
        return qids, np.ascontiguousarray(dequantize(matrix, meta) if manifest["dtype"] != "binary" else matrix)
    if queries is None:
        raise UllmeError("search: give QUERIES (a file or -) or --embeddings")
    from ullme_cli.models.embedder import load_embedder

    records = read_corpus(queries, input_format)
    check_ids([r.id for r in records], queries)
    # The manifest's setup, fingerprint included: a model whose files changed since indexing is refused. The
    # queries are encoded in the dtype the passages were, unless the user names one (then it must agree).
    embedder = load_embedder(ModelSetup.from_dict(manifest), in_index_dtype(runtime, manifest))
    require_query_agreement(embedder, manifest, f"queries encoded now (--dtype {runtime.dtype})")
    texts = [r.text for r in records]
    parts = []
    with progress_bar(f"encode queries ({embedder.backend})", total=len(texts), enabled=show_progress) as advance:
        for start in range(0, len(texts), QUERY_BATCH):
            parts.append(embedder.encode(texts[start : start + QUERY_BATCH], kind="query"))
            advance(len(parts[-1]))
    embedder.report_truncation("search")
    return [r.id for r in records], as_index_queries(np.concatenate(parts), manifest)


def in_index_dtype(runtime: Runtime, manifest: dict) -> Runtime:
    """`runtime` with --dtype auto read as the dtype the index's passages were encoded in: queries are encoded
    alike (`ullme search` and `ullme serve --index`); a dtype the user names must agree with it."""
    return replace(runtime, dtype=manifest["compute_dtype"]) if runtime.dtype == "auto" else runtime


def as_index_queries(matrix: np.ndarray, manifest: dict) -> np.ndarray:
    """Full query vectors as the index searches with them: cut to its truncate_dim (renormalised where its
    vectors are), packed to bits for a binary index. `ullme search` and `ullme serve` both use this."""
    matrix = truncate(matrix.astype(np.float32), manifest.get("truncate_dim"), manifest["normalize"])
    if manifest["dtype"] == "binary":
        matrix = quantize(matrix, "binary")
    return np.ascontiguousarray(matrix)


def search(
    index_folders: list[str],
    queries: str | None = None,
    embeddings: str | None = None,
    options: SearchOptions = SearchOptions(),
    runtime: Runtime = Runtime(),
    input_format: str = "auto",
    show_progress: bool = True,
) -> Iterator[tuple[str, list[Hit]]]:
    """Yield (query id, [(doc id, score), ...]) in query order. `options.instruction` overrides the manifest's.
    For the trec format, every query and document id is checked before the first query is searched.
    `options.aggregate` ranks documents over an index of chunks (module docstring); None returns the chunks."""
    options.validate()
    opened = open_indexes(index_folders, options.mmap)
    manifest = opened[0].manifest if options.instruction is None else {**opened[0].manifest, "query_instruction": options.instruction}
    trec = options.format == "trec"
    if trec:
        for o in opened:
            refuse_trec_ids(o.ids, "document", o.folder)
    check_ids = (lambda ids, source: refuse_trec_ids(ids, "query", source)) if trec else (lambda ids, source: None)
    qids, vectors = query_vectors(manifest, queries, embeddings, input_format, runtime, show_progress, check_ids)
    yield from search_opened(opened, qids, vectors, options.k, options.nprobe, options.ef_search, options.rerank_exact, show_progress,
                             options.aggregate, options.chunk_depth)  # fmt: skip


def search_opened(
    opened: list[OpenIndex], qids: list[str], vectors: np.ndarray, k: int = 10, nprobe: int | None = None,
    ef_search: int | None = None, rerank_exact: bool = False, show_progress: bool = False,
    aggregate: str | None = "max", chunk_depth: int = CHUNK_DEPTH,
) -> Iterator[tuple[str, list[Hit]]]:
    """The per-query path over indexes already open: search each, merge, map positions to ids; over chunk
    vectors, rank documents by `aggregate` (None: the chunks)."""
    if vectors.shape[1] != opened[0].manifest["dim"]:
        raise UllmeError(f"query vectors have dimension {vectors.shape[1]}, the index {opened[0].manifest['dim']}")
    for o in opened:
        set_search_parameters(o.index, nprobe or o.manifest.get("nprobe"), ef_search or o.manifest.get("ef_search"))
    by_document = aggregate is not None and opened[0].chunks is not None
    total = sum(o.index.ntotal for o in opened)
    with progress_bar("search", total=len(qids), enabled=show_progress) as advance:
        for start in range(0, len(qids), QUERY_BATCH):
            batch = vectors[start : start + QUERY_BATCH]
            if by_document:
                ranked = document_hits(opened, batch, k, aggregate, rerank_exact, min(max(chunk_depth, k), total), total)
            else:
                ranked = [hits[:k] for hits in merged_hits(opened, batch, k, rerank_exact)]
            for row, hits in enumerate(ranked):
                yield qids[start + row], hits
            advance(len(batch))


def merged_hits(opened: list[OpenIndex], batch: np.ndarray, depth: int, rerank_exact: bool) -> list[list[Hit]]:
    """Each query's best `depth` hits over every folder, best first (a chunk hit with its span)."""
    parts = [search_one(o, batch, depth, rerank_exact) for o in opened]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    owners = np.concatenate([np.full(p[1].shape, n) for n, p in enumerate(parts)], axis=1)
    positions = np.concatenate([p[1] for p in parts], axis=1)
    if len(parts) > 1:  # merge the shards' lists into one list
        order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        scores, owners, positions = (np.take_along_axis(a, order, 1) for a in (scores, owners, positions))

    def hit(owner: int, position: int, score: float) -> Hit:
        o = opened[owner]
        if o.chunks is None:
            return Hit(o.ids[position], score)
        row = o.chunks[position]
        return Hit(o.ids[position], score, o.ids[position], (row["start"], row["end"]), row["doc"])

    return [
        [hit(owner, position, score) for owner, position, score in zip(owners[row].tolist(), positions[row].tolist(), scores[row].tolist()) if position >= 0]
        for row in range(len(batch))
    ]


def document_hits(opened: list[OpenIndex], batch: np.ndarray, k: int, aggregate: str, rerank_exact: bool, depth: int, total: int) -> list[list[Hit]]:
    """Each query's top k documents from its top `depth` chunk hits, its depth doubled until it has k documents
    or every chunk is in. Each query is ranked at its own depth, so its documents do not depend on the other
    queries of the batch, and rows are searched in blocks of at most HITS_AT_ONCE hits, so memory stays bounded
    however deep a query goes."""
    ranked: list[list[Hit] | None] = [None] * len(batch)
    todo = list(range(len(batch)))
    while todo:
        block = max(1, HITS_AT_ONCE // depth)
        for start in range(0, len(todo), block):
            rows = todo[start : start + block]
            for row, hits in zip(rows, merged_hits(opened, batch[rows], depth, rerank_exact)):
                documents = rank_documents(hits, aggregate, k)
                if len(documents) >= k or depth >= total:
                    ranked[row] = documents
        todo = [row for row in todo if ranked[row] is None]
        depth = min(2 * depth, total)
    return ranked


def rank_documents(hits: list[Hit], aggregate: str, k: int) -> list[Hit]:
    """Chunk hits (best first) grouped by document: each scores as its best chunk (max) or the sum of its
    chunks among `hits` (sum), and names its best chunk."""
    best: dict[str, Hit] = {}
    sums: dict[str, float] = {}
    for h in hits:
        best.setdefault(h.doc, h)
        sums[h.doc] = sums.get(h.doc, 0.0) + h[1]
    order = list(best) if aggregate == "max" else sorted(best, key=lambda d: -sums[d])  # sorted is stable: ties by best chunk
    return [Hit(d, best[d][1] if aggregate == "max" else sums[d], best[d].chunk, best[d].span, d) for d in order[:k]]


def refuse_trec_ids(ids, what: str, source) -> None:
    """A TREC run is split on whitespace: an id holding any (or an empty one) would shift the columns that
    trec_eval reads, so it is refused by name rather than written."""
    for value in ids:
        if not value or any(c.isspace() for c in value):
            raise UllmeError(f"{source}: {what} id {value!r} is empty or holds whitespace, which a TREC run cannot carry "
                             "(its columns are split on whitespace); use --format jsonl, or ids without spaces")  # fmt: skip


def hit_json(hit, rank: int, digits: int | None = 6) -> dict:
    """A hit as JSON: id, score (rounded to `digits`, None: as it is) and rank, and for a hit from chunk
    vectors its chunk and character span. `ullme search` and `serve`'s /v1/search both write this."""
    doc, score = hit
    row = {"id": doc, "score": round(score, digits) if digits is not None else score, "rank": rank}
    if getattr(hit, "chunk", None) is not None:
        row.update(chunk=hit.chunk, span=list(hit.span))
    return row


def format_hits(qid: str, hits: list[tuple[str, float]], fmt: str, tag: str = "ullme") -> str:
    if fmt == "trec":
        return "".join(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n" for rank, (doc, score) in enumerate(hits, start=1))
    return json.dumps({"qid": qid, "hits": [hit_json(h, r) for r, h in enumerate(hits, start=1)]}) + "\n"


@contextmanager
def open_output(path: str) -> Iterator[TextIO]:
    """stdout for '-', else a temporary file renamed into place only when all results are written."""
    if path == STDIO:
        with nullcontext(sys.stdout) as out:
            yield out
            out.flush()
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        yield out


def search_inputs(folders: list[str], queries: str | None, embeddings: str | None) -> list[str]:
    """What a search reads, for the output guard: the index folders, the queries or query embeddings (with
    their sidecars), and the models the indexes name (an output inside one would change its fingerprint)."""
    from ullme_cli.models.loading import model_inputs

    models = []
    for folder in folders:
        try:
            models += model_inputs(read_manifest(folder)["model"])
        except UllmeError:
            pass  # an unreadable index is reported, with its file, when it is opened
    return [*folders, queries, *embedding_files(embeddings or "-"), *models]


def write_results(results, output: str, fmt: str, inputs=(), overwrite: bool = False) -> int:
    """Write each query's hits as `fmt` (jsonl or trec, checked by SearchOptions.validate) to `output` or stdout."""
    guard_output([output], inputs, overwrite)
    count = 0
    with output_lock(output), open_output(output) as out:
        for qid, hits in results:
            out.write(format_hits(qid, hits, fmt))
            count += 1
    return count
