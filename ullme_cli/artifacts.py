"""Embedding files (docs/design.md §6) and atomic writes.

On disk: `emb.npy` + `emb.ids.jsonl` (one id per row, same order) + `emb.meta.json`.
Through a pipe (`-`): one `.npz` stream with arrays `embeddings`, `ids` and `meta` (JSON text), so that
`ullme encode ... -o - | ullme index - -o idx/` carries ids and provenance along. No pickle anywhere.

Chunk vectors (`encode --chunk-tokens N`, one vector per window of a long text) add a fourth file,
`emb.chunks.jsonl` (the npz stream: an array `chunks`): per row, its document, its place in it, its
character span in the text and its token count. The meta's `chunking` records the settings, and its
`chunk_map_checksum` that map.

The files are one unit: the meta records the count, the dimension and a checksum of the matrix
and ids, and every reader checks them, so a crash between two renames cannot pass old ids or meta off
as the new vectors' own. Writers go through the one output guard of `ullme_cli/io/outputs.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from ullme_cli.dtypes import OUT_DTYPES
from ullme_cli.errors import UllmeError, located
from ullme_cli.fingerprints import array_checksum
from ullme_cli.io.outputs import STDIO, atomic_path, atomic_write_text, require_output_path
from ullme_cli.io.rows import read_json_object

INT8_SCALE = 127.0  # unit vectors have |x_i| <= 1, so x * 127 never clips and shards share one scale


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def sidecars(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".npy" else p
    return stem.with_name(stem.name + ".ids.jsonl"), stem.with_name(stem.name + ".meta.json")


def chunk_sidecar(path: str | Path) -> Path:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".npy" else p
    return stem.with_name(stem.name + ".chunks.jsonl")


def embedding_files(path: str) -> list[Path]:
    """Every file that writing embeddings to `path` creates (none for stdout)."""
    return [] if path == STDIO else [Path(require_output_path(path)), *sidecars(path), chunk_sidecar(path)]


def chunk_map_text(chunk_map: list[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in chunk_map)


def chunk_map_checksum(chunk_map: list[dict]) -> str:
    return hashlib.sha256(chunk_map_text(chunk_map).encode()).hexdigest()


def parse_chunk_map(text: str, count: int, checksum: str, name: str, remedy: str) -> list[dict]:
    """A chunk map read back (from embeddings or an index), refused unless it is JSON lines of `count` rows
    whose checksum is the one recorded beside the vectors."""
    try:
        chunk_map = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise located(name, None, f"its chunk map is not JSON lines ({e.msg}); {remedy}") from None
    if len(chunk_map) != count or chunk_map_checksum(chunk_map) != checksum:
        raise located(name, None, f"the chunk map does not belong to these vectors (an interrupted or mixed write); {remedy}")
    return chunk_map


def quantize(matrix: np.ndarray, out_dtype: str) -> np.ndarray:
    if out_dtype == "float32":
        return matrix.astype(np.float32)
    if out_dtype == "float16":
        return matrix.astype(np.float16)
    if out_dtype == "int8":
        return np.clip(np.rint(matrix * INT8_SCALE), -127, 127).astype(np.int8)
    if out_dtype == "binary":
        return np.packbits(matrix > 0, axis=1)
    raise UllmeError(f"unknown output dtype '{out_dtype}' (choose from {', '.join(OUT_DTYPES)})")


def dequantize(matrix: np.ndarray, meta: dict) -> np.ndarray:
    """float32 vectors for float/int8 files; binary files stay packed bits (Hamming search)."""
    kind = meta.get("dtype", "float32")
    if kind == "int8":
        return matrix.astype(np.float32) / INT8_SCALE
    if kind == "binary":
        return matrix
    return matrix.astype(np.float32)


def truncate(matrix: np.ndarray, dim: int | None, normalized: bool) -> np.ndarray:
    """Matryoshka truncation: keep the first `dim` coordinates and renormalize."""
    if dim is None:
        return matrix
    if not 0 < dim <= matrix.shape[1]:
        raise UllmeError(f"--truncate-dim must be between 1 and {matrix.shape[1]}, got {dim}")
    matrix = matrix[:, :dim]
    if normalized:
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return matrix


def save_embeddings(path: str, matrix: np.ndarray, ids: list[str], meta: dict, chunk_map: list[dict] | None = None) -> dict:
    """Write the three files (four with a chunk map; or the npz stream) and return the meta written. The meta
    gains count, width and checksums, and is renamed into place last; readers check it against the others."""
    if len(ids) != len(matrix):
        raise UllmeError(f"internal: {len(matrix)} vectors but {len(ids)} ids")
    meta = {**meta, "count": len(ids), "width": int(matrix.shape[1]), "checksum": array_checksum(matrix, ids)}
    if chunk_map is not None:
        if len(chunk_map) != len(ids):
            raise UllmeError(f"internal: {len(ids)} vectors but {len(chunk_map)} chunk map rows")
        meta["chunk_map_checksum"] = chunk_map_checksum(chunk_map)
    if path == STDIO:
        buffer = io.BytesIO()
        arrays = {"chunks": np.array(chunk_map_text(chunk_map))} if chunk_map is not None else {}
        np.savez(buffer, embeddings=matrix, ids=np.array(ids, dtype=str), meta=np.array(json.dumps(meta)), **arrays)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
        return meta
    ids_path, meta_path = sidecars(path)
    save_npy(path, matrix)
    atomic_write_text(ids_path, "".join(json.dumps(i) + "\n" for i in ids))
    if chunk_map is not None:
        atomic_write_text(chunk_sidecar(path), chunk_map_text(chunk_map))
    elif chunk_sidecar(path).exists():  # a replaced chunked output's map would otherwise outlive it
        chunk_sidecar(path).unlink()
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")  # written last: it marks completion
    return meta


def check_unit(name: str, matrix: np.ndarray, ids: list[str], meta: dict) -> None:
    """The matrix, ids and meta of one output belong together: same count, width and checksum."""
    if matrix.ndim != 2:
        raise located(name, None, f"expected a 2-D matrix of embeddings, got {matrix.ndim}-D with shape {tuple(matrix.shape)}")
    if len(ids) != len(matrix):
        raise located(name, None, f"{len(ids)} ids for {len(matrix)} embeddings")
    if "checksum" not in meta:
        raise located(name, None, "its meta has no checksum (not written by this ullme); make it again")
    if meta.get("count") != len(matrix) or meta.get("width") != matrix.shape[1] or meta["checksum"] != array_checksum(matrix, ids):
        raise located(name, None, "the embeddings, ids and meta do not belong together (an interrupted or mixed write); make it again")


def _load_npz(source, name: str) -> tuple[np.ndarray, list[str], dict, str | None]:
    try:
        with np.load(source, allow_pickle=False) as data:
            chunks = str(data["chunks"]) if "chunks" in data.files else None
            return data["embeddings"], [str(i) for i in data["ids"]], json.loads(str(data["meta"])), chunks
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise located(name, None, f"not an ullme embeddings stream ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_id_lines(path: Path) -> list[str]:
    """One JSON value per line. Parsed in one call (fast for millions of ids); a bad line is then located."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise located(str(path), None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        return [str(i) for i in json.loads("[" + ",".join(line for line in lines if line.strip()) + "]")]
    except json.JSONDecodeError:
        for number, line in enumerate(lines, start=1):
            try:
                json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise located(str(path), number, f"malformed JSON ({e.msg})") from None
        raise


def load_embeddings(path: str) -> tuple[np.ndarray, list[str], dict]:
    """Read embeddings with their ids and meta from .npy + sidecars, a .npz, or `-` (npz on stdin)."""
    return load_chunked_embeddings(path)[:3]


def load_chunked_embeddings(path: str) -> tuple[np.ndarray, list[str], dict, list[dict] | None]:
    """`load_embeddings`, and the chunk map of chunk vectors (None for one vector per text), checked."""
    matrix, ids, meta, chunks_text = _read_unit(path)
    if not meta.get("chunk_map_checksum"):
        return matrix, ids, meta, None
    name = path if path != STDIO else "<stdin>"
    if chunks_text is None:
        where = chunk_sidecar(path) if path != STDIO and not path.endswith(".npz") else None
        if where is None or not where.exists():
            raise located(str(where or name), None, "missing: chunk vectors need their chunk map (.chunks.jsonl); make them again")
        chunks_text = where.read_text(encoding="utf-8")
    return matrix, ids, meta, parse_chunk_map(chunks_text, len(ids), meta["chunk_map_checksum"], name, "make them again")


def _read_unit(path: str) -> tuple[np.ndarray, list[str], dict, str | None]:
    if path == STDIO:
        data = sys.stdin.buffer.read()
        if not data:
            raise located("<stdin>", None, "no embeddings on standard input (empty input)")
        matrix, ids, meta, chunks = _load_npz(io.BytesIO(data), "<stdin>")
        check_unit("<stdin>", matrix, ids, meta)
        return matrix, ids, meta, chunks
    p = Path(path)
    if not p.exists():
        raise located(path, None, "file not found")
    if p.is_dir():
        raise located(path, None, "is a folder, expected an embeddings file")
    if p.suffix == ".npz":
        matrix, ids, meta, chunks = _load_npz(p, path)
        check_unit(path, matrix, ids, meta)
        return matrix, ids, meta, chunks
    try:
        matrix = np.load(p, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise located(path, None, f"not a readable .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    ids_path, meta_path = sidecars(p)
    for needed in (ids_path, meta_path):
        if not needed.exists():
            raise located(str(needed), None, "missing: every embeddings .npy needs its .ids.jsonl and .meta.json")
    ids = read_id_lines(ids_path)
    meta = read_json_object(meta_path)
    matrix = np.asarray(matrix)
    check_unit(path, matrix, ids, meta)
    return matrix, ids, meta, None
