"""Content fingerprints: reuse is decided by what was read, never by a path or a name.

- `folder_fingerprint`: a model folder's files (weights, adapter, tokenizer, config). Hashing is the
  cost (about 1.5 GB/s of SHA-256 per core), so digests are cached per file, keyed by the file's device,
  inode, size, modification and change times. The change time (ctime) is set by the kernel on every
  write and cannot be set back by a user, so a same-size replacement at the same path is hashed again.
- `corpus_fingerprint`: the ids and texts of a corpus, in order.
- `array_checksum`: an embeddings matrix with its ids, so that the three files of one output are
  checked to belong together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ullme_cli.constants import cache_root
from ullme_cli.io.outputs import atomic_write_text

# Files in an Embedder folder that do not change any vector: the setup (compared field by field) and
# the model card.
NOT_FINGERPRINTED = {"ullme.json", "README.md", "training.json"}  # descriptions, not weights
HASH_BLOCK = 1 << 24


def _cache_file() -> Path:
    return cache_root() / "fingerprints.json"


def _load_cache() -> dict:
    try:
        cache = json.loads(_cache_file().read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    try:
        atomic_write_text(_cache_file(), json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs speed


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the relative path and content digest of every file below `folder` (model card and
    setup file excepted). A file that cannot be read is an OSError for the caller to report."""
    root = Path(folder)
    if not root.is_dir():  # else a missing folder would fingerprint as an empty one, the same for every name
        raise FileNotFoundError(2, "no such folder", str(folder))
    cache = _load_cache()
    changed = False
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(root).as_posix()
        if relative in NOT_FINGERPRINTED:
            continue
        stat = path.stat()
        key = str(path.resolve())
        signature = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("stat") == signature):
            entry = {"stat": signature, "sha256": file_digest(path)}
            cache[key] = entry
            changed = True
        total.update(f"{relative}\0{entry['sha256']}\n".encode())
    if changed:  # entries of files that are gone are dropped, so the cache does not grow without end
        _save_cache({k: v for k, v in cache.items() if Path(k).exists()})
    return total.hexdigest()


def corpus_fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over (id, text) pairs in order."""
    digest = hashlib.sha256()
    for rid, text in pairs:
        digest.update(rid.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


class JsonDigest:
    """SHA-256 over JSON values fed one at a time (sorted keys): `json_fingerprint` for a stream of rows."""

    def __init__(self):
        self._digest = hashlib.sha256()

    def update(self, value) -> None:
        self._digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode() + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def json_fingerprint(values: Iterable) -> str:
    """SHA-256 over JSON values in order (sorted keys): the fingerprint of parsed rows, whatever file format
    or dataset they were read from."""
    digest = JsonDigest()
    for value in values:
        digest.update(value)
    return digest.hexdigest()


def array_checksum(matrix: np.ndarray, ids: list[str]) -> str:
    """SHA-256 over the matrix's dtype, shape and bytes, and the ids."""
    digest = hashlib.sha256()
    digest.update(f"{matrix.dtype.str}{matrix.shape}".encode())
    digest.update(np.ascontiguousarray(matrix).reshape(-1).view(np.uint8))
    digest.update("\0".join(ids).encode())
    return digest.hexdigest()


def tensors_fingerprint(named_tensors: Iterable[tuple[str, "object"]], salt: str = "") -> str:
    """SHA-256 over named tensors' bytes: the fingerprint of weights that exist only in memory (training).
    `salt` names what they sit on (the base model's fingerprint, under trained adapters)."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in named_tensors:
        data = tensor.detach().float().contiguous().cpu().numpy()
        digest.update(name.encode() + b"\0")
        digest.update(data.reshape(-1).view(np.uint8))
    return digest.hexdigest()

