"""The `ullme encode` job: shard, tokenize once (or cut into windows), batch by token budget, checkpoint, assemble.

Resume: finished parts (CHUNK_TEXTS rows of batches each) are saved atomically in `<output>.partial/`, keyed by a fingerprint of
the setup (model files included), the options and the corpus. A rerun after a crash or SIGKILL loads them
and encodes only what is missing. The final files appear only when everything is done (docs/design.md §6), and
the partial folder is removed. One writer at a time holds the output's lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ullme_cli.constants import __version__
from ullme_cli.artifacts import embedding_files, load_chunked_embeddings, quantize, save_embeddings, save_npy, truncate
from ullme_cli.data import read_corpus
from ullme_cli.errors import UllmeError
from ullme_cli.fingerprints import corpus_fingerprint
from ullme_cli.io.agreement import SAME_JOB, disagreement, require_agreement
from ullme_cli.io.outputs import STDIO, atomic_write_text, guard_output, output_lock
from ullme_cli.encode_options import EncodeOptions  # noqa: F401 - also imported from here
from ullme_cli.model_setup import ModelSetup, Runtime
from ullme_cli.encode_options import validate_chunking
from ullme_cli.models.chunking import chunk_id, chunk_map_rows, chunk_texts, pool_mean
from ullme_cli.progress import progress_bar

log = logging.getLogger(__name__)

CHUNK_TEXTS = 256  # texts per checkpointed chunk: small enough to lose little, large enough to be cheap


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


def _job_fingerprint(record: dict, options: EncodeOptions, shard, corpus: str) -> str:
    """What the chunks of `.partial/` depend on: the vectors' whole record (setup, weights fingerprint, kind,
    instruction, compute dtype, truncation), the options, the shard and the corpus. A rerun resumes only
    when all of them are the same."""
    # on_long changes no vector (it refuses or it does not), so a job resumes across it.
    payload = {"record": record, "options": {k: v for k, v in vars(options).items() if k != "on_long"}, "shard": shard, "corpus": corpus}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def encode_inputs(input_path: str, setup: ModelSetup) -> list[str]:
    """What an encode reads, for the output guard: the corpus (a file, a save_to_disk folder, a local
    `hf:` folder) and the model folder (with the base an adapter-only folder names), whose fingerprint an
    output inside it would change."""
    from ullme_cli.models.loading import model_inputs

    return [input_path, *model_inputs(setup.model)]


def encode_corpus(
    input_path: str,
    output: str,
    setup: ModelSetup,
    runtime: Runtime = Runtime(),
    options: EncodeOptions = EncodeOptions(),
    shard_spec: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    embedder=None,
) -> dict:
    """Encode a corpus file into embedding files; returns the written meta. Pass `embedder` to reuse one.

    Everything that can be checked is checked before the first batch: options, output paths, the corpus,
    the model, and the truncation against the model's dimension.
    """
    options.validate()
    shard = parse_shard(shard_spec)
    guard_output(embedding_files(output), encode_inputs(input_path, setup), overwrite)
    with output_lock(output):
        return _encode_locked(input_path, output, setup, runtime, options, shard, show_progress, embedder)


def _encode_locked(input_path, output, setup, runtime, options, shard, show_progress, embedder) -> dict:
    records = read_corpus(input_path, options.input_format)
    total = len(records)
    corpus = corpus_fingerprint((r.id, r.text) for r in records)
    if shard is not None:
        start, stop = shard_slice(total, *shard)
        records = records[start:stop]
        if not records:
            raise UllmeError(f"--shard {shard[0]}/{shard[1]}: the shard is empty ({total} texts for {shard[1]} shards)")

    from ullme_cli.models.embedder import load_embedder, padded_tokens, plan_batches

    embedder = embedder or load_embedder(setup, runtime)
    if options.truncate_dim is not None and options.truncate_dim > embedder.dim:
        raise UllmeError(f"--truncate-dim must be between 1 and {embedder.dim} (the model's dimension), got {options.truncate_dim}")
    untrained = embedder.untrained_size(options.truncate_dim)
    if untrained:
        log.warning(f"--truncate-dim {options.truncate_dim}: {untrained}")
    # Resolved here, so a resume on another device with another default never mixes two batchings.
    options = dataclasses.replace(options, token_budget=options.token_budget or embedder.default_token_budget)
    texts = [r.text for r in records]
    chunks = None
    if options.chunk_tokens is not None:  # windows of every text: nothing is cut, so --on-long has nothing to refuse
        validate_chunking(options.chunk_tokens, options.chunk_overlap, embedder.setup.max_length)
        chunks = chunk_texts(embedder, texts, options.kind, options.instruction, options.chunk_tokens, options.chunk_overlap, [r.id for r in records])
        tokenized = [c.tokens for c in chunks]
        log.info(f"encode: {len(records)} text(s) as {len(chunks)} window(s) of up to {options.chunk_tokens} tokens "
                 f"(overlap {options.chunk_overlap}; {sum(1 for c in chunks if c.number == 1)} text(s) longer than one window)")  # fmt: skip
    elif options.on_long == "error":  # tokenized once: with no text over max_length, these are `tokenize`'s tokens
        tokenized, over = embedder.tokenize_past_limit(texts, options.kind, options.instruction)
        if over:
            raise UllmeError(f"{input_path}: text '{records[over[0]].id}' is longer than max_length {embedder.setup.max_length} tokens "
                             f"({len(over)} text(s) over; --on-long error): raise --max-length, or drop --on-long to cut them")  # fmt: skip
    else:
        tokenized = embedder.tokenize(texts, options.kind, options.instruction)
    lengths = [len(t.ids) for t in tokenized]
    batches = plan_batches(lengths, options.token_budget)
    saved_parts: list[list[list[int]]] = [[]]  # checkpointed together, CHUNK_TEXTS rows at a time
    for batch in batches:
        if sum(len(b) for b in saved_parts[-1]) >= CHUNK_TEXTS:
            saved_parts.append([])
        saved_parts[-1].append(batch)

    record = embedder.vector_record(options.kind, options.instruction, options.truncate_dim)
    fingerprint = _job_fingerprint(record, options, shard, corpus)
    partial = None if output == STDIO else Path(output + ".partial")
    if partial is not None:
        state = partial / "state.json"
        if partial.exists():
            try:
                same_job = json.loads(state.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same_job = False
            if not same_job:
                log.warning(f"{partial}: left by a job with other inputs (model files, setup, options or corpus); starting over")
                shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state, json.dumps({"fingerprint": fingerprint, "chunks": len(saved_parts)}))

    matrix = np.zeros((len(tokenized), embedder.dim), dtype=np.float32)
    if partial is not None:
        done = sum((partial / f"chunk-{n:06d}.npy").exists() for n in range(len(saved_parts)))
        if done:
            log.info(f"resuming {output}: {done} of {len(saved_parts)} chunks already encoded")
    embedder.plan(padded_tokens((batch for number, part in enumerate(saved_parts) for batch in part
                                 if partial is None or not (partial / f"chunk-{number:06d}.npy").exists()), lengths))  # fmt: skip
    with progress_bar(f"encode ({embedder.backend})", total=len(tokenized), enabled=show_progress) as advance:
        for number, part in enumerate(saved_parts):
            rows = [i for batch in part for i in batch]
            saved = partial / f"chunk-{number:06d}.npy" if partial is not None else None
            if saved is not None and saved.exists():
                matrix[rows] = np.load(saved, allow_pickle=False)
                advance(len(rows))
                continue
            for batch in part:
                matrix[batch] = embedder.encode_batch([tokenized[i] for i in batch])
                advance(len(batch))
            if saved is not None:
                save_npy(saved, matrix[rows])

    meta = {**record, "dim": options.truncate_dim or embedder.dim, "dtype": options.out_dtype, "chunking": options.chunking(),
            "corpus_fingerprint": corpus, "ullme_version": __version__}  # fmt: skip
    meta["processes"] = 1
    if shard is not None:
        meta["shard"] = {"index": shard[0], "count": shard[1], "start": shard_slice(total, *shard)[0], "total": total}
    embedder.report_truncation("encode")
    ids, chunk_map = [r.id for r in records], None
    if chunks is not None and options.chunk_pool == "mean":  # one vector per text, pooled before any truncation
        matrix = pool_mean(matrix, chunks, len(records), embedder.setup.normalize)
    elif chunks is not None:
        ids, chunk_map = [chunk_id(records[c.doc].id, c.number) for c in chunks], chunk_map_rows(chunks, ids)
    final = quantize(truncate(matrix, options.truncate_dim, embedder.setup.normalize), options.out_dtype)
    meta = save_embeddings(output, final, ids, meta, chunk_map)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return meta


def join_shards(paths: list[str], output: str, overwrite: bool = False) -> dict:
    """Join the outputs of `--shard i/N` runs (any order) into one file, in corpus order."""
    if not paths:
        raise UllmeError("join: no shard files given")
    guard_output(embedding_files(output), [f for p in paths for f in embedding_files(p)], overwrite)
    with output_lock(output):
        return _join_locked(paths, output)


def _join_locked(paths: list[str], output: str) -> dict:
    parts, chunk_maps = [], {}
    for path in paths:
        matrix, ids, meta, chunk_map = load_chunked_embeddings(path)
        if "shard" not in meta:
            raise UllmeError(f"{path}: not a shard (its meta has no 'shard'; it was not made with --shard)")
        parts.append((path, matrix, ids, meta))
        chunk_maps[path] = chunk_map
    parts.sort(key=lambda p: p[3]["shard"]["index"])
    first = parts[0][3]
    count = first["shard"]["count"]
    for path, _, _, meta in parts:
        problem = disagreement(meta, first, SAME_JOB)
        if problem:
            what = "another corpus" if "other corpora" in problem else "another job"
            raise UllmeError(f"{path}: a shard of {what} than {parts[0][0]}: {problem}")
        require_agreement(meta, first, path, parts[0][0], SAME_JOB)
        if meta["shard"]["count"] != count or meta["shard"]["total"] != first["shard"]["total"]:
            raise UllmeError(f"{path}: belongs to a different sharding ({meta['shard']})")
    indices = [p[3]["shard"]["index"] for p in parts]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise UllmeError(f"join: expected shards 0..{count - 1} once each; missing {missing}, got {indices}")
    ids = [i for p in parts for i in p[2]]
    if len(set(ids)) != len(ids):
        raise UllmeError("join: the shards share ids; they do not come from one corpus")
    meta = {k: v for k, v in first.items() if k not in ("shard", "count", "width", "checksum", "chunk_map_checksum")}
    meta["processes"] = sum(p[3].get("processes", 1) for p in parts)
    chunk_map = [row for p in parts for row in chunk_maps[p[0]]] if chunk_maps[parts[0][0]] is not None else None
    return save_embeddings(output, np.concatenate([p[1] for p in parts]), ids, meta, chunk_map)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun or `accelerate launch` start (their environment variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Launch":
        get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        world = get("WORLD_SIZE", 1)
        return cls(get("RANK", 0), world, get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", world))


def encode_launched(
    input_path: str, output: str, setup: ModelSetup, runtime: Runtime, options: EncodeOptions, overwrite: bool = False, show_progress: bool = True
) -> dict | None:
    """`ullme encode` under torchrun or `accelerate launch` with N processes: rank r encodes shard r/N into
    `<output>.parts/` (each resumable on its own), then rank 0 joins the parts into the same three files a
    single process writes, with `"processes": N` in the meta (returned on rank 0, None elsewhere). Each rank
    gets its own GPU (cuda:LOCAL_RANK) where there are GPUs, and threads are split so that processes ×
    threads stays within the cores."""
    import torch
    import torch.distributed as dist

    launch = Launch.from_env()
    if output == STDIO:
        raise UllmeError("encode with several processes writes files: give -o a path, not -")
    guard_output(embedding_files(output), encode_inputs(input_path, setup), overwrite)  # every rank reaches the same answer
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world))
    if runtime.device == "auto" and torch.cuda.is_available():
        runtime = dataclasses.replace(runtime, device=f"cuda:{launch.local_rank}")
    dist.init_process_group("nccl" if runtime.device.startswith("cuda") else "gloo")
    try:
        parts = Path(output + ".parts")
        part = parts / f"part-{launch.rank:05d}-of-{launch.world:05d}.npy"
        shard = f"{launch.rank}/{launch.world}"
        if _finished_part(part, input_path, setup, runtime, options, shard):
            log.info(f"rank {launch.rank}: reusing {part}, finished by an earlier launch of this job")
        else:
            encode_corpus(input_path, str(part), setup, runtime, options, shard, overwrite=True, show_progress=show_progress and launch.rank == 0)
        dist.barrier()  # every part is written
        meta = None
        if launch.rank == 0:
            meta = join_shards([str(parts / f"part-{r:05d}-of-{launch.world:05d}.npy") for r in range(launch.world)], output, overwrite)
            shutil.rmtree(parts)
        dist.barrier()
        return meta
    finally:
        dist.destroy_process_group()


def _finished_part(part: Path, input_path: str, setup: ModelSetup, runtime: Runtime, options: EncodeOptions, shard: str) -> bool:
    """A part that an interrupted launch finished already, made from the same corpus, model files and job,
    in the same compute dtype."""
    if not all(p.exists() for p in embedding_files(str(part))[:3]):  # the chunk map is checked by the reader
        return False
    from ullme_cli.models.loading import model_fingerprint, resolve_device, resolve_dtype, resolve_model_source

    try:
        _, _, meta, _ = load_chunked_embeddings(str(part))
    except UllmeError:
        return False
    records = read_corpus(input_path, options.input_format)
    compute_dtype = str(resolve_dtype(runtime.dtype, resolve_device(runtime.device))).replace("torch.", "")
    made = setup.replace(fingerprint=model_fingerprint(resolve_model_source(setup.model)))
    expected = {**made.vector_record(options.kind, options.instruction, compute_dtype, options.truncate_dim),
                "dtype": options.out_dtype, "chunking": options.chunking(), "corpus_fingerprint": corpus_fingerprint((r.id, r.text) for r in records)}  # fmt: skip
    index, count = parse_shard(shard)
    same_shard = meta.get("shard", {}).get("index") == index and meta.get("shard", {}).get("count") == count
    return same_shard and disagreement(meta, expected, SAME_JOB) is None
