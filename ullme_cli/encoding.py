"""The `ullme encode` job: shard, tokenize once, batch by token budget, checkpoint chunks, assemble.

Resume: finished chunks of batches are saved atomically in `<output>.partial/`, keyed by a fingerprint of
the inputs and options. A rerun after a crash or SIGKILL loads them and encodes only what is missing.
The final files appear only when everything is done (DESIGN.md §6), and the partial folder is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ullme_cli import __version__
from ullme_cli.artifacts import (
    OUT_DTYPES,
    STDIO,
    atomic_write_text,
    load_embeddings,
    quantize,
    save_embeddings,
    save_npy,
    truncate,
)
from ullme_cli.data import TextRecord, read_corpus
from ullme_cli.errors import UllmeError
from ullme_cli.progress import progress_bar, stderr_console

CHUNK_TEXTS = 256  # texts per checkpointed chunk: small enough to lose little, large enough to be cheap


@dataclass
class EncodeOptions:
    model: str
    kind: str = "passage"
    pooling: str | None = None
    attention: str | None = None
    instruction: str | None = None
    query_instruction: str | None = None  # recorded for `ullme search`, which encodes queries with it
    max_length: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    out_dtype: str = "float32"
    truncate_dim: int | None = None
    token_budget: int | None = None  # None: the embedder's default for its device
    trust_remote_code: bool = False
    input_format: str = "auto"


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UllmeError(f"--shard must look like i/N (e.g. 0/4), got '{spec}'") from None
    if count < 1 or not 0 <= index < count:
        raise UllmeError(f"--shard {spec} is out of range: need 0 <= i < N")
    return index, count


def shard_slice(total: int, index: int, count: int) -> tuple[int, int]:
    return index * total // count, (index + 1) * total // count


def _fingerprint(records: list[TextRecord], description: dict, options: EncodeOptions, shard) -> str:
    digest = hashlib.sha256()
    payload = {"description": description, "options": vars(options), "shard": shard}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    for r in records:
        digest.update(r.id.encode() + b"\0" + r.text.encode() + b"\0")
    return digest.hexdigest()


def load_embedder(options: EncodeOptions):
    from ullme_cli.models.embedder import Embedder  # heavy: imported only when a model is needed

    return Embedder.load(
        options.model, dtype=options.dtype, device=options.device, trust_remote_code=options.trust_remote_code,
        pooling=options.pooling, attention=options.attention, max_length=options.max_length,
        query_instruction=options.query_instruction,
    )  # fmt: skip


def encode_corpus(
    input_path: str, output: str, options: EncodeOptions, shard_spec: str | None = None, show_progress: bool = True, embedder=None
) -> dict:
    """Encode a corpus file into embedding files; returns the written meta. Pass `embedder` to reuse one."""
    if options.out_dtype not in OUT_DTYPES:
        raise UllmeError(f"unknown --out-dtype '{options.out_dtype}' (choose from {', '.join(OUT_DTYPES)})")
    shard = parse_shard(shard_spec)
    records = read_corpus(input_path, options.input_format)
    total = len(records)
    if shard is not None:
        start, stop = shard_slice(total, *shard)
        records = records[start:stop]
        if not records:
            raise UllmeError(f"--shard {shard_spec}: the shard is empty ({total} texts for {shard[1]} shards)")

    from ullme_cli.models.embedder import plan_batches

    embedder = embedder or load_embedder(options)
    # Resolved here, so a resume on another device with another default never mixes two batchings.
    options = dataclasses.replace(options, token_budget=options.token_budget or embedder.default_token_budget)
    description = embedder.describe()
    tokenized = embedder.tokenize([r.text for r in records], options.kind, options.instruction)
    batches = plan_batches([len(t.ids) for t in tokenized], options.token_budget)
    chunks: list[list[list[int]]] = [[]]
    for batch in batches:
        if sum(len(b) for b in chunks[-1]) >= CHUNK_TEXTS:
            chunks.append([])
        chunks[-1].append(batch)

    fingerprint = _fingerprint(records, description, options, shard)
    partial = None if output == STDIO else Path(output + ".partial")
    if partial is not None:
        state = partial / "state.json"
        if partial.exists() and (not state.exists() or json.loads(state.read_text()).get("fingerprint") != fingerprint):
            shutil.rmtree(partial)  # left by a different job: its chunks do not apply
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state, json.dumps({"fingerprint": fingerprint, "chunks": len(chunks)}))

    matrix = np.zeros((len(records), embedder.dim), dtype=np.float32)
    if partial is not None:
        done = sum((partial / f"chunk-{n:06d}.npy").exists() for n in range(len(chunks)))
        if done:
            stderr_console.print(f"resuming {output}: {done} of {len(chunks)} chunks already encoded", soft_wrap=True)
    with progress_bar("encode", total=len(records), enabled=show_progress) as advance:
        for number, chunk in enumerate(chunks):
            rows = [i for batch in chunk for i in batch]
            saved = partial / f"chunk-{number:06d}.npy" if partial is not None else None
            if saved is not None and saved.exists():
                matrix[rows] = np.load(saved, allow_pickle=False)
                advance(len(rows))
                continue
            for batch in chunk:
                matrix[batch] = embedder.encode_batch([tokenized[i] for i in batch])
                advance(len(batch))
            if saved is not None:
                save_npy(saved, matrix[rows])

    instruction = embedder.instruction_prefix(options.kind, options.instruction)
    meta = {
        **description,
        "kind": options.kind,
        "instruction": instruction,
        "normalized": embedder.config.normalize,
        "dim": options.truncate_dim or embedder.dim,
        "dtype": options.out_dtype,
        "compute_dtype": str(next(embedder.model.parameters()).dtype).replace("torch.", ""),
        "count": len(records),
        "truncate_dim": options.truncate_dim,
        "ullme_version": __version__,
    }
    if shard is not None:
        meta["shard"] = {"index": shard[0], "count": shard[1], "start": shard_slice(total, *shard)[0], "total": total}
    final = quantize(truncate(matrix, options.truncate_dim, embedder.config.normalize), options.out_dtype)
    save_embeddings(output, final, [r.id for r in records], meta)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return meta


# Keys that must agree between shards of one corpus.
_SHARD_INVARIANTS = ("model", "pooling", "attention", "max_length", "instruction", "kind", "dim", "dtype", "truncate_dim")


def join_shards(paths: list[str], output: str) -> dict:
    """Join the outputs of `--shard i/N` runs (any order) into one file, in corpus order."""
    if not paths:
        raise UllmeError("join: no shard files given")
    parts = []
    for path in paths:
        matrix, ids, meta = load_embeddings(path)
        if "shard" not in meta:
            raise UllmeError(f"{path}: not a shard (its meta has no 'shard'; it was not made with --shard)")
        parts.append((path, matrix, ids, meta))
    parts.sort(key=lambda p: p[3]["shard"]["index"])
    first = parts[0][3]
    count = first["shard"]["count"]
    for path, _, _, meta in parts:
        for key in _SHARD_INVARIANTS:
            if meta.get(key) != first.get(key):
                raise UllmeError(f"{path}: '{key}' is {meta.get(key)!r}, but {parts[0][0]} has {first.get(key)!r}")
        if meta["shard"]["count"] != count or meta["shard"]["total"] != first["shard"]["total"]:
            raise UllmeError(f"{path}: belongs to a different sharding ({meta['shard']})")
    indices = [p[3]["shard"]["index"] for p in parts]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise UllmeError(f"join: expected shards 0..{count - 1} once each; missing {missing}, got {indices}")
    ids = [i for p in parts for i in p[2]]
    if len(set(ids)) != len(ids):
        raise UllmeError("join: the shards share ids; they do not come from one corpus")
    meta = {k: v for k, v in first.items() if k != "shard"}
    meta["count"] = len(ids)
    save_embeddings(output, np.concatenate([p[1] for p in parts]), ids, meta)
    return meta
