"""`ullme export --format onnx`: one graph from token ids to the finished vector (models/onnx_graph.py runs it).

`export_onnx` traces ullme's own forward into `model.onnx`: the bidirectional 4-D mask (ullme's mask route,
so nothing rests on a config flag another runtime may not read), the pooling and the normalisation. So ONNX
Runtime gives `ullme encode`'s vectors with nothing of ours around the graph but the tokenizer;
sentence-transformers' own ONNX export leaves pooling and normalisation outside its graph.

- Inputs and output: models/onnx_graph.py (`pooling_mask` holds the tokens pooled: ullme leaves an
  instruction's tokens out).
- `quantize="int8"`: ONNX Runtime's dynamic quantization, the one lever left on CPUs whose float32 path is
  at its ceiling: int8 weights per output channel for the projections (q, k, v, o, gate, up), activations
  quantized per call. `down_proj` stays float32: its inputs carry the activation outliers (quantizing it
  alone took smollm2-135m's mean cosine to 0.962). Before the trace, SmoothQuant (Xiao et al., 2023) moves
  the outliers of the norms' outputs into the next projections' weights, calibrated on 128 TREC QA train
  texts, α = 0.5; the float32 function is unchanged, which is checked (a norm it cannot fold, such as
  Gemma's 1 + w, keeps its weights). On smollm2-135m this took the mean cosine from 0.988 to 0.993.
- The export checks itself before the folder is moved into place: ONNX Runtime's vectors of probe queries
  and documents, alone and in a padded batch, against the torch forward's. float32 must reach cosine 0.9999
  everywhere, int8 0.99 on average; the measured values are kept in `ullme.json` under "onnx".

The graph is traced by torch's TorchScript exporter (about a second on a tiny model), or, where that fails
or its graph gives other vectors (it bakes some families' shapes in as constants), by torch's dynamo
exporter (8 s on the smallest). `ullme.json` records which. A graph larger than protobuf's 2 GB (a float32
model above about 500M parameters) is refused.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ullme_cli.constants import KINDS
from ullme_cli.data import read_training_examples
from ullme_cli.errors import UllmeError
from ullme_cli.io.outputs import atomic_folder, guarded
from ullme_cli.model_setup import Runtime, resolve_setup
from ullme_cli.models.bidirectional import hidden_states
from ullme_cli.models.embedder import Embedder, load_embedder
from ullme_cli.models.export_check import (
    PROBES,
    agreement,
    probe_cosines,
    require_floor,
)
from ullme_cli.models.folder import write_setup_file
from ullme_cli.models.loading import model_inputs
from ullme_cli.models.onnx_graph import INPUTS, ONNX_FILE, OUTPUT, run, session

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
FLOORS = {None: ("min", 0.9999), "int8": ("mean", 0.99)}
PROTOBUF_LIMIT = 2 * 2**30


class EmbeddingGraph(nn.Module):
    """What ONNX Runtime runs: the decoder in the setup's attention mode (through ullme's 4-D mask), the
    pooling and the normalisation, as `Embedder.embed` does."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.model, self.pooler, self.setup = embedder.model, embedder.pooler, embedder.setup

    def forward(self, input_ids, attention_mask, pooling_mask):
        states = hidden_states(self.model, input_ids, attention_mask, self.setup.attention, route="mask")
        pooled = self.pooler(states.float(), attention_mask, pooling_mask)
        return F.normalize(pooled, dim=-1) if self.setup.normalize else pooled


def export_onnx(source: str, output: str, quantize: str | None = None, overwrite: bool = False) -> dict:
    """Write `output/` with model.onnx, the tokenizer and ullme.json; returns the check's record."""
    if quantize not in (None, *QUANTIZATIONS):
        raise UllmeError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got '{quantize}'")
    with guarded([output], model_inputs(source), overwrite, folder=True):
        embedder = load_embedder(resolve_setup(source), Runtime(dtype="float32", device="cpu", compile=False))
        if embedder.has_adapter:  # the graph holds plain weights: LoRA merged, the same vectors up to rounding
            embedder.model = embedder.model.merge_and_unload()
        size = sum(p.numel() * p.element_size() for p in embedder.model.parameters())
        if size > PROTOBUF_LIMIT:
            raise UllmeError(f"{source}: {size / 2**30:.1f} GB of float32 weights is over ONNX's 2 GB protobuf limit for one graph; "
                             "ullme exports models up to about 500M parameters")  # fmt: skip
        with atomic_folder(output) as staging:
            check = _write(embedder, staging, quantize)
    return check


def _write(embedder: Embedder, staging: Path, quantize: str | None) -> dict:
    references = _probe_vectors(embedder)  # the torch model's, before any change of its weights
    for module in embedder.model.modules():  # mixture-of-experts: the loop over the experts hit (histc) does not trace;
        config = getattr(module, "config", None)  # transformers' batched_mm form of the same experts does
        if getattr(config, "_experts_implementation", None) not in (None, "batched_mm"):
            config._experts_implementation = "batched_mm"
    smoothed = quantize == "int8" and smooth_for_int8(embedder, calibration_texts(), references)
    traced = staging / ("float32.onnx" if quantize else ONNX_FILE)
    exporter = _export_graph(embedder, traced, references)
    if quantize == "int8":
        _quantize_int8(traced, staging / ONNX_FILE)
        traced.unlink()
    embedder.tokenizer.save_pretrained(staging)
    check = {**_check(embedder, session(staging / ONNX_FILE), quantize, references), "exporter": exporter,
             **({"smoothquant_alpha": SMOOTHQUANT_ALPHA} if smoothed else {})}  # fmt: skip
    write_setup_file(staging, embedder.setup, matryoshka_dims=embedder.matryoshka_dims,
                     onnx={"file": ONNX_FILE, "quantize": quantize, "inputs": list(INPUTS), "output": OUTPUT, "dim": embedder.dim, "check": check})
    return check


def _export_graph(embedder: Embedder, path: Path, references: np.ndarray) -> str:
    """Trace the float32 graph to `path` with the first exporter whose graph gives the torch model's vectors
    on the probes: the TorchScript tracer (a second per tiny model), else torch's dynamo exporter (which
    follows what the tracer bakes in as constants: some families' reshapes, ops it lacks). Returns its name."""
    graph = EmbeddingGraph(embedder).eval()
    example = embedder.collate(embedder.tokenize(list(PROBES), "query"))
    dynamic = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    failures = []
    for exporter in ("torchscript", "dynamo"):
        try:
            with torch.no_grad(), _quiet_tracer():
                torch.onnx.export(graph, (example.input_ids, example.attention_mask, example.content_mask), str(path), input_names=list(INPUTS),
                                  output_names=[OUTPUT], dynamic_axes={**dynamic, OUTPUT: {0: "batch"}}, opset_version=18,
                                  dynamo=exporter == "dynamo", **({"verbose": False, "report": False} if exporter == "dynamo" else {}))  # fmt: skip
            _check(embedder, session(path), None, references)
            return exporter
        except Exception as e:  # noqa: BLE001 - an exporter that cannot trace this family, or whose graph runs wrong
            failures.append(f"{exporter}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}")
            path.unlink(missing_ok=True)
            for extra in path.parent.glob(path.name + "*"):  # a dynamo export's external data
                extra.unlink()
    raise UllmeError(f"no ONNX exporter gave this model's vectors ({'; '.join(failures)})")


def _probe_batches(embedder: Embedder) -> list:
    """The probes as queries and as documents, in one padded batch and each alone."""
    batches = []
    for kind in KINDS:
        items = embedder.tokenize(list(PROBES), kind)
        batches += [items, *[[item] for item in items]]
    return batches


def _probe_vectors(embedder: Embedder) -> np.ndarray:
    return np.concatenate([embedder.encode_tokenized(items) for items in _probe_batches(embedder)])


def _check(embedder: Embedder, graph_session, quantize: str | None, references: np.ndarray) -> dict:
    """ONNX Runtime against the torch forward (`references`, from before any change of the weights) on the
    probes; refused below the floor of FLOORS."""
    theirs = np.concatenate([run(graph_session, embedder.collate(items)) for items in _probe_batches(embedder)])
    check = agreement(references, theirs)
    require_floor(check, *FLOORS[quantize], "the ONNX graph's vectors")
    return check


SMOOTHQUANT_ALPHA = 0.5  # the paper's default; not tuned here
INT8_KEPT_FLOAT = ("down_proj",)  # the projections whose inputs carry the activation outliers


def calibration_texts(rows: int = 64) -> list[str]:
    """Questions and their first relevant sentences from the bundled TREC QA train split (never its test split)."""
    examples, _ = read_training_examples(str(Path(__file__).resolve().parent.parent / "resources" / "trecqa-train" / "train.jsonl"))
    return [text for example in examples[:rows] for text in (example.query, example.positives[0])]


def smooth_for_int8(embedder: Embedder, calibration: list[str], references: np.ndarray | None = None, alpha: float = SMOOTHQUANT_ALPHA) -> bool:
    """SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): move activation outliers into the weights before int8.

    For each projection that reads a norm's output (q/k/v after input_layernorm, gate/up after
    post_attention_layernorm), channel j gets s_j = max|X_j|^α / max|W_j|^(1-α), measured on `calibration`;
    the norm's weight is divided by s and the projections' input columns multiplied by it. For a norm that
    computes w · x̂ (Llama's RMSNorm) the float32 function is the same. With `references` (the probe
    vectors before), that is checked, and the weights are put back where it does not hold; returns whether
    the smoothing was kept."""
    model = embedder.model
    blocks = [m for m in model.modules() if all(hasattr(m, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))]
    try:
        pairs = [(b.input_layernorm, [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]) for b in blocks]
        pairs += [(b.post_attention_layernorm, [b.mlp.gate_proj, b.mlp.up_proj]) for b in blocks]
    except AttributeError:  # another layout of the projections: quantized without smoothing
        return False
    if not pairs or not all(isinstance(getattr(norm, "weight", None), torch.Tensor) for norm, _ in pairs):
        return False
    seen: dict = {}

    def record(norm, _, output):
        channel_max = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
        seen[norm] = torch.maximum(seen[norm], channel_max) if norm in seen else channel_max

    hooks = [norm.register_forward_hook(record) for norm, _ in pairs]
    try:
        embedder.encode(calibration)
    finally:
        for hook in hooks:
            hook.remove()
    saved = {id(t): t.detach().clone() for norm, linears in pairs for t in (norm.weight, *(linear.weight for linear in linears))}
    with torch.no_grad():
        for norm, linears in pairs:
            weight_max = torch.cat([linear.weight.abs() for linear in linears]).amax(0).float()
            scale = seen[norm].clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)
            norm.weight.div_(scale.to(norm.weight.dtype))
            for linear in linears:
                linear.weight.mul_(scale.to(linear.weight.dtype))
    if references is None or probe_cosines(references, _probe_vectors(embedder)).min() >= 0.99999:
        return True
    with torch.no_grad():  # this family's norm is not w · x̂: the fold changed the function
        for norm, linears in pairs:
            for t in (norm.weight, *(linear.weight for linear in linears)):
                t.copy_(saved[id(t)])
    log.info("SmoothQuant does not fold into this family's norms; quantizing without it")
    return False


def _quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 of the weight MatMuls but those in INT8_KEPT_FLOAT, per output channel."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    kept = [node.name for node in graph.node if node.op_type == "MatMul" and (node.input[1] not in weights or any(k in node.name for k in INT8_KEPT_FLOAT))]
    logging.getLogger().disabled, quiet = True, logging.getLogger().disabled  # onnxruntime's advice to pre-process goes to the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept)
    finally:
        logging.getLogger().disabled = quiet


class _quiet_tracer:
    """The tracer warns about every Python branch transformers takes on a shape; with ullme's explicit mask
    they are constants of the graph, and the export's own check proves the vectors."""

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
