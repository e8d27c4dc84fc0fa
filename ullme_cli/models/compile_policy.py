"""When encoding runs through torch.compile by default (issue 29 §1).

Compiling fuses the elementwise work that transformers runs unfused (RMSNorm, rotary, SiLU gating,
residual adds) around the matmuls. Measured (docs/benchmarks.md): on a CPU with fast bf16 matmuls that work
is a large share of the time and compiling pays; on fp32-only CPUs the matmuls dominate and it gave
nothing beyond noise. Its cost is paid once per process, on the first batches: minutes cold, less when
inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, on by default) already holds this model's kernels.

The automatic decision (`--compile` and `--no-compile` override it):
- only on a CPU that computes in bf16 (the dtype `auto` picks where bf16 matmuls are fast); never in fp32,
  and not on GPUs, where it has not been measured here;
- only for a job that announced its size (`plan`): `ullme encode` and `Embedder.encode` do, a server does not;
- the first batches run eagerly and give the job's eager rate; the job compiles when the expected compile
  time is under `MAX_SHARE` of the eager time left. The expected time is what the last compile of the same
  model shape took on this machine (recorded beside inductor's cache), else a cold estimate per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from types import MethodType
from pathlib import Path

from ullme_cli.io.outputs import atomic_write_text

log = logging.getLogger(__name__)

MAX_SHARE = 0.10  # compile only when it costs under this share of the eager time left
MIN_EAGER_SECONDS = 2.0  # eager work to measure the rate on before deciding
# Cold compile (dynamo + inductor, empty cache) of a 30-layer 135M model on a 2-core AMD EPYC with
# avx512_bf16, in bf16: about 41 s over a compiled first pass, measured alone (docs/benchmarks.md; 120 s
# before one trace and nested layer regions): a per-layer estimate, on the safe side, for models never
# compiled on this machine.
COLD_SECONDS_PER_LAYER = 2.0


def cache_dir() -> Path:
    """Inductor's on-disk cache folder (torch's own default when TORCHINDUCTOR_CACHE_DIR is unset)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return Path(inductor_cache_dir())


def shape_key(model, compute_dtype: str) -> str:
    """What decides which kernels a compile makes: the model's config (shapes, layers, activation), the
    compute dtype and the torch version. Weights do not: another checkpoint of the same shape reuses them."""
    import torch

    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    blob = json.dumps([config, compute_dtype, torch.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CompileTimes:
    """Seconds the last compile of each model shape took here: `ullme-compile-times.json` in inductor's cache
    folder, so that it lives and dies with the kernels it describes."""

    def __init__(self, folder: Path | None = None):
        self.path = (folder or cache_dir()) / "ullme-compile-times.json"

    def read(self) -> dict:
        try:
            values = json.loads(self.path.read_text())
            return values if isinstance(values, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> float | None:
        value = self.read().get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def put(self, key: str, seconds: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({**self.read(), key: round(seconds, 1)}))
        except OSError as e:  # a read-only cache folder: the next run estimates again
            log.debug(f"cannot record the compile time in {self.path}: {e}")


def ineligible(device_type: str, compute_dtype: str, fast_bf16: bool) -> str | None:
    """Why the automatic policy never compiles here, or None when it may."""
    if device_type != "cpu":
        return f"not measured on {device_type}; pass --compile to try it"
    if compute_dtype != "bfloat16":
        return f"{compute_dtype} on this CPU: compiling measured no gain beyond noise where matmuls dominate"
    if not fast_bf16:
        return "this CPU has no fast bf16 matmuls"
    return None


@dataclass
class CompilePolicy:
    """The automatic decision for one loaded embedder; `Embedder.encode_tokenized` feeds it eager batches."""

    reason_not: str | None  # `ineligible`'s answer
    key: str  # `shape_key`
    layers: int
    times: CompileTimes
    remaining_tokens: int = 0
    eager_tokens: int = 0
    eager_seconds: float = 0.0
    decided: bool = False

    @property
    def expected_seconds(self) -> tuple[float, str]:
        recorded = self.times.get(self.key)
        if recorded is not None:
            return recorded, "its last compile of this model shape here"
        return COLD_SECONDS_PER_LAYER * self.layers, f"a cold estimate for {self.layers} layers"

    def verdict(self, eager_seconds_left: float) -> tuple[bool, float, str]:
        """Whether to compile a job with this much eager work left, the expected compile seconds, and where
        that expectation comes from."""
        expected, source = self.expected_seconds
        return self.reason_not is None and expected < MAX_SHARE * eager_seconds_left, expected, source

    def plan(self, tokens: int) -> None:
        """The job ahead: this many tokens (padded) to encode."""
        self.remaining_tokens = tokens

    def observe(self, tokens: int, seconds: float) -> bool:
        """Record one eager batch; True once, when the job should compile from its next batch on."""
        self.remaining_tokens = max(self.remaining_tokens - tokens, 0)
        self.eager_tokens += tokens
        self.eager_seconds += seconds
        if self.decided or self.eager_seconds < MIN_EAGER_SECONDS:
            return False
        self.decided = True
        if self.reason_not is not None:
            log.info(f"compile: off ({self.reason_not})")
            return False
        left = self.remaining_tokens * self.eager_seconds / max(self.eager_tokens, 1)
        verdict, expected, source = self.verdict(left)
        log.info(f"compile: {'on' if verdict else 'off'} (about {left:.0f} s of eager encoding left; compiling takes about {expected:.0f} s "
                 f"({source}), {'under' if verdict else 'not under'} {MAX_SHARE:.0%} of it; --compile/--no-compile decide instead)")  # fmt: skip
        return verdict

    def compiled(self, seconds: float) -> None:
        """The first compiled batch took `seconds`: remember it as this shape's compile time."""
        self.times.put(self.key, seconds)


def auto_policy(model, device_type: str, compute_dtype: str) -> CompilePolicy:
    from ullme_cli.models.loading import cpu_has_fast_bf16

    layers = getattr(model.config, "num_hidden_layers", None) or 24
    reason = ineligible(device_type, compute_dtype, cpu_has_fast_bf16() if device_type == "cpu" else False)
    return CompilePolicy(reason, shape_key(model, compute_dtype), layers, CompileTimes())


# ---------------------------------------------------------------- the wiring: what a decision to compile does
# torch loads here only when a compile runs: this module's policy is read before any model is.


def compile_each_layer_once(model) -> None:
    """Mark every decoder layer as a nested compile region, so that torch.compile traces and compiles one
    layer and stamps it out for the others (a new compile only where a layer differs, such as gemma2's
    sliding-window layers) instead of the same code 30 times. On the default model the cold compile took 50 s
    instead of 89 (2-core AMD EPYC with avx512_bf16, a niced job beside it), and the steady state was no
    slower (measured alone). Outside torch.compile the mark does nothing."""
    import torch

    from ullme_cli.models.bidirectional import decoder_of

    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        return
    marked: dict = {}
    for layer in layers:
        if type(layer) not in marked:
            marked[type(layer)] = torch.compiler.nested_compile_region(type(layer).forward)
        layer.forward = MethodType(marked[type(layer)], layer)


def compile_encoding(embedder):
    """Make `embedder` encode through `torch.compile` with dynamic shapes, so that one compile serves every batch size and
    length (static shapes recompile per batch; padding to a few bucketed shapes costs more than fusion gains
    on short texts: docs/benchmarks.md).

    It fuses the elementwise work that transformers runs unfused (RMSNorm, rotary, SiLU gating, residual
    adds): 1.2x on a 2-core EPYC with AVX512-BF16 in bf16, within noise on fp32-only CPUs, vectors within
    1e-5 of eager in fp32. The first batch pays the compile (minutes cold on 2 cores, less from inductor's
    on-disk cache), so by default `compile_policy.py` decides when it pays. Training never runs the
    compiled function.
    """
    import torch

    log.info("encoding through torch.compile: the first batch compiles (a minute on a CPU, seconds when inductor's cache has this model)")
    compile_each_layer_once(embedder.model)
    compiled = torch.compile(embedder.embed, dynamic=True)

    def embed_compiled(batch):
        # The modules' float attributes (norm eps, the embedding's norm_type) stay constants. Under
        # dynamic=True Dynamo traces them as symbols, then specializes them and traces the whole model
        # again: twice the tracing, and an AOT-autograd cache miss on every run (docs/benchmarks.md).
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(batch)

    embedder.compiled_embed = embed_compiled
    embedder._compile_timer = True
    return embedder

