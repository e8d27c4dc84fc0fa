"""Search speed and recall: `ullme search` (Python path) against raw FAISS on the same index and queries.

Corpus: synthetic clustered unit vectors (real encodes of 200k passages take hours on 2 CPU cores); the
vectors are built the same way as in tests/test_retrieval.py. Prints, per index type: build seconds,
seconds to open the index folder (index + ids, once per `ullme search` run), QPS of raw `index.search`,
QPS of ullme's per-query path `search_opened()` (parameters, merging, id mapping, scores included), the
overhead ratio, and recall@10 against Flat.

Usage: python benchmarks/search.py [--n 200000] [--dim 256] [--queries 2000]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_retrieval import clustered_vectors, write_vectors  # noqa: E402

from ullme_cli.retrieval.index import build_index  # noqa: E402
from ullme_cli.retrieval_options import IndexOptions  # noqa: E402
from ullme_cli.retrieval.search import open_indexes, search_opened, set_search_parameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    import faiss

    work = Path(tempfile.mkdtemp(prefix="ullme-bench-"))
    corpus = clustered_vectors(args.n, args.dim, clusters=max(200, args.n // 500))
    queries = clustered_vectors(args.queries, args.dim, clusters=max(200, args.n // 500), seed=1)
    write_vectors(work / "c.npy", corpus)
    write_vectors(work / "q.npy", queries, prefix="q", kind="query")
    nlist = 2 ** round(np.log2(4 * np.sqrt(args.n)))
    print(f"corpus {args.n} x {args.dim}, {args.queries} queries, k={args.k}, faiss threads {faiss.omp_get_max_threads()}")
    print(f"{'index':<18}{'build s':>9}{'open s':>8}{'raw QPS':>10}{'ullme QPS':>11}{'overhead':>10}{'recall@10':>11}")
    exact = None
    for factory in ("Flat", f"IVF{nlist},Flat", "HNSW32"):
        folder = work / factory.replace(",", "_")
        start = time.perf_counter()
        build_index(str(work / "c.npy"), str(folder), IndexOptions(factory))
        build = time.perf_counter() - start
        start = time.perf_counter()
        opened = open_indexes([str(folder)])[0]
        open_seconds = time.perf_counter() - start
        set_search_parameters(opened.index, opened.manifest.get("nprobe"), opened.manifest.get("ef_search"))
        start = time.perf_counter()
        _, raw_positions = opened.index.search(queries, args.k)
        raw = time.perf_counter() - start
        start = time.perf_counter()
        qids = [f"q{i}" for i in range(len(queries))]
        hits = list(search_opened([opened], qids, queries, k=args.k))
        ours = time.perf_counter() - start
        found = [[d for d, _ in h] for _, h in hits]
        if exact is None:
            exact = found
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact)])
        print(f"{factory:<18}{build:>9.1f}{open_seconds:>8.2f}{args.queries / raw:>10.0f}{args.queries / ours:>11.0f}{ours / raw:>9.2f}x{recall:>11.3f}")


if __name__ == "__main__":
    main()
