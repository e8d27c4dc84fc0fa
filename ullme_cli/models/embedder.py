"""Embedder: a causal LM, an attention mode, a pooling head and instructions, as one saveable unit.

An Embedder folder holds `ullme.json` (its ModelSetup, see model_setup.py), the model in safetensors,
the tokenizer, the latent-attention head when used, and `adapter/` when a LoRA adapter is kept unmerged.
`load_embedder(setup, runtime)` is the one way in; `Embedder.load(name, **overrides)` is its shorthand.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ullme_cli.constants import DEFAULT_MODEL, KINDS
from ullme_cli.errors import UllmeError
from ullme_cli.io.agreement import require_agreement
from ullme_cli.io.outputs import atomic_folder, guarded, real_path
from ullme_cli.model_setup import SETUP_FILE, ModelSetup, Runtime, resolve_setup
from ullme_cli.models.bidirectional import (
    decoder_of,
    hidden_states,
    packed_hidden_states,
    sliding_window,
    verify_bidirectional,
)
from ullme_cli.models.compile_policy import auto_policy, compile_encoding
from ullme_cli.models.folder import has_setup_file, matryoshka_dims, write_folder
from ullme_cli.models.loading import (
    adapter_base,
    adapter_files,
    adapter_record,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    model_inputs,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from ullme_cli.models.onnx_graph import OnnxGraph, is_onnx_folder, open_graph
from ullme_cli.models.pooling import LATENT_WEIGHTS, LatentAttentionPooling, Pooler
from ullme_cli.progress import progress_bar

log = logging.getLogger(__name__)

# Padded tokens per encode batch. On a 2-core CPU, 1536 encoded the demo corpus about 1.4x faster than
# 8192 and 5% faster than 2048, and was as fast as any on 180-token texts (docs/benchmarks.md). GPUs want
# big batches; 16384 is a guess that no GPU has checked yet.
# The fewest tokens an instruction must leave for the text within max_length: a query instruction that
# fills max_length would cut every text away and give every query the same vector.
MIN_TEXT_TOKENS = 8
CPU_TOKEN_BUDGET = 1536
GPU_TOKEN_BUDGET = 16384


@contextmanager
def peft_deprecations_silenced():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    on every LoRA load: noise for our users, and nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def enable_activation_checkpointing(model) -> None:
    """transformers' own per-layer checkpointing, non-reentrant, on a model or on the model under a peft
    wrapper: what the trainer and the dry run's memory trace both enable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Tokenized:
    ids: list[int]
    instruction_tokens: int  # leading tokens that belong to the instruction (and special tokens before it)


@dataclass
class Packing:
    """A batch's texts laid end to end in rows (a padding-free batch): positions restart at 0 for each text
    and `segments` (0: padding, k > 0: the row's k-th text) keeps each text's attention to itself."""

    input_ids: torch.Tensor  # (rows, capacity)
    position_ids: torch.Tensor
    segments: torch.Tensor
    gather: torch.Tensor  # (texts, length): where each token of the padded layout sits in the flattened rows


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    content_mask: torch.Tensor
    packing: Packing | None = None  # set: `embed` runs the packed rows instead of the padded batch


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: texts (by index) into rows of at most `capacity` tokens, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def packed_share(batches: Iterable[list[int]], lengths: Sequence[int]) -> tuple[int, int, int]:
    """(real tokens, tokens as padded batches, tokens as packed rows) of `batches`: what packing saves."""
    batches = list(batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    packed = sum(len(pack_rows(sizes, max(sizes))) * max(sizes) for sizes in ([lengths[i] for i in batch] for batch in batches))
    return real, padded_tokens(batches, lengths), packed


def padded_tokens(batches: Iterable[list[int]], lengths: Sequence[int]) -> int:
    """The tokens `batches` of `plan_batches` hold with their padding: what encoding them costs."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int = 512) -> list[list[int]]:
    """Group indices longest-first so that each padded batch stays within `token_budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first index of a batch is its longest, so the padded size is len * that length.
        if current and ((len(current) + 1) * lengths[current[0]] > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def load_embedder(setup: ModelSetup, runtime: Runtime = Runtime(), verify: bool = True) -> "Embedder":
    """Load the model that `setup` names, in the setup it describes, on the runtime's device and dtype.

    The model's files are fingerprinted first. A setup that carries a fingerprint (read from a manifest,
    say) must match the files found: vectors are never mixed across changed weights.
    """
    source = resolve_model_source(setup.model)
    fingerprint = model_fingerprint(source)
    if setup.fingerprint:
        require_agreement({"fingerprint": fingerprint}, {"fingerprint": setup.fingerprint}, f"model {setup.model}", "the recorded setup", keys=("fingerprint",))
    setup = setup.replace(fingerprint=fingerprint)
    onnx = is_onnx_folder(source)
    if runtime.backend == "torch" and onnx:
        raise UllmeError(f"{setup.model}: --backend torch cannot run this folder: it holds an ONNX graph (use --backend onnx or auto)")
    if runtime.backend == "onnx" and not onnx:
        raise UllmeError(f"{setup.model}: --backend onnx: this folder is not an ONNX export; write one with `ullme export MODEL --format onnx -o DIR`")
    if onnx:  # ONNX Runtime runs the exported graph; tokenizing, batching and every record stay this class's
        return embedder_over(None, setup, source, torch.device("cpu"), graph=open_graph(source, setup, runtime))
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    log.debug(f"loading {setup.model} from {source} ({dtype}, {device}); fingerprint {fingerprint[:16]}")
    folder = Path(source)
    base = adapter_base(folder)  # an adapter-only folder: the base it names, checked by fingerprint
    model = load_causal_lm(base or source, dtype, runtime.trust_remote_code)
    adapter = adapter_files(folder)
    if adapter is not None:
        with peft_deprecations_silenced():
            model = load_adapter(model, adapter)
    model.to(device).eval()
    embedder = embedder_over(model, setup, source, device, runtime.trust_remote_code)
    if adapter is None:  # plain weights: what an adapter trained on them would reference
        local = Path(setup.model).expanduser()
        embedder.base_record = {"model": str(local.resolve()) if local.exists() else setup.model, "fingerprint": fingerprint}
    elif base:  # an adapter-only folder trained further references the same base
        embedder.base_record = adapter_record(folder)
    if verify and setup.attention == "bidirectional":
        verify_bidirectional(model)
    if runtime.compile is None:

        embedder.compile_policy = auto_policy(model, embedder.device.type, embedder.compute_dtype)
    return compile_encoding(embedder) if runtime.compile else embedder


def embedder_over(model, setup: ModelSetup, source: str, device: torch.device, trust_remote_code: bool = False, graph=None) -> "Embedder":
    """An Embedder of `setup` over a loaded `model` (or an ONNX `graph`), with what the folder `source` holds
    beside the weights: the tokenizer, a trained latent head, the Matryoshka sizes. An instruction that leaves
    no room for the text fails here, before any work."""
    folder = Path(source)
    tokenizer = load_tokenizer(source, trust_remote_code)
    latent = None
    if model is not None and setup.pooling.startswith("latent-attention") and has_setup_file(folder):  # an ONNX graph holds its head
        # A saved setup that names a trained head must have it: an untrained one would give other vectors.
        if not (folder / LATENT_WEIGHTS).exists():
            raise UllmeError(f"{folder / LATENT_WEIGHTS}: missing: {folder / SETUP_FILE} names pooling '{setup.pooling}', whose trained head is this file")
        latent = LatentAttentionPooling.load(folder)
    embedder = Embedder(model, tokenizer, setup, device, latent, graph)
    embedder.source = source
    embedder.matryoshka_dims = matryoshka_dims(folder)
    for kind in KINDS:
        if prefix := embedder.instruction_prefix(kind):
            embedder.require_room_for_text(prefix)
    return embedder


def export_model(source: str, output: str, merge: bool = False, overwrite: bool = False) -> Path:
    """Write a model folder that sentence-transformers takes as it is. With `merge`, the LoRA adapter is
    merged into the weights, for tools that cannot run an adapter (the vectors stay the same up to float
    rounding)."""
    with guarded([output], model_inputs(source), overwrite, folder=True):
        embedder = load_embedder(resolve_setup(source), Runtime(dtype="float32", device="cpu"))
        return embedder.save(output, merge_lora=merge)


class Embedder:
    def __init__(self, model, tokenizer, setup: ModelSetup, device: torch.device, latent=None, graph: OnnxGraph | None = None):
        self.model = model
        # An exported ONNX graph that runs in place of `model` (None: torch runs the model). It encodes only.
        self.graph = graph
        self.tokenizer = tokenizer
        self.setup = setup.validate()
        self.device = device
        self.pooler = Pooler(setup.pooling, decoder_of(model).config.hidden_size, latent).to(device) if model is not None else None
        self.row_cap: int | None = None  # set by a GPU out-of-memory error; later batches are split to fit
        self.source: str | None = None  # the folder or hub id loaded from; the model card reads its origin there
        self.training: dict | None = None  # what finetune records (recipe, data, steps, eval); None: the source's
        self.compiled_embed = None  # set by compile(): what encode runs instead of embed
        self.packing = False  # run batches padding-free (`Packing`): texts end to end in rows, the same vectors
        self.compile_policy = None  # the automatic decision (compile_policy.py), when neither --compile nor --no-compile
        self._compile_timer = False  # the next compiled batch pays the compile: time it for the policy's record
        # The weights an adapter sits on: {"model": source, "fingerprint": ...}, set when a plain model loads;
        # an adapter-only save names it instead of copying it.
        self.base_record: dict | None = None
        # The sizes a Matryoshka run trained its vectors to work at (None: the full size); None: not such a run.
        self.matryoshka_dims: list[int | None] | None = None
        # Texts cut at max_length by this embedder's tokenizer, and the tokens cut: every command reports them.
        self.cut_texts = 0
        self.cut_tokens = 0
        self._prefix_tokens: dict[str, int] = {}

    def untrained_size(self, dim: int | None) -> str | None:
        """Why vectors cut to `dim` were not trained to work at that size (None: they were, or no cut)."""
        if dim is None or dim == self.dim:
            return None
        if not self.matryoshka_dims:
            return f"this model was not trained with Matryoshka (loss.matryoshka_dims), so its first {dim} dimensions may not work alone"
        if dim not in self.matryoshka_dims:
            trained = ", ".join("full" if d is None else str(d) for d in self.matryoshka_dims)
            return f"this model was trained to work at {trained} dimensions, not {dim}"
        return None

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def load(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        verify: bool = True,
        compile: bool | None = None,
        backend: str = "auto",
        **overrides,
    ) -> "Embedder":
        """Load an Embedder folder, a plain model folder, a .gguf file, a bundled name or a hub id.

        `overrides` set ModelSetup fields (pooling, attention, instructions, ...); None means keep.
        `compile` True encodes through `torch.compile` (`compile_policy.compile_encoding`), False never; None lets the policy of
        `compile_policy.py` decide from the CPU, the dtype and the size of each `encode` call. `backend` "onnx"
        runs a folder `ullme export --format onnx` wrote in ONNX Runtime ("auto": that folder's own backend).
        """
        return load_embedder(resolve_setup(name, **overrides), Runtime(dtype, device, trust_remote_code, compile, backend), verify)

    def plan(self, tokens: int) -> None:
        """Announce an encode job of `tokens` padded tokens, so the compile policy can weigh its cost."""
        if self.compile_policy is not None:
            self.compile_policy.plan(tokens)

    @property
    def backend(self) -> str:
        """What runs the forward, for progress lines: "torch bfloat16", "ONNX Runtime int8"."""
        return f"{'ONNX Runtime' if self.graph is not None else 'torch'} {self.compute_dtype}"

    @property
    def compute_dtype(self) -> str:
        return self.graph.compute_dtype if self.graph is not None else str(next(self.model.parameters()).dtype).replace("torch.", "")

    def vector_record(self, kind: str, instruction: str | None = None, truncate_dim: int | None = None) -> dict:
        """What defines the vectors this embedder makes for `kind` (ModelSetup.vector_record, in its dtype)."""
        return self.setup.vector_record(kind, instruction, self.compute_dtype, truncate_dim)

    def weights_changed(self) -> None:
        """Training changes the weights in memory: the loaded files' fingerprint no longer describes them."""
        self.setup = self.setup.replace(fingerprint="")

    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Iterable[str] | str = "all-linear"):
        from peft import LoraConfig, get_peft_model

        self.weights_changed()

        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
        with peft_deprecations_silenced():
            self.model = get_peft_model(self.model, lora)
        return self

    def enable_gradient_checkpointing(self) -> "Embedder":
        """Keep only each decoder layer's inputs in the forward pass and recompute the rest in the backward:
        activation memory grows with the number of layers instead of their contents. transformers' own
        per-layer checkpointing, so it applies in both attention modes (the mask is a layer input); the
        non-reentrant form replays dropout's RNG, so gradients are unchanged."""
        enable_activation_checkpointing(self.model)
        return self

    @property
    def default_token_budget(self) -> int:
        return GPU_TOKEN_BUDGET if self.device.type == "cuda" else CPU_TOKEN_BUDGET

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")

    def save(self, folder: str | Path, merge_lora: bool = False, reference_base: bool = False) -> Path:
        """Write a folder that `Embedder.load` and `ullme encode --model` read.

        Self-contained by default. With `reference_base` and an unmerged LoRA adapter, the folder holds the
        adapter (and tokenizer, head, setup, card) but not the base weights: `ullme.json` names the base and
        its weights fingerprint, and a base whose files changed is refused when the folder loads.

        The folder is assembled beside the target and renamed into place, so a crash leaves no half folder.
        An existing ullme model folder is replaced; any other non-empty folder is refused, never deleted.
        """
        if self.graph is not None:
            raise UllmeError(f"{self.source}: an ONNX folder is exported, not saved again; export from the model folder")
        target = real_path(folder)
        if self.source and Path(self.source).exists() and (target == real_path(self.source) or real_path(self.source) in target.parents):
            raise UllmeError(f"{folder}: is or lies inside the model it is saved from ({self.source}); save elsewhere")
        with atomic_folder(folder) as staging:  # replaces only a folder that holds nothing but what ullme wrote
            write_folder(self, staging, target.name, merge_lora, reference_base)
        return Path(folder)

    # ---------------------------------------------------------------- tokenization
    def instruction_prefix(self, kind: str, instruction: str | None = None) -> str:
        return self.setup.instruction_prefix(kind, instruction)

    def tokenize(self, texts: Sequence[str], kind: str = "passage", instruction: str | None = None, max_length: int | None = None) -> list[Tokenized]:
        return self.tokenize_prefixed(texts, self.instruction_prefix(kind, instruction), max_length)

    def tokenize_prefixed(self, texts: Sequence[str], prefix: str, max_length: int | None = None) -> list[Tokenized]:
        """Tokenize `prefix + text`, counting the prefix's tokens so that pooling leaves them out. Texts are
        cut at `max_length` tokens (default: the setup's); a larger limit lets a caller see which are over."""
        add_eos = self.setup.pooling == "last-token"
        eos = self.tokenizer.eos_token_id
        if prefix:
            self.require_room_for_text(prefix)
        max_length = (max_length or self.setup.max_length) - (1 if add_eos else 0)
        encoded = self.tokenizer(
            [prefix + t for t in texts],
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=bool(prefix),
        )
        result = []
        for row, ids in enumerate(encoded["input_ids"]):
            n_instruction = 0
            if prefix:
                # Leading tokens that end inside the prefix: special tokens (offsets 0, 0) and instruction
                # text. A token straddling the boundary (byte-level BPE's " Who") carries content.
                for _, end in encoded["offset_mapping"][row]:
                    if end > len(prefix):
                        break
                    n_instruction += 1
            if add_eos and (not ids or ids[-1] != eos):
                ids = ids + [eos]  # some tokenizers stop appending EOS; last-token pooling needs it
            result.append(Tokenized(list(ids), n_instruction))
        for encoding in getattr(encoded, "encodings", None) or ():  # a fast tokenizer keeps what truncation cut
            if encoding.overflowing:
                self.cut_texts += 1
                self.cut_tokens += sum(len(o.ids) - sum(o.special_tokens_mask) for o in encoding.overflowing)
        return result

    def tokenize_past_limit(self, texts: Sequence[str], kind: str = "passage", instruction: str | None = None) -> tuple[list[Tokenized], list[int]]:
        """The texts' tokens cut one past max_length, and the positions of those longer than max_length: what a
        caller that refuses over-long texts needs (serve without --truncate, encode --on-long error). Where no
        text is over, the tokens are `tokenize`'s own."""
        items = self.tokenize(texts, kind, instruction, max_length=self.setup.max_length + 1)
        return items, [i for i, item in enumerate(items) if len(item.ids) > self.setup.max_length]

    def require_room_for_text(self, prefix: str) -> None:
        """Refuse an instruction that leaves fewer than MIN_TEXT_TOKENS of max_length for the text."""
        if prefix not in self._prefix_tokens:
            alone = self.tokenizer(prefix, add_special_tokens=True)["input_ids"]
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            self._prefix_tokens[prefix] = len(alone) - (1 if alone and alone[-1] in special and len(alone) > 1 else 0)
        used = self._prefix_tokens[prefix] + (1 if self.setup.pooling == "last-token" else 0)
        if self.setup.max_length - used < MIN_TEXT_TOKENS:
            raise UllmeError(f"the instruction {prefix[:60]!r}{'...' if len(prefix) > 60 else ''} takes {used} of max_length "
                             f"{self.setup.max_length} tokens, leaving {self.setup.max_length - used} for the text (at least "
                             f"{MIN_TEXT_TOKENS} are needed): raise --max-length or shorten the instruction")  # fmt: skip

    def report_truncation(self, command: str) -> None:
        """A command's summary line of what max_length cut: a warning when it cut anything (a text's end is
        then invisible to its vector), an info line otherwise."""
        if self.cut_texts:
            log.warning(f"{command}: {self.cut_texts} text(s) cut at max_length {self.setup.max_length} ({self.cut_tokens} tokens dropped)")
        else:
            log.info(f"{command}: no text was cut at max_length {self.setup.max_length}")

    def collate(self, items: Sequence[Tokenized], packed: bool = False) -> Batch:
        """A padded batch; with `packed`, also the same texts packed into rows as long as the longest text
        (`pack_rows`), which `embed` then runs instead: fewer padding tokens, the same vectors."""
        length = max(len(t.ids) for t in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        content = torch.zeros((len(items), length), dtype=torch.long)
        for row, t in enumerate(items):
            n = len(t.ids)
            start = length - n if self.setup.padding_side == "left" else 0
            ids[row, start : start + n] = torch.tensor(t.ids)
            mask[row, start : start + n] = 1
            content[row, start + min(t.instruction_tokens, n) : start + n] = 1
        packing = self.pack(items, length) if packed and self.can_pack() else None
        return Batch(ids.to(self.device), mask.to(self.device), content.to(self.device), packing)

    def can_pack(self, mode: str | None = None) -> bool:
        """Whether `embed` can run packed rows in this attention mode. A causal model with a sliding window
        clips attention per layer type, which one packed mask cannot say: it stays padded."""
        return (mode or self.setup.attention) == "bidirectional" or sliding_window(decoder_of(self.model).config) is None

    def pack(self, items: Sequence[Tokenized], capacity: int) -> Packing:
        rows = pack_rows([len(t.ids) for t in items], capacity)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), capacity), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), capacity), dtype=torch.long)
        segments = torch.zeros((len(rows), capacity), dtype=torch.long)
        gather = torch.zeros((len(items), capacity), dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for k, i in enumerate(row, start=1):
                n = len(items[i].ids)
                ids[r, offset : offset + n] = torch.tensor(items[i].ids)
                positions[r, offset : offset + n] = torch.arange(n)
                segments[r, offset : offset + n] = k
                start = capacity - n if self.setup.padding_side == "left" else 0  # the text's place in the padded layout
                gather[i, start : start + n] = torch.arange(r * capacity + offset, r * capacity + offset + n)
                offset += n
        return Packing(ids.to(self.device), positions.to(self.device), segments.to(self.device), gather.to(self.device))

    # ---------------------------------------------------------------- embedding
    def embed(self, batch: Batch, mode: str | None = None) -> torch.Tensor:
        """Pooled (and normalized, per config) vectors; differentiable, so training uses it too."""
        if self.graph is not None:
            raise UllmeError(f"{self.source}: an ONNX folder runs in ONNX Runtime only; training and torch forwards need the model folder it was exported from")
        mode = mode or self.setup.attention
        if batch.packing is not None and self.can_pack(mode):
            p = batch.packing
            rows = packed_hidden_states(self.model, p.input_ids, p.position_ids, p.segments, mode)
            states = rows.flatten(0, 1)[p.gather]  # back to the padded layout, which pooling reads
        else:
            states = hidden_states(self.model, batch.input_ids, batch.attention_mask, mode)
        pooled = self.pooler(states.float(), batch.attention_mask, batch.content_mask)
        return F.normalize(pooled, dim=-1) if self.setup.normalize else pooled

    @torch.inference_mode()
    def encode_tokenized(self, items: Sequence[Tokenized]) -> np.ndarray:
        if self.graph is not None:
            return self.graph.run(self.collate(items))
        batch = self.collate(items, packed=self.packing)
        if self.compiled_embed is not None:
            try:
                started = time.perf_counter()
                vectors = self.compiled_embed(batch).float().cpu().numpy()
                if self._compile_timer and self.compile_policy is not None:
                    self.compile_policy.compiled(time.perf_counter() - started)
                self._compile_timer = False
                return vectors
            except torch._dynamo.exc.TorchDynamoException as error:  # no C++ compiler, an op inductor cannot lower, ...
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                log.warning(f"torch.compile failed ({reason}); encoding without it")
                self.compiled_embed = None
        started = time.perf_counter()
        vectors = self.embed(batch).float().cpu().numpy()
        policy = self.compile_policy
        if policy is not None and not policy.decided and policy.observe(batch.input_ids.numel(), time.perf_counter() - started):
            compile_encoding(self)
        return vectors

    def encode_batch(self, items: Sequence[Tokenized]) -> np.ndarray:
        """`encode_tokenized` in pieces of at most `row_cap` rows. A GPU out-of-memory error halves the cap
        and retries the piece, so a long job carries on with smaller batches instead of dying.

        CPU jobs never see this error (the operating system ends the process instead).
        """
        pieces, start = [], 0
        while start < len(items):
            piece = items[start : start + (self.row_cap or len(items))]
            try:
                pieces.append(self.encode_tokenized(piece))
            except torch.OutOfMemoryError:
                if len(piece) == 1:
                    raise UllmeError("out of GPU memory on a single text; lower --max-length or use a smaller dtype") from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.row_cap = len(piece) // 2
                log.warning(f"out of GPU memory on a batch of {len(piece)} texts; continuing with at most {self.row_cap}")
                continue
            start += len(piece)
        return np.concatenate(pieces)

    def encode(
        self,
        texts: str | Sequence[str],
        kind: str = "passage",
        instruction: str | None = None,
        token_budget: int | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
        normalize: bool | None = None,
        **mteb_call,
    ) -> np.ndarray | torch.Tensor:
        """Embed texts in input order: float32 (n, dim), or (dim,) for one string, as sentence-transformers does.

        Batches are planned by `token_budget` (padded tokens; the device's default) and hold at most
        `batch_size` texts. `normalize` None keeps the setup's choice; True normalizes a model that does not.
        mteb calls `encode(dataloader, task_metadata=..., prompt_type=...)`: that goes to its MtebEncoder.
        """
        if "task_metadata" in mteb_call:
            return self._mteb_encoder().encode(texts, **mteb_call)
        if mteb_call:
            raise TypeError(f"encode() got unexpected keyword arguments {sorted(mteb_call)}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        tokenized = self.tokenize(texts, kind, instruction)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        lengths = [len(t.ids) for t in tokenized]
        batches = plan_batches(lengths, token_budget or self.default_token_budget, batch_size or 512)
        self.plan(padded_tokens(batches, lengths))
        log.debug(f"encode: {len(texts)} texts in {len(batches)} batches, token budget {token_budget or self.default_token_budget}")
        with progress_bar(f"encode ({self.backend})", total=len(texts), enabled=show_progress_bar) as advance:
            for batch in batches:
                out[batch] = self.encode_batch([tokenized[i] for i in batch])
                advance(len(batch))
        if normalize is True and not self.setup.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        elif normalize is False and self.setup.normalize:
            raise UllmeError("normalize=False: this model's setup normalizes inside the model; load it with normalize=False")
        result = out[0] if single else out
        return torch.from_numpy(result) if convert_to_tensor else result

    def _mteb_encoder(self):
        from ullme_cli.models.mteb_face import MtebEncoder

        if getattr(self, "_mteb", None) is None or self._mteb.mteb_model_meta.revision != self._mteb_revision():
            self._mteb = MtebEncoder(self)
        return self._mteb

    def _mteb_revision(self) -> str:
        from ullme_cli.models.mteb_face import setup_revision

        return setup_revision(self.setup)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta for this model (mteb 2.x reads it); the Embedder is an mteb encoder as it is."""
        return self._mteb_encoder().mteb_model_meta

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix [n, m], as sentence-transformers' `similarity`."""
        from ullme_cli.models.mteb_face import cosine_matrix

        return cosine_matrix(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        from ullme_cli.models.mteb_face import cosine_pairwise

        return cosine_pairwise(embeddings1, embeddings2)

    def encode_query(self, texts: str | Sequence[str], **options) -> np.ndarray | torch.Tensor:
        """`encode` with the query instruction."""
        return self.encode(texts, kind="query", **options)

    def encode_document(self, texts: str | Sequence[str], **options) -> np.ndarray | torch.Tensor:
        """`encode` for passages (documents)."""
        return self.encode(texts, kind="passage", **options)

    @property
    def dim(self) -> int:
        return self.graph.dim if self.graph is not None else decoder_of(self.model).config.hidden_size
