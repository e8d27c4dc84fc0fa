"""`ullme mine`: fill training rows with hard negatives retrieved from a corpus (FlagEmbedding style).

For each training query, search the corpus exactly, skip the top `skip` ranks (likely unlabelled
positives) and the known positives, and keep the next `negatives` passages. The corpus embeddings are
cached next to the output (or taken from `--corpus-embeddings`), so a rerun does not encode them again.
They are reused only when their setup (model fingerprint included) and corpus fingerprint match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ullme_cli.artifacts import atomic_path, check_output, dequantize, load_embeddings, output_lock
from ullme_cli.data import read_corpus, read_training_examples
from ullme_cli.encoding import encode_corpus
from ullme_cli.errors import UllmeError
from ullme_cli.fingerprints import corpus_fingerprint
from ullme_cli.model_setup import VECTOR_FIELDS, ModelSetup, Runtime, require_same_setup, setup_mismatch
from ullme_cli.progress import stderr_console

# What corpus embeddings must share with the model that mines: the vectors' setup and the passage side.
CORPUS_KEYS = (*VECTOR_FIELDS, "passage_instruction")


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def mine_negatives(
    training: str,
    corpus: str,
    output: str,
    setup: ModelSetup,
    runtime: Runtime = Runtime(),
    corpus_embeddings: str | None = None,
    negatives: int = 7,
    skip: int = 10,
    keep_existing: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    if negatives < 1 or skip < 0:
        raise UllmeError("--negatives must be at least 1 and --skip at least 0")
    check_output([output], [training, corpus, *([corpus_embeddings] if corpus_embeddings else [])], overwrite)
    with output_lock(output):
        return _mine_locked(training, corpus, output, setup, runtime, corpus_embeddings, negatives, skip, keep_existing, show_progress)


def _corpus_vectors(corpus: str, records, output: str, embedder, corpus_embeddings: str | None, show_progress: bool) -> np.ndarray:
    """The corpus's passage vectors: given, cached beside the output, or encoded now (and cached)."""
    expected = {**embedder.setup.record(), "corpus_fingerprint": corpus_fingerprint((r.id, r.text) for r in records)}
    if corpus_embeddings is None:
        cache = Path(output).with_name(Path(output).name + ".cache") / "corpus.npy"
        reusable = False
        if cache.exists():
            try:
                _, _, meta = load_embeddings(str(cache))
                problem = setup_mismatch(meta, expected, (*CORPUS_KEYS, "corpus_fingerprint"))
            except UllmeError as e:
                problem = str(e)
            reusable = problem is None
            stderr_console.print(f"reusing corpus embeddings from {cache}" if reusable else f"{cache}: stale ({problem}); encoding the corpus again", soft_wrap=True)
        if not reusable:
            encode_corpus(corpus, str(cache), embedder.setup, overwrite=True, show_progress=show_progress, embedder=embedder)
        corpus_embeddings = str(cache)
    matrix, ids, meta = load_embeddings(corpus_embeddings)
    require_same_setup(meta, expected, corpus_embeddings, f"the model {embedder.setup.model}", keys=CORPUS_KEYS)
    if meta.get("corpus_fingerprint") != expected["corpus_fingerprint"] or ids != [r.id for r in records]:
        raise UllmeError(f"{corpus_embeddings}: made from another corpus than {corpus} (ids or texts differ); pass the right --corpus-embeddings")
    return np.ascontiguousarray(dequantize(matrix, meta), dtype=np.float32)


def _mine_locked(training, corpus, output, setup, runtime, corpus_embeddings, negatives, skip, keep_existing, show_progress) -> dict:
    import faiss

    from ullme_cli.models.embedder import load_embedder

    examples, _ = read_training_examples(training)
    records = read_corpus(corpus)
    embedder = load_embedder(setup, runtime)
    vectors = _corpus_vectors(corpus, records, output, embedder, corpus_embeddings, show_progress)
    if vectors.shape[1] != embedder.dim:
        raise UllmeError(f"{corpus_embeddings}: vectors of dimension {vectors.shape[1]}, the model's are {embedder.dim} (truncated embeddings cannot be mined)")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)

    by_instruction: dict[str | None, list[int]] = {}
    for n, example in enumerate(examples):
        by_instruction.setdefault(example.instruction, []).append(n)
    queries = np.zeros((len(examples), vectors.shape[1]), dtype=np.float32)
    for instruction, rows in by_instruction.items():
        queries[rows] = embedder.encode([examples[n].query for n in rows], kind="query", instruction=instruction)

    depth = min(len(records), skip + negatives + max(len(e.positives) for e in examples) + 1)
    _, found = index.search(queries, depth)
    texts = [r.text for r in records]
    short = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for example, ranked in zip(examples, found):
            blocked = {_normal(p) for p in example.positives} | {_normal(example.query)}
            chosen = list(example.negatives) if keep_existing else []
            seen = {_normal(t) for t in chosen}
            for position in ranked[skip:]:
                text = texts[position]
                if position < 0 or _normal(text) in blocked or _normal(text) in seen:
                    continue
                chosen.append(text)
                seen.add(_normal(text))
                if len(chosen) >= negatives + (len(example.negatives) if keep_existing else 0):
                    break
            short += len(chosen) < negatives
            example.negatives = chosen
            out.write(json.dumps(example.to_json()) + "\n")
    return {"examples": len(examples), "corpus": len(records), "short": short}
