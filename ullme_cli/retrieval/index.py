"""`ullme index`: a FAISS index folder (index.faiss, ids.jsonl, manifest.json) built from embedding files.

An index of chunk vectors (`encode --chunk-tokens N`) keeps their chunk map beside the ids (chunks.jsonl:
each vector's document, place and character span), so that `ullme search` ranks documents by their chunks.

The manifest records how the vectors were made (the setup record of model_setup.py, with the model's
fingerprint) and the fingerprints of the corpora in it, so that `ullme search` encodes queries the same
way with the same weights, and `--add` refuses vectors from another setup or a corpus already added.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ullme_cli.constants import __version__
from ullme_cli.artifacts import (
    chunk_map_checksum,
    chunk_map_text,
    dequantize,
    embedding_files,
    load_chunked_embeddings,
    parse_chunk_map,
    read_id_lines,
    save_npy,
)
from ullme_cli.errors import UllmeError, located
from ullme_cli.io.agreement import SAME_LAYOUT, SAME_SIDE, require_agreement
from ullme_cli.io.outputs import atomic_folder, guard_output, output_lock
from ullme_cli.io.rows import read_json_object
from ullme_cli.model_setup import SETUP_FIELDS
from ullme_cli.retrieval_options import IndexOptions

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.jsonl"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"  # exact copies kept beside lossy (PQ/SQ) indexes, for --rerank-exact
CHUNKS_FILE = "chunks.jsonl"  # the chunk map of chunk vectors, row for row with ids.jsonl
INDEX_FILES = (INDEX_FILE, IDS_FILE, MANIFEST_FILE, VECTORS_FILE, CHUNKS_FILE)
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


MANIFEST_KEYS = ("metric", "factory", "dim", "dtype", "count")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not Path(folder).is_dir():
        raise located(str(folder), None, "index folder not found")
    if not path.exists():
        raise located(str(folder), None, f"not an ullme index folder (no {MANIFEST_FILE})")
    manifest = read_json_object(path)
    missing = [k for k in (*MANIFEST_KEYS, *SETUP_FIELDS, *SAME_SIDE) if k not in manifest]
    if missing:
        raise located(str(path), None, f"field '{missing[0]}' is missing (an index from an older ullme, or edited); build it again")
    return manifest


def read_ids(folder: str | Path) -> list[str]:
    path = Path(folder) / IDS_FILE
    if not path.exists():
        raise located(str(path), None, "missing: an index folder holds index.faiss, ids.jsonl and manifest.json")
    return read_id_lines(path)


def read_chunk_map(folder: str | Path, manifest: dict) -> list[dict] | None:
    """The chunk map of an index of chunk vectors, checked against its manifest; None for one vector per text."""
    if not manifest.get("chunk_map_checksum"):
        return None
    path = Path(folder) / CHUNKS_FILE
    if not path.exists():
        raise located(str(path), None, "missing: an index of chunk vectors holds its chunk map; build it again")
    return parse_chunk_map(path.read_text(encoding="utf-8"), manifest["count"], manifest["chunk_map_checksum"], str(path), "build the index again")


def load_faiss_index(folder: str | Path, mmap: bool = False):
    """The FAISS index of a folder, checked against its manifest's count and dimension."""
    import faiss

    manifest = read_manifest(folder)
    path = Path(folder) / INDEX_FILE
    if not path.exists():
        raise located(str(path), None, "missing: an index folder holds index.faiss, ids.jsonl and manifest.json")
    try:
        if manifest["dtype"] == "binary":
            index = faiss.read_index_binary(str(path))
        else:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as e:
        raise located(str(path), None, f"not a readable FAISS index ({str(e).strip().splitlines()[-1][:200] if str(e).strip() else 'corrupt'})") from None
    if index.ntotal != manifest["count"]:
        raise located(str(path), None, f"holds {index.ntotal} vectors but the manifest says {manifest['count']}; build the index again")
    return index


def check_vectors(name: str, vectors: np.ndarray, ids: list[str]) -> None:
    """No NaN or infinite vector (FAISS would index it and search would drop it in silence), no repeated id."""
    if vectors.dtype.kind == "f":
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise located(name, None, f"vector {row} (id '{ids[row]}') has NaN or infinite values; {int(bad.sum())} such rows")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise located(name, None, f"id '{duplicate}' appears more than once")


def check_index_output(output: str, add: bool, overwrite: bool, inputs: list) -> None:
    """An index folder is written only where it is new, or with --add to it, or with --overwrite over one
    that holds nothing but what ullme wrote (the output guard, io/outputs.py)."""
    if add:
        read_manifest(output)
        guard_output([output], inputs, overwrite=True, folder=True)  # --add replaces the folder: only ullme's own
        return
    if Path(output).is_dir() and (Path(output) / MANIFEST_FILE).exists() and not overwrite:
        raise UllmeError(f"{output}: an index exists here already; pass --add to extend it or --overwrite to replace it")
    guard_output([output], inputs, overwrite, folder=True)


def _create(factory: str, dim: int, metric: str, binary: bool):
    import faiss

    try:
        if binary:
            return faiss.index_binary_factory(dim * 8, factory if factory.startswith("B") else "BFlat")
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise UllmeError(f"--factory '{factory}': FAISS cannot build it ({first})") from None


def build_index(embeddings: str, output: str, options: IndexOptions = IndexOptions(), overwrite: bool = False, seed: int = 0) -> tuple[dict, str]:
    """Build (or with `options.add`, extend) an index folder. Returns the manifest and a note on the choice.

    `options.trained_from`: start from that index folder's trained structure (IVF centroids, PQ codebooks), emptied.
    Shard indexes built from one trained index give, merged at search time, exactly the hits of one index
    over all their vectors with the same centroids: the multi-node layout of docs/guide.md.
    """
    o = options.validate()
    check_index_output(output, o.add, overwrite, [*embedding_files(embeddings), o.trained_from])
    with output_lock(output):
        return _build_locked(embeddings, output, o.factory, o.metric, o.add, o.keep_vectors, seed, o.trained_from)


def _build_locked(embeddings: str, output: str, factory: str, metric: str | None, add: bool, keep_vectors: bool, seed: int,
                  trained_from: str | None = None) -> tuple[dict, str]:  # fmt: skip
    import faiss

    matrix, ids, meta, chunk_map = load_chunked_embeddings(embeddings)
    if len(matrix) == 0:
        raise UllmeError(f"{embeddings}: no embeddings (empty input)")
    missing = [k for k in (*SETUP_FIELDS, *SAME_SIDE, "corpus_fingerprint") if k not in meta]
    if missing:
        raise UllmeError(f"{embeddings}: its meta has no '{missing[0]}' (made by an older ullme, or by hand); encode it again")
    if meta["kind"] == "query":
        raise UllmeError(f"{embeddings}: these are query embeddings; index passages (encode --kind passage)")
    check_vectors(embeddings, matrix, ids)
    binary = meta["dtype"] == "binary"
    vectors = np.ascontiguousarray(dequantize(matrix, meta))
    dim = vectors.shape[1]
    out = Path(output)
    note = ""
    old_ids: list[str] = []
    old_chunks: list[dict] = []
    if add:
        manifest = read_manifest(out)
        if manifest["dim"] != dim:
            raise UllmeError(f"{embeddings}: dimension {dim} does not match the index ({manifest['dim']}) in {output}")
        require_agreement(meta, manifest, embeddings, f"the index {output}", SAME_LAYOUT)
        if meta["corpus_fingerprint"] in manifest.get("corpora", []):
            raise UllmeError(f"{embeddings}: this corpus (the same ids and texts) is in the index {output} already")
        index = load_faiss_index(out)
        old_ids = read_ids(out)
        old_chunks = read_chunk_map(out, manifest) or []
        clash = set(old_ids) & set(ids)
        if clash:
            raise UllmeError(f"{embeddings}: id '{sorted(clash)[0]}' is already in the index {output}")
        factory, metric = manifest["factory"], manifest["metric"]
        manifest["corpora"] = [*manifest.get("corpora", []), meta["corpus_fingerprint"]]
    elif trained_from:
        template = read_manifest(trained_from)
        if template["dim"] != dim:
            raise UllmeError(f"{embeddings}: dimension {dim} does not match the index ({template['dim']}) in {trained_from}")
        require_agreement(meta, template, embeddings, f"the index {trained_from}", SAME_LAYOUT)
        index = load_faiss_index(trained_from)
        index.reset()  # keeps what training learned (centroids, codebooks), drops the vectors
        factory, metric, note = template["factory"], template["metric"], f"trained structure of {trained_from}, emptied"
        manifest = {**template, "corpora": [meta["corpus_fingerprint"]], "ullme_version": __version__}
    else:
        metric = metric or ("ip" if meta["normalize"] else "l2")
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
            **{k: meta[k] for k in (*SETUP_FIELDS, *SAME_SIDE)},
            "corpora": [meta["corpus_fingerprint"]], "metric": metric, "factory": factory, "dim": dim, "dtype": meta["dtype"],
            "nprobe": default_nprobe(factory), "ef_search": DEFAULT_EF_SEARCH if "HNSW" in factory else None,
            "chunking": meta.get("chunking"), "ullme_version": __version__,
        }  # fmt: skip
    index.add(vectors)
    manifest["count"] = index.ntotal
    chunk_map = old_chunks + chunk_map if chunk_map is not None else None
    manifest.pop("chunk_map_checksum", None)
    if chunk_map is not None:
        manifest["chunk_map_checksum"] = chunk_map_checksum(chunk_map)

    with atomic_folder(out) as staging:
        write = faiss.write_index_binary if binary else faiss.write_index
        write(index, str(staging / INDEX_FILE))
        (staging / IDS_FILE).write_text("".join(json.dumps(i) + "\n" for i in old_ids + ids), encoding="utf-8")
        if chunk_map is not None:
            (staging / CHUNKS_FILE).write_text(chunk_map_text(chunk_map), encoding="utf-8")
        if keep_vectors and is_lossy(factory) and not binary:
            kept = [np.load(out / VECTORS_FILE)] if add and (out / VECTORS_FILE).exists() else []
            save_npy(staging / VECTORS_FILE, np.concatenate(kept + [vectors.astype(np.float16)]))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, note
