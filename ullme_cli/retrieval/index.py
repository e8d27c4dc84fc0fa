"""`ullme index`: a FAISS index folder (index.faiss, ids.jsonl, manifest.json) built from embedding files.

The manifest records how the vectors were made (model, pooling, attention, query instruction), so that
`ullme search` encodes queries the same way, and `--add` refuses vectors from another model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ullme_cli import __version__
from ullme_cli.artifacts import atomic_folder, dequantize, load_embeddings, read_id_lines, save_npy
from ullme_cli.errors import UllmeError

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"  # exact copies kept beside lossy (PQ/SQ) indexes, for --rerank-exact
METRICS = ("ip", "l2")
# What must agree between an index and the vectors added to it or searched against it.
PROVENANCE = ("model", "pooling", "attention", "max_length", "query_instruction", "instruction_template", "truncate_dim")
# Measured on 20k clustered 64-d unit vectors (tests/test_retrieval.py): FAISS' defaults (40/16) give
# recall@10 0.39; 200/256 give 0.996 against Flat.
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 256
TRAIN_SAMPLE_PER_LIST = 256


def auto_factory(count: int, dim: int) -> tuple[str, str]:
    """Pick an index type by corpus size; return it with the reason."""
    if count < 50_000:
        return "Flat", f"{count} vectors: exact search is fast enough below 50k"
    if count < 2_000_000:
        nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
        return f"IVF{nlist},Flat", f"{count} vectors: IVF with ~4·sqrt(n) = {nlist} lists keeps exact codes"
    nlist = 2 ** round(math.log2(16 * math.sqrt(count)))
    m = next(m for m in (64, 48, 32, 16, 8) if dim % m == 0) if dim % 8 == 0 else 8
    return f"OPQ{m},IVF{nlist},PQ{m}", f"{count} vectors: OPQ+IVF+PQ{m} compresses to {m} bytes per vector"


def default_nprobe(factory: str) -> int | None:
    nlist = _nlist(factory)
    return None if nlist is None else max(8, nlist // 8)


def _nlist(factory: str) -> int | None:
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else None
    return None


def is_lossy(factory: str) -> bool:
    return any(tag in factory for tag in ("PQ", "SQ", "LSH", "RQ"))


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise UllmeError(f"{folder}: not an ullme index folder (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def read_ids(folder: str | Path) -> list[str]:
    return read_id_lines(Path(folder) / IDS_FILE)


def load_faiss_index(folder: str | Path, mmap: bool = False):
    import faiss

    path = str(Path(folder) / INDEX_FILE)
    binary = read_manifest(folder)["dtype"] == "binary"
    if binary:
        return faiss.read_index_binary(path)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(path, flags)


def _create(factory: str, dim: int, metric: str, binary: bool):
    import faiss

    try:
        if binary:
            return faiss.index_binary_factory(dim * 8, factory if factory.startswith("B") else "BFlat")
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise UllmeError(f"--factory '{factory}': FAISS cannot build it ({first})") from None


def _check_provenance(meta: dict, reference: dict, what: str, source: str) -> None:
    for key in PROVENANCE:
        if key in reference and meta.get(key) != reference.get(key):
            raise UllmeError(
                f"{source}: embeddings from another model setup: '{key}' is {meta.get(key)!r} but the {what} has {reference.get(key)!r}"
            )


def build_index(
    embeddings: str,
    output: str,
    factory: str = "auto",
    metric: str | None = None,
    add: bool = False,
    keep_vectors: bool = True,
    seed: int = 0,
) -> tuple[dict, str]:
    """Build (or with `add`, extend) an index folder. Returns the manifest and a note on the choice."""
    import faiss

    matrix, ids, meta = load_embeddings(embeddings)
    if len(matrix) == 0:
        raise UllmeError(f"{embeddings}: no embeddings (empty input)")
    if meta.get("kind") == "query":
        raise UllmeError(f"{embeddings}: these are query embeddings; index passages (encode --kind passage)")
    binary = meta.get("dtype") == "binary"
    vectors = np.ascontiguousarray(dequantize(matrix, meta))
    dim = vectors.shape[1]
    out = Path(output)
    note = ""
    old_ids: list[str] = []
    if add:
        manifest = read_manifest(out)
        if manifest["dim"] != dim:
            raise UllmeError(f"{embeddings}: dimension {dim} does not match the index ({manifest['dim']}) in {output}")
        _check_provenance(meta, manifest, "index", embeddings)
        index = load_faiss_index(out)
        old_ids = read_ids(out)
        clash = set(old_ids) & set(ids)
        if clash:
            raise UllmeError(f"{embeddings}: id '{sorted(clash)[0]}' is already in the index {output}")
        factory, metric = manifest["factory"], manifest["metric"]
    else:
        if out.exists() and any(out.iterdir()):
            if not (out / MANIFEST_FILE).exists():
                raise UllmeError(f"{output}: folder exists and is not an ullme index; choose another -o")
        metric = metric or ("ip" if meta.get("normalized", True) else "l2")
        if metric not in METRICS:
            raise UllmeError(f"unknown --metric '{metric}' (choose from ip, l2)")
        if factory == "auto":
            factory, note = ("BFlat", "binary codes: exact Hamming search") if binary else auto_factory(len(vectors), dim)
        index = _create(factory, dim, metric, binary)
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None) if not binary else None
        if hnsw is not None:
            hnsw.efConstruction = DEFAULT_EF_CONSTRUCTION
        if not index.is_trained:
            nlist = _nlist(factory) or 256
            sample_size = min(len(vectors), max(TRAIN_SAMPLE_PER_LIST * nlist, 10_000))
            if len(vectors) < nlist:
                raise UllmeError(f"--factory {factory}: {len(vectors)} vectors cannot train {nlist} lists; use fewer lists or Flat")
            sample = vectors[np.random.default_rng(seed).choice(len(vectors), sample_size, replace=False)]
            index.train(sample)
        manifest = {
            **{k: meta.get(k) for k in PROVENANCE},
            "metric": metric, "factory": factory, "dim": dim, "dtype": meta.get("dtype", "float32"),
            "normalized": meta.get("normalized", True), "nprobe": default_nprobe(factory),
            "ef_search": DEFAULT_EF_SEARCH if "HNSW" in factory else None, "ullme_version": __version__,
        }  # fmt: skip
    index.add(vectors)
    manifest["count"] = index.ntotal

    with atomic_folder(out) as staging:
        write = faiss.write_index_binary if binary else faiss.write_index
        write(index, str(staging / INDEX_FILE))
        (staging / IDS_FILE).write_text("".join(json.dumps(i) + "\n" for i in old_ids + ids), encoding="utf-8")
        if keep_vectors and is_lossy(factory) and not binary:
            kept = [np.load(out / VECTORS_FILE)] if add and (out / VECTORS_FILE).exists() else []
            save_npy(staging / VECTORS_FILE, np.concatenate(kept + [vectors.astype(np.float16)]))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, note
