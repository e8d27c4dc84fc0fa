"""What one `ullme index` and one `ullme search` do (retrieval/index.py and retrieval/search.py run them). Each
option is declared once, here, and the commands' flags are derived from the fields (cli.py). Light on purpose:
`ullme --help` imports it."""

from __future__ import annotations

from dataclasses import dataclass

from ullme_cli.errors import UllmeError
from ullme_cli.options import UNKNOWN, check_choices, option

METRICS = ("ip", "l2")
RESULT_FORMATS = ("jsonl", "trec")  # what `search --format` writes
AGGREGATES = ("max", "sum")
CHUNK_DEPTH = 100  # chunk hits per query that a document ranking starts from (retrieval/search.py's docstring)


@dataclass(frozen=True)
class IndexOptions:
    factory: str = option("auto", "FAISS index_factory string (Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64, OPQ64,IVF4096,PQ64) or auto.")
    metric: str | None = option(None, "Distance (default: ip for normalized vectors, else l2)", METRICS, refusal=UNKNOWN)
    add: bool = option(False, "Append to the existing index in --output.")
    keep_vectors: bool = option(True, "Keep float16 copies beside lossy indexes for --rerank-exact.", flag="--keep-vectors/--no-keep-vectors")
    trained_from: str | None = option(None, "Start from this index folder's trained centroids/codebooks (shard indexes that merge exactly).")

    def validate(self) -> "IndexOptions":
        if self.add and self.trained_from:
            raise UllmeError("--add and --trained-from do not mix: --add keeps the index's own training")
        for name in ("factory", "metric"):  # with --add or --trained-from the index's own are used: a value given would be ignored
            if getattr(self, name) != getattr(IndexOptions, name) and (self.add or self.trained_from):
                raise UllmeError(f"--{name} does not apply with {'--add' if self.add else '--trained-from'}: the index's own {name} is used")
        check_choices(self)
        return self


@dataclass(frozen=True)
class SearchOptions:
    k: int = option(10, "Hits per query.", flag="--top-k")
    nprobe: int | None = option(None, "IVF lists to visit (default: the manifest's).")
    ef_search: int | None = option(None, "HNSW search breadth (default: the manifest's).")
    instruction: str | None = option(None, "Query instruction (default: the manifest's).")
    rerank_exact: bool = option(False, "Rescore candidates with exact vectors (PQ/SQ indexes).")
    mmap: bool = option(False, "Memory-map the index from disk instead of reading it into RAM.")
    # None: return the chunks themselves (the CLI's --chunks)
    aggregate: str | None = option("max", "Over chunk vectors: a document scores as its best chunk (max) or the sum of its chunks among the top hits (sum)",
                                   AGGREGATES)  # fmt: skip
    chunk_depth: int = option(CHUNK_DEPTH, "Over chunk vectors: chunk hits per query that documents are ranked from (doubled until -k documents).")
    format: str = option("jsonl", "Output format", RESULT_FORMATS, refusal=UNKNOWN)

    def validate(self) -> "SearchOptions":
        check_choices(self)
        if self.k < 1:
            raise UllmeError(f"-k must be at least 1, got {self.k}")
        if self.chunk_depth < 1:
            raise UllmeError(f"--chunk-depth must be at least 1, got {self.chunk_depth}")
        for name in ("nprobe", "ef_search"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UllmeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        return self
