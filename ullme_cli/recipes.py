"""Recipes: one YAML file pins one fine-tuning configuration.

The schema is the dataclasses below. Unknown keys, wrong types and impossible values are errors that
name the key and the file. `--set section.key=value` overrides a value (parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import yaml

from ullme_cli.data import TrainingExample
from ullme_cli.dtypes import AUTOCAST, TRAINING_DTYPES
from ullme_cli.errors import UllmeError
from ullme_cli.io.rows import detect_format
from ullme_cli.losses.table import DPO_LOGPROBS, DPO_VARIANTS, KL_DIRECTIONS, LOSS_TABLE, STRATEGIES, names_needing
from ullme_cli.model_setup import TEMPLATES, ModelSetup

LOSS_COMPONENTS = tuple(LOSS_TABLE)


# ---------------------------------------------------------------- training sources (data.sources)
SOURCE_KEYS = ("path", "max_rows", "weight", "instruction", "generation_instruction", "in_batch_negatives", "stream")
# A jsonl source this large is read as a stream (data.StreamedExamples) unless its `stream` says otherwise.
STREAM_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Source:
    path: str
    max_rows: int | None = None
    weight: float = 1.0
    instruction: str | None = None
    generation_instruction: str | None = None
    in_batch_negatives: bool = True
    stream: bool | None = None  # None: stream a jsonl file of STREAM_BYTES or more

    @property
    def streamed(self) -> bool:
        if self.stream is not None:
            return self.stream
        path = Path(self.path)
        return path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file() and path.stat().st_size >= STREAM_BYTES

    def with_defaults(self, ex: TrainingExample) -> TrainingExample:
        """The source's instructions where the row has none of its own, and its in_batch_negatives."""
        if ex.instruction is None:
            ex.instruction = self.instruction
        if ex.generation_instruction is None:
            ex.generation_instruction = self.generation_instruction
        ex.in_batch_negatives = self.in_batch_negatives
        return ex

    @property
    def name(self) -> str:
        return self.path[3:].split(":")[0] if self.path.startswith("hf:") else Path(self.path).name


def parse_sources(values, where: str) -> list[Source]:
    """`data.sources` as Source records; a bad entry is named `data.sources[i].key`."""
    if not isinstance(values, list) or not values:
        raise UllmeError(f"{where}: 'data.sources' must be a non-empty list of sources")
    sources = []
    for n, entry in enumerate(values):
        key = f"data.sources[{n}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise UllmeError(f"{where}: '{key}' must be a mapping with a path, or a path")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise UllmeError(f"{where}: unknown key '{key}.{unknown[0]}' (known: {', '.join(SOURCE_KEYS)})")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise UllmeError(f"{where}: '{key}.path' must name training data")
        checks = {
            "max_rows": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "weight": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
            "instruction": lambda v: v is None or isinstance(v, str),
            "generation_instruction": lambda v: v is None or isinstance(v, str),
            "in_batch_negatives": lambda v: isinstance(v, bool),
            "stream": lambda v: v is None or isinstance(v, bool),
        }  # fmt: skip
        for name, ok in checks.items():
            if name in entry and not ok(entry[name]):
                raise UllmeError(f"{where}: '{key}.{name}' has an invalid value {entry[name]!r}")
        if entry.get("stream") and (kind := detect_format(entry["path"])) in ("tsv", "text", "csv", "parquet", "dataset"):
            raise UllmeError(f"{where}: '{key}.stream' is true, but streaming reads jsonl files only and {entry['path']} is {kind}; "
                             "drop `stream` (the source is then read into memory) or convert it to jsonl")  # fmt: skip
        sources.append(Source(**{k: entry[k] for k in SOURCE_KEYS if k in entry}))
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        raise UllmeError(f"{where}: two sources share the name '{next(n for n in names if names.count(n) > 1)}'; name each data file once")
    return sources


@dataclass
class ModelSection(ModelSetup):
    """The recipe's model: a ModelSetup (the YAML key `name` is its source, `model`) and the weights' dtype.

    Only the defaults that suit training differ from the setup's own.
    """

    query_instruction: str = "Given a question, retrieve passages that answer the question"
    generation_instruction: str = "Write a passage that answers the question: "
    max_length: int = 128
    dtype: str = "float32"

    def setup(self) -> ModelSetup:
        return ModelSetup.from_dict(dataclasses.asdict(self))

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()  # the setup's own checks, then what only training asks
        if self.dtype not in TRAINING_DTYPES:
            yield "dtype", f"must be {' or '.join(TRAINING_DTYPES)} (training weights)"


@dataclass
class LoraSection:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list = "all-linear"
    merge: bool = False

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.enabled and self.r < 1:
            yield "r", "must be at least 1"
        if self.alpha <= 0:
            yield "alpha", "must be positive"
        if not 0 <= self.dropout < 1:
            yield "dropout", "must be at least 0 and below 1"


@dataclass
class DataSection:
    train: str = ""  # one source; or `sources` (a recipe's `data:` written as a list is its sources)
    sources: list = field(default_factory=list)  # [{path, max_rows, weight, instruction, generation_instruction, in_batch_negatives}]
    negatives_per_query: int = 1
    skip_bad_rows: bool = False

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.train and self.sources:
            yield "train", "and data.sources do not mix: name one file as data.train, or several as data.sources"
        if not self.train and not self.sources:
            yield "train", "must name training data: jsonl, tsv, csv, parquet, a datasets folder or hf:NAME[:SPLIT] (or data.sources)"

    def source_list(self):
        """The sources to train on (training/mixture.py): `sources`, or `train` as the one source."""
        return parse_sources(self.sources, "recipe") if self.sources else [Source(self.train)]


@dataclass
class LossSection:
    strategy: str = "contrastive"
    weights: dict = field(default_factory=dict)  # explicit component weights; empty means the strategy's
    temperature: float = 0.05
    tau_kl: float = 0.1
    tau_gen: float = 1.0
    kl_direction: str = "rt||gen"
    beta: float = 0.1
    dpo_variant: str = "sigmoid"
    dpo_label_smoothing: float = 0.0  # conservative DPO (sigmoid only): the original ULLME and GenC use 0.1
    dpo_logprob: str = "auto"  # sum | mean | auto (mean for ipo, sum for sigmoid and hinge)
    reference_free: bool = False
    mask_probability: float = 0.2
    teacher_temperature: float = 0.05  # τ_t of the distill term: 0.05 suits cosine teacher scores (`mine --teacher`), 1 a cross-encoder's logits
    matryoshka_dims: list = field(default_factory=list)  # e.g. [64, 128, full]: contrastive and distill on each truncated size
    matryoshka_weights: list = field(default_factory=list)  # one per dim; default 1 each

    def matryoshka(self) -> list[int | None]:
        """The trained sizes, `full` as None; empty without Matryoshka."""
        return [None if d == "full" else d for d in self.matryoshka_dims]

    def resolved_weights(self) -> dict[str, float]:
        return {k: float(v) for k, v in (self.weights or STRATEGIES[self.strategy]).items() if float(v) != 0.0}

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.strategy not in STRATEGIES:
            yield "strategy", f"must be one of {', '.join(STRATEGIES)}"
            return
        for component in self.weights:
            if component not in LOSS_TABLE:  # the table itself, so a row added at run time is a component too
                yield f"weights.{component}", f"is not a loss component ({', '.join(LOSS_TABLE)})"
        if self.kl_direction not in KL_DIRECTIONS:
            yield "kl_direction", f"must be '{KL_DIRECTIONS[0]}' (the paper's) or '{KL_DIRECTIONS[1]}'"
        if self.dpo_variant not in DPO_VARIANTS:
            yield "dpo_variant", f"must be {', '.join(DPO_VARIANTS[:-1])} or {DPO_VARIANTS[-1]}"
        if not 0 <= self.dpo_label_smoothing < 0.5:
            yield "dpo_label_smoothing", "must be at least 0 and below 0.5"
        if self.dpo_label_smoothing and self.dpo_variant != "sigmoid":
            yield "dpo_label_smoothing", f"applies to dpo_variant: sigmoid only, not {self.dpo_variant}"
        if self.dpo_logprob not in DPO_LOGPROBS:
            yield "dpo_logprob", f"must be {', '.join(DPO_LOGPROBS[:-1])} or {DPO_LOGPROBS[-1]}"
        dims = self.matryoshka_dims
        if any(not (d == "full" or (isinstance(d, int) and not isinstance(d, bool) and d >= 1)) for d in dims):
            yield "matryoshka_dims", f"must list sizes of at least 1 (or full), got {dims!r}"
        sizes = [d for d in dims if d != "full"]
        if sizes != sorted(set(sizes)) or dims.count("full") > 1:
            yield "matryoshka_dims", f"must be increasing, each size once, got {dims!r}"
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(dims):
            yield "matryoshka_weights", f"needs one weight per dim ({len(dims)}), got {len(self.matryoshka_weights)}"
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0 for w in self.matryoshka_weights):
            yield "matryoshka_weights", f"must be positive numbers, got {self.matryoshka_weights!r}"
        if dims and not any(LOSS_TABLE[name].matryoshka for name in self.resolved_weights()):
            on = [name for name, c in LOSS_TABLE.items() if c.matryoshka]
            yield "matryoshka_dims", f"apply to the {' and '.join(on)} terms, and this recipe has none of them"
        for key in ("temperature", "tau_kl", "tau_gen", "beta", "teacher_temperature"):
            if getattr(self, key) <= 0:
                yield key, "must be positive"
        if not 0 < self.mask_probability < 1:
            yield "mask_probability", "must be between 0 and 1"
        for component, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                yield f"weights.{component}", f"must be a number of at least 0, got {weight!r}"
        if not self.resolved_weights():
            yield "weights", "are all 0: nothing would be trained"


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    grad_cache_chunk: int = 0  # > 0: GradCache with chunks of this many texts, so batch size is free of memory
    batching: str = "auto"  # same-source | mixed | auto (same-source with several data sources)
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast around the forward passes (fp16 with a loss scaler)
    gradient_checkpointing: bool = False  # recompute decoder activations in the backward pass: less memory, ~1/3 more compute
    packing: bool = True  # padding-free batches: each embedding forward packs its texts end to end in rows (same vectors, 1.3-1.6x CPU steps)
    report_to: str = "none"  # none | tensorboard: metrics also to <output_dir>/tensorboard through accelerate's trackers
    distributed: str = "ddp"  # ddp: every process holds the whole model | fsdp: fully_shard per decoder layer (FSDP2)
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights from forward to backward (less communication)
    fsdp_cpu_offload: bool = False  # keep sharded weights, gradients and optimizer state in CPU memory
    fsdp_param_dtype: str = "float32"  # float32 | bfloat16: the dtype weights are gathered and computed in

    def problems(self) -> Iterator[tuple[str, str]]:
        for key in ("weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                yield key, "must be at least 0"
        for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                yield key, "must be at least 1"
        if self.grad_cache_chunk < 0:
            yield "grad_cache_chunk", "must be 0 (off) or a chunk size"
        if self.distributed not in DISTRIBUTED:
            yield "distributed", "must be ddp or fsdp (DeepSpeed is not supported: use fsdp)"
        if self.fsdp_param_dtype not in TRAINING_DTYPES:
            yield "fsdp_param_dtype", f"must be {' or '.join(TRAINING_DTYPES)}"
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            yield "mixed_precision", "fp16 (loss scaling) is not supported with train.distributed: fsdp; use bf16"
        if self.report_to not in REPORT_TO:
            yield "report_to", f"must be one of {', '.join(REPORT_TO)}"
        if self.mixed_precision not in AUTOCAST:
            yield "mixed_precision", f"must be {', '.join(list(AUTOCAST)[:-1])} or {list(AUTOCAST)[-1]}"
        # Upper bounds where torch itself fails: AdamW turns lr (and 1 - lr * weight_decay) into a float32
        # scalar, and a value past float32's range is a RuntimeError there, not a NaN the step guard could name.
        if not 0 < self.learning_rate <= 10:
            yield "learning_rate", f"must be above 0 and at most 10, got {self.learning_rate:g}"
        if self.weight_decay > 10:
            yield "weight_decay", f"must be at most 10, got {self.weight_decay:g}"
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            yield "warmup_steps", f"must be between 0 and train.steps ({self.steps})"
        if self.batching not in BATCHINGS:
            yield "batching", f"must be {', '.join(BATCHINGS[:-1])} or {BATCHINGS[-1]}"


REPORT_TO = ("none", "tensorboard")
BATCHINGS = ("auto", "same-source", "mixed")  # auto: same-source with several data sources (training/mixture.py)
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class EvalSection:
    task_dir: str = ""  # a retrieval set in BEIR layout, evaluated during training
    sts: str = ""  # an STS file (score<TAB>sentence1<TAB>sentence2), its cosine Spearman evaluated during training
    every: int = 0  # steps between evaluations; 0: only after the last step (when task_dir is set)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.every < 0:
            yield "every", "must be 0 (after the last step only) or a step interval"


@dataclass
class Recipe:
    output_dir: str = "runs/finetune"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source: ClassVar[str | None] = None  # the recipe file read (set per instance by load_recipe), an input of finetune

    def problems(self, source: str) -> Iterator[tuple[str, str]]:
        """Each section's own problems, named by their recipe key, then those that span sections."""
        for name in ("model", "loss", "lora", "train", "eval", "data"):
            for key, why in getattr(self, name).problems():
                yield f"{name}.{key}", why
        weights = self.loss.resolved_weights()
        not_cached = [name for name in weights if not LOSS_TABLE[name].grad_cache]
        if self.train.grad_cache_chunk and not_cached:
            covered = ", ".join(name for name, c in LOSS_TABLE.items() if c.grad_cache)
            yield "train.grad_cache_chunk", f"GradCache covers {covered}, not {' or '.join(not_cached)}"
        if self.train.distributed == "fsdp":
            for key in ("task_dir", "sts"):
                if getattr(self.eval, key):
                    yield f"eval.{key}", "is not run under train.distributed: fsdp yet; evaluate the final model with `ullme evaluate`"
        needing = names_needing("negatives")
        if needing & set(weights) and self.data.negatives_per_query < 1:
            yield "data.negatives_per_query", f"must be at least 1 for {', '.join(sorted(needing))}"
        sources = parse_sources(self.data.sources, source) if self.data.sources else []  # refuses a bad source itself
        if self.train.batching == "mixed" and any(s.weight != 1 for s in sources):
            yield "train.batching", "mixed does not apply source weights (every row of every source in one shuffle); use same-source"
        if "dpo" in weights and not self.lora.enabled and not self.loss.reference_free:
            yield "loss.reference_free", "must be true for DPO without LoRA (the reference is the model with adapters off)"

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        model = values["model"]
        values["model"] = {"name": model.pop("model"), **{k: v for k, v in model.items() if k != "fingerprint"}}
        return values


def _check_type(value, annotation, where: str):
    allowed = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}
    options = [a.strip() for a in annotation.split("|")]
    for option in options:
        kind = allowed.get(option.split("[")[0], list if option.startswith("list") else None)
        if kind is None:
            continue
        if isinstance(value, bool) and option != "bool":
            continue
        if isinstance(value, kind):
            return float(value) if option == "float" else value
    raise UllmeError(f"{where}: expected {annotation}, got {type(value).__name__} {value!r}")


def _refuse_non_finite(value, source: str, key: str) -> None:
    """Every number a recipe holds, however deep (weights, Matryoshka weights, a source's weight), is finite:
    a NaN slips past every range check (all its comparisons are false) and an infinity trains to NaN weights."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UllmeError(f"{source}: '{key}': must be a finite number, got {value}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        _refuse_non_finite(item, source, f"{key}[{name}]" if isinstance(value, list) else f"{key}.{name}")


def _build(cls, values: dict, source: str, prefix: str = ""):
    if not isinstance(values, dict):
        raise UllmeError(f"{source}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is ModelSection:  # the YAML spells the source `name`; the fingerprint is computed, never set
        fields.pop("fingerprint")
        fields["name"] = fields.pop("model")
        values = dict(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UllmeError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        f = fields[name]
        nested = {"ModelSection": ModelSection, "LoraSection": LoraSection, "DataSection": DataSection,
                  "LossSection": LossSection, "TrainSection": TrainSection, "EvalSection": EvalSection}.get(str(f.type))  # fmt: skip
        if nested is not None:
            kwargs[name] = _build(nested, value or {}, source, f"{prefix}{name}.")
        else:
            _refuse_non_finite(value, source, f"{prefix}{name}")
            kwargs[name] = _check_type(value, str(f.type), f"{source}: '{prefix}{name}'")
    if cls is ModelSection and "name" in kwargs:
        kwargs["model"] = kwargs.pop("name")
    return cls(**kwargs)


def _validate(recipe: Recipe, source: str) -> Recipe:
    """Each section checks its own fields (`problems`); the recipe checks what spans sections. The first
    problem is the error, named by its recipe key."""
    for key, why in recipe.problems(source):
        raise UllmeError(f"{source}: '{key}' {why}")
    return recipe


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's booleans: only true/false. YAML 1.1 also reads yes/no/on/off as
    booleans, so the documented `mixed_precision: no` arrived as False ("expected str, got bool")."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's core schema for numbers: `1e-3` is a float (YAML 1.1, PyYAML's default, wants `1.0e-3` and read
# it as a string), and 1.1's sexagesimal `1:30`, `0b1` and `1_000` are strings, as YAML 1.2 reads them.
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in RecipeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def _construct_int(loader, node):
    """YAML 1.2 integers: decimal, 0o octal, 0x hex (PyYAML's own reads 1.1's forms, and `010` as octal)."""
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def _construct_float(loader, node):
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def read_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass: no tags that run code


def apply_overrides(values: dict, overrides: list[str], source: str) -> dict:
    for item in overrides:
        if "=" not in item:
            raise UllmeError(f"--set expects section.key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = read_yaml(raw)
        except yaml.YAMLError:
            value = raw
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UllmeError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = value
    return values


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Relative data paths are taken relative to the recipe file."""
    p = Path(path)
    if not p.exists():
        raise UllmeError(f"{path}: file not found")
    if p.is_dir():
        raise UllmeError(f"{path}: is a folder, expected a recipe YAML file")
    try:
        values = read_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UllmeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UllmeError(f"{path}: not a text file (not valid UTF-8)") from None
    if not isinstance(values, dict):
        raise UllmeError(f"{path}: a recipe is a mapping of sections (output_dir, model, lora, data, loss, train, eval), got a {type(values).__name__}")
    if isinstance(values.get("data"), list):  # `data:` as a list of sources
        values["data"] = {"sources": values["data"]}
    values = apply_overrides(values, overrides or [], path)
    if isinstance(values.get("model"), dict) and "template" in values["model"]:
        values["model"] = with_template(values["model"], path)
    recipe = _validate(_build(Recipe, values, path), path)
    recipe.data.train = _relative_to_recipe(recipe.data.train, p)
    recipe.data.sources = [{**entry, "path": _relative_to_recipe(entry["path"], p)} if isinstance(entry, dict) and isinstance(entry.get("path"), str)
                           else _relative_to_recipe(entry, p) if isinstance(entry, str) else entry for entry in recipe.data.sources]  # fmt: skip
    recipe.eval.task_dir = _relative_to_recipe(recipe.eval.task_dir, p)
    recipe.eval.sts = _relative_to_recipe(recipe.eval.sts, p)
    recipe.source = str(p)
    return recipe


def with_template(model: dict, source: str) -> dict:
    """The recipe's `model:` with its named `template` expanded (model_setup.TEMPLATES): the template's
    fields, then the recipe's own, which win."""
    name = model["template"]
    if name not in TEMPLATES:
        raise UllmeError(f"{source}: 'model.template' must be one of {', '.join(TEMPLATES)}, got {name!r}")
    return {**TEMPLATES[name], **{k: v for k, v in model.items() if k != "template"}}


def _relative_to_recipe(value: str, recipe_path: Path) -> str:
    """A relative path that does not exist from here is looked up next to the recipe file."""
    if value and not Path(value).is_absolute() and not Path(value).exists():
        candidate = recipe_path.parent / value
        if candidate.exists():
            return str(candidate)
    return value


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
