"""`ullme mine`: fill training rows with hard negatives retrieved from a corpus (FlagEmbedding style).

For each training query, search the corpus exactly and take candidates from the rank range [A, B) (the
top ranks are often unlabelled positives), leaving out the known positives, candidates that score within
`margin` of the row's weakest positive, and candidates above `max_score` (the usual guards against false
negatives); then keep the best `negatives` of them, or a seeded random sample (`sample`). The options mean
what sentence-transformers' `mine_hard_negatives` means by range_min/range_max, absolute_margin,
relative_margin, max_score and sampling_strategy. The corpus embeddings are cached next to the output (or taken from
`--corpus-embeddings`), so a rerun does not encode them again. They are reused only when their setup
(model fingerprint included), chunking and corpus fingerprint match.

A chunked corpus (`--chunk-tokens N`, or chunk vectors given with `--corpus-embeddings`) is searched by its
chunks, and ranked by document as `ullme search` ranks them: a candidate is a document, scored by its best
chunk, and the negative written into the row is that chunk's text (a passage the model can take whole).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ullme_cli.artifacts import (
    dequantize,
    embedding_files,
    load_chunked_embeddings,
    load_embeddings,
)
from ullme_cli.data import read_corpus, read_training_examples
from ullme_cli.encode_options import EncodeOptions
from ullme_cli.mine_options import MiningOptions  # noqa: F401 - also imported from here
from ullme_cli.encoding import encode_corpus
from ullme_cli.errors import UllmeError
from ullme_cli.fingerprints import corpus_fingerprint
from ullme_cli.io.agreement import LAYOUT_KEYS, SAME_VECTORS, disagreement, require_agreement
from ullme_cli.io.outputs import atomic_path, guard_output, output_lock
from ullme_cli.model_setup import SETUP_FILE, ModelSetup, Runtime, resolve_setup
from ullme_cli.progress import progress_bar
from ullme_cli.retrieval.search import HITS_AT_ONCE

log = logging.getLogger(__name__)

# What corpus embeddings must share with the model that mines: the vectors' space, the passage side, the corpus.
CORPUS_KEYS = (*SAME_VECTORS, "corpus_fingerprint")
# Scores of the negatives a row held: mining replaces (or extends) them, so these no longer describe the row.
STALE_FIELDS = ("neg_scores",)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def mine_negatives(
    training: str,
    corpus: str,
    output: str,
    setup: ModelSetup,
    runtime: Runtime = Runtime(),
    corpus_embeddings: str | None = None,
    options: MiningOptions = MiningOptions(),
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    options.validate()
    from ullme_cli.models.loading import model_inputs

    cache = Path(output).with_name(Path(output).name + ".cache")
    inputs = [training, corpus, *embedding_files(corpus_embeddings or "-"), *model_inputs(setup.model), *(model_inputs(options.teacher) if options.teacher else [])]
    guard_output([output], inputs, overwrite)
    guard_output([cache], inputs, folder=True, exists_ok=True, may_hold_inputs=True)  # files replaced one by one, never the folder
    with output_lock(output):
        return _mine_locked(training, corpus, output, setup, runtime, corpus_embeddings, options, show_progress)


def _corpus_vectors(corpus: str, records, output: str, embedder, corpus_embeddings: str | None, options: "MiningOptions",
                    show_progress: bool) -> tuple[np.ndarray, list[dict] | None]:  # fmt: skip
    """The corpus's passage vectors, and their chunk map for chunk vectors: given, cached beside the output, or
    encoded now (and cached)."""
    expected = {**embedder.vector_record("passage"), "corpus_fingerprint": corpus_fingerprint((r.id, r.text) for r in records)}
    encode_options = EncodeOptions(chunk_tokens=options.chunk_tokens, chunk_overlap=options.chunk_overlap)
    if corpus_embeddings is None:
        cache = Path(output).with_name(Path(output).name + ".cache") / "corpus.npy"
        reusable = False
        if cache.exists():
            try:
                _, _, meta = load_embeddings(str(cache))
                problem = disagreement(meta, {**expected, "chunking": encode_options.chunking()}, (*CORPUS_KEYS, *LAYOUT_KEYS))
            except UllmeError as e:
                problem = str(e)
            reusable = problem is None
            if reusable:
                log.info(f"reusing corpus embeddings from {cache}")
            else:
                log.warning(f"{cache}: stale ({problem}); encoding the corpus again")
        if not reusable:
            encode_corpus(corpus, str(cache), embedder.setup, options=encode_options, overwrite=True, show_progress=show_progress, embedder=embedder)
        corpus_embeddings = str(cache)
    elif options.chunk_tokens is not None:
        raise UllmeError("--chunk-tokens applies when mine encodes the corpus; --corpus-embeddings are used as they were made")
    matrix, ids, meta, chunk_map = load_chunked_embeddings(corpus_embeddings)
    require_agreement(meta, expected, corpus_embeddings, f"passages of {corpus} encoded by the model {embedder.setup.model}", CORPUS_KEYS)
    if (meta.get("chunking") or {}).get("pool") == "mean":
        raise UllmeError(f"{corpus_embeddings}: pooled chunk vectors (--chunk-pool mean) carry no passage to write as a negative; "
                         "encode with --chunk-pool none, or without chunking")  # fmt: skip
    made_from = [r.id for r in records]
    if (ids if chunk_map is None else list(dict.fromkeys(row["doc"] for row in chunk_map))) != made_from:
        raise UllmeError(f"{corpus_embeddings}: made from another corpus than {corpus} (ids or texts differ); pass the right --corpus-embeddings")
    return np.ascontiguousarray(dequantize(matrix, meta), dtype=np.float32), chunk_map


def searched_in_blocks(index, queries: np.ndarray, depth: int):
    """Each query's (positions, scores) of its top `depth` hits, searched a block of queries at a time so that
    at most HITS_AT_ONCE hits are held, however many rows and however deep (a chunked corpus goes deeper)."""
    block = max(1, HITS_AT_ONCE // depth)
    for start in range(0, len(queries), block):
        scores, found = index.search(queries[start : start + block], depth)
        yield from zip(found, scores)


def ranked_passages(scores: np.ndarray, found: np.ndarray, chunk_map: list[dict] | None, position_of: dict[str, int]):
    """One query's hits as (document position, score, character span or None), best first; over chunk vectors,
    one per document, at its best chunk."""
    seen: set[int] = set()
    for position, score in zip(found.tolist(), scores.tolist()):
        if position < 0:
            continue
        if chunk_map is None:
            yield position, score, None
            continue
        row = chunk_map[position]
        doc = position_of[row["doc"]]
        if doc not in seen:
            seen.add(doc)
            yield doc, score, (row["start"], row["end"])


def _mine_locked(training, corpus, output, setup, runtime, corpus_embeddings, options: MiningOptions, show_progress) -> dict:
    import faiss

    from ullme_cli.models.embedder import load_embedder

    examples, _ = read_training_examples(training)
    records = read_corpus(corpus)
    if options.teacher and not (Path(options.teacher) / "modules.json").is_file():
        from ullme_cli.models.loading import resolve_model_source

        resolve_model_source(options.teacher)  # a teacher that is not there is refused before mining, not after
    options.check_range(len(records), corpus)
    embedder = load_embedder(setup, runtime)
    vectors, chunk_map = _corpus_vectors(corpus, records, output, embedder, corpus_embeddings, options, show_progress)
    if vectors.shape[1] != embedder.dim:
        raise UllmeError(f"{corpus_embeddings}: vectors of dimension {vectors.shape[1]}, the model's are {embedder.dim} (truncated embeddings cannot be mined)")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    queries = query_vectors(lambda texts, kind, instruction: embedder.encode(texts, kind=kind, instruction=instruction), examples)
    # The weakest positive's score bounds what a negative may score (--margin, --relative-margin).
    positive_texts = sorted({p for ex in examples for p in ex.positives})
    bounded = options.margin is not None or options.relative_margin is not None
    positive_vectors = dict(zip(positive_texts, embedder.encode(positive_texts, kind="passage"))) if bounded else {}

    end = options.pool_end(len(records))
    depth = end
    if chunk_map is not None:  # the end-th document's best chunk ranks within (end - 1) × its most windows + 1
        windows = max(row["chunk"] for row in chunk_map) + 1
        depth = min(len(chunk_map), end * windows)
    texts = [r.text for r in records]
    position_of = {r.id: i for i, r in enumerate(records)}
    rng = np.random.default_rng(options.seed)
    short = 0
    stale = sum(any(k in ex.extra for k in STALE_FIELDS) for ex in examples)
    if stale and not options.teacher:
        log.warning(f"{training}: dropping {', '.join(STALE_FIELDS)} of {stale} rows: they scored the negatives that mining replaces")
    for row, (example, (ranked, ranked_scores)) in enumerate(zip(examples, searched_in_blocks(index, queries, depth))):
        blocked = {_normal(p) for p in example.positives} | {_normal(example.query)}
        kept = list(example.negatives) if options.keep_existing else []
        seen = {_normal(t) for t in kept}
        ceiling = options.max_score if options.max_score is not None else np.inf
        if bounded:
            weakest = min(float(queries[row] @ positive_vectors[p]) for p in example.positives)
            if options.margin is not None:
                ceiling = min(ceiling, weakest - options.margin)
            if options.relative_margin is not None:  # sentence-transformers' relative_margin
                ceiling = min(ceiling, weakest * (1 - options.relative_margin))
        candidates = []
        hits = list(ranked_passages(ranked_scores, ranked, chunk_map, position_of))[options.start : end]
        for position, score, span in hits:
            text = texts[position] if span is None else texts[position][span[0] : span[1]]
            if score > ceiling or _normal(text) in blocked or _normal(texts[position]) in blocked or _normal(text) in seen:
                continue
            seen.add(_normal(text))
            candidates.append(text)
        if options.sample and len(candidates) > options.negatives:
            picked = sorted(rng.choice(len(candidates), options.negatives, replace=False))
            candidates = [candidates[i] for i in picked]
        chosen = candidates[: options.negatives]
        short += len(chosen) < options.negatives
        example.negatives = kept + chosen
        example.extra = {k: v for k, v in example.extra.items() if k not in STALE_FIELDS}
    embedder.report_truncation("mine")
    if options.teacher:
        del embedder  # one model in memory at a time
        # mining scored these candidates with its own model; the teacher's scores are what distill reads
        score_with_teacher(examples, options.teacher, runtime, show_progress)
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(example.to_json()) + "\n" for example in examples)
    return {"examples": len(examples), "corpus": len(records), "short": short}


def teacher_encoder(name: str, runtime: Runtime):
    """`encode(texts, kind, instruction) -> unit vectors` of a teacher: an ullme folder or any model ullme
    loads, or a sentence-transformers folder (modules.json, no ullme.json), whose "query" and "document"
    prompts are used where it has them."""
    folder = Path(name)
    if (folder / "modules.json").is_file() and not (folder / SETUP_FILE).is_file():
        from sentence_transformers import SentenceTransformer

        device = None if runtime.device == "auto" else runtime.device
        try:
            model = SentenceTransformer(str(folder), device=device, trust_remote_code=runtime.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - sentence-transformers raises many kinds for a folder it cannot load
            raise UllmeError(f"{name}: sentence-transformers cannot load this teacher ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        prompts = getattr(model, "prompts", {}) or {}

        def encode_st(texts, kind, instruction=None):
            prompt = prompts.get("query" if kind == "query" else "document")
            return model.encode(list(texts), prompt=prompt, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

        return encode_st
    from ullme_cli.models.embedder import load_embedder

    teacher = load_embedder(resolve_setup(name), runtime)

    def encode_ullme(texts, kind, instruction=None):
        vectors = teacher.encode(list(texts), kind=kind, instruction=instruction)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    return encode_ullme


def score_with_teacher(examples, teacher: str, runtime: Runtime, show_progress: bool) -> None:
    """Each row's `pos_scores` and `neg_scores`: the teacher's cosine between the query (with the row's
    instruction) and each positive and negative, in their order, as FlagEmbedding and Tevatron lay them out."""
    encode = teacher_encoder(teacher, runtime)
    passages = sorted({t for ex in examples for t in (*ex.positives, *ex.negatives)})
    with progress_bar("teacher", total=len(passages) + len(examples), enabled=show_progress) as advance:
        vectors = dict(zip(passages, encode(passages, "passage")))
        advance(len(passages))
        queries = query_vectors(encode, examples)
        advance(len(examples))
    for example, query in zip(examples, queries):
        example.extra["pos_scores"] = [round(float(query @ vectors[t]), 6) for t in example.positives]
        example.extra["neg_scores"] = [round(float(query @ vectors[t]), 6) for t in example.negatives]


def query_vectors(encode, examples) -> np.ndarray:
    """Each training query encoded as a query, with its own instruction where the row has one:
    `encode(texts, kind, instruction)` runs once per distinct instruction."""
    by_instruction: dict[str | None, list[int]] = {}
    for n, example in enumerate(examples):
        by_instruction.setdefault(example.instruction, []).append(n)
    parts = {instruction: encode([examples[n].query for n in rows], "query", instruction) for instruction, rows in by_instruction.items()}
    queries = np.zeros((len(examples), next(iter(parts.values())).shape[1]), dtype=np.float32)
    for instruction, rows in by_instruction.items():
        queries[rows] = parts[instruction]
    return queries
