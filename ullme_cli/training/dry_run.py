"""`ullme finetune RECIPE --dry-run`: what a recipe would train on and what one step costs, without weights.

1. Data: each source is read as training would read it (formats, caps, weights); a source that cannot be
   reached (a Hub set offline, a missing file) is reported as such, and the run goes on.
2. The model: only its config, from the model itself where it can be read here, else from
   `<recipe name>.config.json` beside the recipe (recipes/paper/ ships the public configs of its backbones).
3. One training step is traced on fake tensors (FakeTensorMode): shapes and no storage, so an 8B model
   costs nothing. The trace runs the recipe's passes at full length (`model.max_length` for every text, an
   upper bound) for one process's batch: the embedding pass (queries, positives, negatives; one GradCache
   chunk when GradCache is on) and, for dpo/kl/sft, the causal pass with its logits. `FlopCounterMode`
   counts its FLOPs; a saved-tensors hook adds up the activations that autograd keeps for the backward pass.
   The decoder layers are all alike, so models of 1 and 2 layers are traced and the difference is extended
   to every layer (parameters too): the same figures as tracing them all, in a tenth of the time.
4. Memory per process: parameters, gradients and AdamW's two moments of the trainable ones (divided by the
   process count under FSDP), plus the traced activations and the largest transient (the logits).
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ullme_cli.dtypes import BYTES_PER_ELEMENT
from ullme_cli.errors import UllmeError
from ullme_cli.models.embedder import (
    enable_activation_checkpointing,
    peft_deprecations_silenced,
)
from ullme_cli.recipes import Recipe
from ullme_cli.training.mixture import read_mixture
from ullme_cli.training.step import step_texts


@dataclass
class SourceReport:
    name: str
    rows: int | None  # None: not reachable here
    problem: str | None = None


@dataclass
class Budget:
    config_from: str
    parameters: int
    trainable: int
    sources: list[SourceReport] = field(default_factory=list)
    tokens_per_step: int = 0  # per process, at max_length
    flops_per_step: float = 0.0  # per process
    memory: dict[str, int] = field(default_factory=dict)  # bytes per process, by kind

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())


def model_config(recipe: Recipe):
    """The model's config and where it came from: the model itself, else the file beside the recipe."""
    from transformers import AutoConfig

    from ullme_cli.models.loading import resolve_model_source

    beside = Path(recipe.source or "recipe.yaml").with_suffix(".config.json")
    try:
        source = resolve_model_source(recipe.model.model)
        return AutoConfig.from_pretrained(source), source
    except Exception as error:  # noqa: BLE001 - offline hub ids, adapter folders: try the shipped config
        if not beside.is_file():
            raise UllmeError(f"{recipe.model.model}: its config cannot be read here ({str(error).splitlines()[0][:160]}), "
                             f"and there is no {beside} beside the recipe") from None  # fmt: skip
    try:
        values = json.loads(beside.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values), str(beside)
    except (ValueError, KeyError, TypeError) as error:
        raise UllmeError(f"{beside}: not a model config ({error})") from None


def read_sources(recipe: Recipe) -> list[SourceReport]:
    reports = []
    for source in recipe.data.source_list():
        try:
            mixture = read_mixture([source], recipe.data.skip_bad_rows, recipe.train.seed)
            reports.append(SourceReport(source.name, len(mixture.examples)))
        except UllmeError as error:
            reports.append(SourceReport(source.name, None, str(error)))
    return reports


def fake_model(config, recipe: Recipe, mode, layers: int | None = None):
    """The recipe's model with fake parameters of FakeTensorMode `mode` (shapes, no storage): built on the
    meta device, its LoRA adapters added there (peft cannot move fake parameters), then every parameter and
    buffer replaced by a fake CPU tensor of its shape and dtype; gradient checkpointing on if asked."""
    from transformers import AutoModelForCausalLM

    if layers is not None:  # a copy of the model with this many decoder layers
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):  # the per-layer list some configs carry
            config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, recipe.model.dtype))
    if recipe.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = recipe.lora.target_modules if isinstance(recipe.lora.target_modules, str) else list(recipe.lora.target_modules)
        lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
        with peft_deprecations_silenced():
            model = get_peft_model(model, lora)
    with mode:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="cpu"), requires_grad=param.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return model


class SavedActivations:
    """Bytes that autograd saves for the backward pass, each storage once (`_cdata` names it, also for fake tensors),
    parameters left out (they are counted as parameters)."""

    def __init__(self, parameters):
        self.parameters = {p.untyped_storage()._cdata for p in parameters}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameters and storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            self.bytes += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield


def trace_step(model, recipe: Recipe, device: str = "cpu") -> tuple[float, int, int, int]:
    """(FLOPs, saved activation bytes, largest transient bytes, tokens) of one process's step of `recipe`
    on `model`, every text at max_length; run under the FakeTensorMode the model was built in."""
    from torch.utils.flop_counter import FlopCounterMode

    t, length, weights = recipe.train, recipe.model.max_length, recipe.loss.resolved_weights()
    negatives = recipe.data.negatives_per_query
    texts, generated = step_texts(weights, t.batch_size, negatives)  # the step's own count
    graded = min(texts, t.grad_cache_chunk) if t.grad_cache_chunk else texts  # GradCache: one chunk has a graph at a time
    chunk_rows = min(t.batch_size, t.grad_cache_chunk) if t.grad_cache_chunk else t.batch_size
    generated_graded = min(generated, chunk_rows * (1 + negatives))
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    vocabulary = model.get_output_embeddings().weight.shape[0]
    dtype_bytes = 4  # logits are scored in fp32
    transient = generated_graded * length * vocabulary * dtype_bytes

    def ids(rows: int) -> torch.Tensor:
        return torch.zeros(rows, length, dtype=torch.long, device=device)

    def pass_cost(forward, rows: int, total: int, replayed: bool) -> tuple[float, int]:
        """FLOPs of `total` rows run as chunks of `rows` (one chunk traced, scaled), and the bytes one chunk's
        graph saves. `replayed`: GradCache's extra pass without a graph over every row first. No attention
        mask: every text is at max_length, and building one would ask the data."""
        if not total:
            return 0.0, 0
        counter, saved = FlopCounterMode(display=False), SavedActivations(model.parameters())
        with counter:
            with saved.recording():
                loss = forward(ids(rows), None)
            loss.backward()
        flops = counter.get_total_flops() * total / rows
        if replayed:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                forward(ids(rows), None)
            flops += counter.get_total_flops() * total / rows
        model.zero_grad(set_to_none=True)
        return flops, saved.bytes

    embed_flops, embed_saved = pass_cost(lambda i, m: body(input_ids=i, attention_mask=m).last_hidden_state.float().mean(), graded, texts, bool(t.grad_cache_chunk))
    generate_flops, generate_saved = pass_cost(lambda i, m: model(input_ids=i, attention_mask=m).logits.float().log_softmax(-1).mean(),
                                               generated_graded, generated, False)  # fmt: skip
    reference_flops = 0.0
    if generated and "dpo" in weights and not recipe.loss.reference_free:  # the reference model: a forward without a graph
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(input_ids=ids(2), attention_mask=None)
        reference_flops = counter.get_total_flops() * t.batch_size
    # The generation terms are backpropagated before the embedding pass builds its graph: never both alive.
    return embed_flops + generate_flops + reference_flops, max(embed_saved, generate_saved), transient, (texts + generated) * length


def dry_run(recipe: Recipe, processes: int = 1) -> Budget:
    from torch._subclasses.fake_tensor import FakeTensorMode

    config, config_from = model_config(recipe)
    sources = read_sources(recipe)
    # Fake tensors have shapes and no storage (an 8B model costs nothing), and transformers recognises them as
    # tracing, so it skips the data-dependent checks (padding, packing) that tensors without data cannot answer.
    mode = FakeTensorMode()
    # Every decoder layer is the same: models of 1 and 2 layers are traced and their difference extended to
    # all the layers (exact for identical layers; tracing 32 layers through the counting modes took 10x longer).
    measured = []
    for count in (1, 2):
        small = fake_model(copy.deepcopy(config), recipe, mode, layers=count)
        with mode:
            flops, activations, transient, tokens = trace_step(small, recipe)
        params = list(small.parameters())
        measured.append((sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                         sum(p.numel() * p.element_size() for p in params), flops, activations))  # fmt: skip
    parameters, trainable, parameter_bytes, flops, activations = (
        int(one + (two - one) * (config.num_hidden_layers - 1)) for one, two in zip(*measured)
    )
    budget = Budget(config_from, parameters, trainable, sources)
    weight_bytes = BYTES_PER_ELEMENT[recipe.model.dtype]
    shards = processes if recipe.train.distributed == "fsdp" else 1
    budget.tokens_per_step, budget.flops_per_step = tokens, flops
    budget.memory = {
        "parameters": parameter_bytes // shards,
        "gradients": budget.trainable * weight_bytes // shards,
        "optimizer": 2 * budget.trainable * weight_bytes // shards,  # AdamW's two moments, in the weights' dtype
        "activations": activations,
        "transient": transient,
    }
    return budget


def report(budget: Budget, recipe: Recipe, processes: int) -> str:
    gib = 1024**3
    lines = [f"model config: {budget.config_from}",
             f"parameters: {budget.parameters / 1e9:.3f} B; trainable: {budget.trainable / 1e6:.2f} M ({'LoRA' if recipe.lora.enabled else 'full'})"]  # fmt: skip
    for source in budget.sources:
        lines.append(f"source {source.name}: " + (f"{source.rows} rows after caps" if source.rows is not None else f"not reachable here ({source.problem})"))
    t = recipe.train
    lines.append(f"schedule: {t.steps} steps of {t.batch_size} rows per process x {processes} processes = {t.batch_size * processes} rows per step"
                 + (f", GradCache chunks of {t.grad_cache_chunk}" if t.grad_cache_chunk else ""))  # fmt: skip
    lines.append(f"per process and step (every text at max_length {recipe.model.max_length}): {budget.tokens_per_step} tokens, "
                 f"{budget.flops_per_step / 1e12:.2f} TFLOP; the run: {budget.flops_per_step * processes * t.steps / 1e18:.2f} EFLOP")  # fmt: skip
    sharding = f"sharded over {processes} (fsdp)" if t.distributed == "fsdp" else "whole on each process (ddp)"
    lines.append(f"memory per process, weights {sharding}: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in budget.memory.items())
                 + f"; total {budget.memory_total / gib:.2f} GiB")  # fmt: skip
    return "\n".join(lines)
