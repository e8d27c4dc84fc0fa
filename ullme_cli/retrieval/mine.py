"""`ullme mine`: fill training rows with hard negatives retrieved from a corpus (FlagEmbedding style).

For each training query, search the corpus exactly, skip the top `skip` ranks (likely unlabelled
positives) and the known positives, and keep the next `negatives` passages. The corpus embeddings are
cached next to the output (or taken from `--corpus-embeddings`), so a rerun does not encode them again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ullme_cli.artifacts import atomic_path, dequantize, load_embeddings
from ullme_cli.data import read_corpus, read_training_examples
from ullme_cli.encoding import EncodeOptions, encode_corpus, load_embedder
from ullme_cli.errors import UllmeError
from ullme_cli.progress import stderr_console


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def mine_negatives(
    training: str,
    corpus: str,
    output: str,
    options: EncodeOptions,
    corpus_embeddings: str | None = None,
    negatives: int = 7,
    skip: int = 10,
    keep_existing: bool = False,
    show_progress: bool = True,
) -> dict:
    import faiss

    if negatives < 1 or skip < 0:
        raise UllmeError("--negatives must be at least 1 and --skip at least 0")
    examples, _ = read_training_examples(training)
    records = read_corpus(corpus, options.input_format)
    embedder = load_embedder(options)
    if corpus_embeddings is None:
        cache = Path(output).with_name(Path(output).name + ".cache") / "corpus.npy"
        corpus_embeddings = str(cache)
        if cache.exists():
            stderr_console.print(f"reusing corpus embeddings from {cache}", soft_wrap=True)
        else:
            encode_corpus(corpus, str(cache), EncodeOptions(**{**vars(options), "kind": "passage"}), show_progress=show_progress, embedder=embedder)
    matrix, ids, meta = load_embeddings(corpus_embeddings)
    if ids != [r.id for r in records]:
        raise UllmeError(f"{corpus_embeddings}: its ids do not match {corpus}; delete it or pass the right --corpus-embeddings")
    if meta.get("model") != embedder.config.model or meta.get("pooling") != embedder.config.pooling:
        raise UllmeError(f"{corpus_embeddings}: made with {meta.get('model')}/{meta.get('pooling')}, not {embedder.config.model}/{embedder.config.pooling}")
    vectors = np.ascontiguousarray(dequantize(matrix, meta), dtype=np.float32)
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
    return {"examples": len(examples), "corpus": len(records), "short": short, "cache": corpus_embeddings}
