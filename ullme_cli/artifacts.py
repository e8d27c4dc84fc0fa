"""Embedding files (DESIGN.md §6) and atomic writes.

On disk: `emb.npy` + `emb.ids.jsonl` (one id per row, same order) + `emb.meta.json`.
Through a pipe (`-`): one `.npz` stream with arrays `embeddings`, `ids` and `meta` (JSON text), so that
`ullme encode ... -o - | ullme index - -o idx/` carries ids and provenance along. No pickle anywhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ullme_cli.constants import OUT_DTYPES
from ullme_cli.errors import UllmeError, located

STDIO = "-"
INT8_SCALE = 127.0  # unit vectors have |x_i| <= 1, so x * 127 never clips and shards share one scale


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; if the block succeeds it replaces `path` (two renames),
    otherwise it is removed. A crash leaves the old folder or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def sidecars(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".npy" else p
    return stem.with_name(stem.name + ".ids.jsonl"), stem.with_name(stem.name + ".meta.json")


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


def save_embeddings(path: str, matrix: np.ndarray, ids: list[str], meta: dict) -> None:
    if len(ids) != len(matrix):
        raise UllmeError(f"internal: {len(matrix)} vectors but {len(ids)} ids")
    if path == STDIO:
        buffer = io.BytesIO()
        np.savez(buffer, embeddings=matrix, ids=np.array(ids, dtype=str), meta=np.array(json.dumps(meta)))
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
        return
    ids_path, meta_path = sidecars(path)
    save_npy(path, matrix)
    atomic_write_text(ids_path, "".join(json.dumps(i) + "\n" for i in ids))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")  # written last: it marks completion


def _load_npz(source, name: str) -> tuple[np.ndarray, list[str], dict]:
    try:
        with np.load(source, allow_pickle=False) as data:
            return data["embeddings"], [str(i) for i in data["ids"]], json.loads(str(data["meta"]))
    except (ValueError, KeyError, OSError) as e:
        raise located(name, None, f"not an ullme embeddings stream ({e})") from None


def read_id_lines(path: Path) -> list[str]:
    """One JSON value per line. Parsed in one call (fast for millions of ids); a bad line is then located."""
    lines = path.read_text(encoding="utf-8").splitlines()
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
    if path == STDIO:
        data = sys.stdin.buffer.read()
        if not data:
            raise located("<stdin>", None, "no embeddings on standard input (empty input)")
        return _load_npz(io.BytesIO(data), "<stdin>")
    p = Path(path)
    if not p.exists():
        raise located(path, None, "file not found")
    if p.suffix == ".npz":
        return _load_npz(p, path)
    try:
        matrix = np.load(p, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise located(path, None, f"not a .npy file ({e})") from None
    ids_path, meta_path = sidecars(p)
    for needed in (ids_path, meta_path):
        if not needed.exists():
            raise located(str(needed), None, "missing: every embeddings .npy needs its .ids.jsonl and .meta.json")
    ids = read_id_lines(ids_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if len(ids) != len(matrix):
        raise located(str(ids_path), None, f"{len(ids)} ids for {len(matrix)} embeddings in {path}")
    return np.asarray(matrix), ids, meta
