"""The setup record: the one declaration of how a text becomes a vector.

`ModelSetup` holds everything that decides a vector: the model source and a fingerprint of its files,
attention, pooling, instructions, template, max_length and normalization. `Runtime` holds what decides
only where and how fast it is computed (dtype, device, trust_remote_code). Recipes, `encode`, the
Embedder (`ullme.json`), embedding meta files and index manifests all carry the same record, and every
place where two outputs meet (resume, join, index --add, search, mine) compares it through the one
agreement check of `ullme_cli/io/agreement.py`.

This module imports nothing heavy, so the CLI and readers of meta files can use it freely.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from ullme_cli.constants import ATTENTION_MODES, BACKENDS, DEFAULT_MODEL, KINDS, POOLINGS
from ullme_cli.dtypes import COMPUTE_CHOICES
from ullme_cli.errors import UllmeError
from ullme_cli.options import check_choices, choice_problems, option, refusal

SETUP_FILE = "ullme.json"
# The version of an Embedder folder's layout, recorded in ullme.json. 1: the first versioned layout. A newer
# folder is refused; keys this version does not know are named in a warning.
SETUP_FORMAT = 1
# An adapter-only folder's base: {"model": a bundled name, hub id or absolute folder, "fingerprint": ...}.
BASE_KEY = "base"
MATRYOSHKA_KEY = "matryoshka_dims"  # the sizes a Matryoshka run trained (None: the full size), for encode's check and the card
ONNX_KEY = "onnx"  # an ONNX export's graph: file, quantization, inputs, dim and the export's own check (models/onnx_export.py writes it, models/onnx_graph.py runs it)
SETUP_FILE_KEYS = ("ullme_format", BASE_KEY, MATRYOSHKA_KEY, ONNX_KEY)


MIN_MAX_LENGTH = 2  # the fewest tokens a text may keep: a setup's and a recipe's max_length alike


@dataclass
class ModelSetup:
    # A bundled name, an absolute model folder or .gguf path, or a hub id.
    model: str = option(DEFAULT_MODEL, "Embedder folder, model folder, .gguf file, bundled name or hub id.", flag="--model")
    # Content hash of the model's files (weights, adapter, tokenizer, config); filled in when loaded.
    fingerprint: str = ""
    attention: str = option("bidirectional", "Attention", ATTENTION_MODES, refusal="unknown attention mode '{value}' (choose from {choices})")
    pooling: str = option("mean", "Pooling", POOLINGS, refusal="unknown pooling '{value}' (choose from {choices})")
    query_instruction: str = ""
    passage_instruction: str = ""
    # e5 / ULLME style; the instruction tokens are masked out of pooling.
    instruction_template: str = "Instruct: {instruction}\nQuery: "
    # Passages' own template; empty: instruction_template. When set, its {instruction} is the passage
    # instruction or, where there is none, the query instruction: the ULLME paper gives both sides the task's.
    passage_template: str = ""
    # GRL scores log p(passage | generation_instruction + query + generation_separator) causally. The
    # separator keeps "hamlet?" and "Shakespeare" apart as a tokenizer would see them in running text.
    generation_instruction: str = ""
    generation_separator: str = "\n"
    max_length: int = option(512, "Truncate texts to this many tokens")  # (the CLI's --max-length keeps the model's unless given)
    padding_side: str = option("right", "Padding side", ("left", "right"), refusal="padding_side must be 'left' or 'right', got '{value}'")
    normalize: bool = True

    def problems(self) -> Iterator[tuple[str, str]]:
        """Each field that cannot make a vector, with why (a recipe names it `model.FIELD`). The one check of a
        setup: `validate` raises the first, recipes (`ModelSection`) report it with the recipe key."""
        yield from choice_problems(self)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < MIN_MAX_LENGTH:
            yield "max_length", f"must be at least {MIN_MAX_LENGTH}, got {self.max_length}"
        for key in ("instruction_template", "passage_template"):
            template = getattr(self, key)
            if (template or key == "instruction_template") and "{instruction}" not in template:
                yield key, "must contain '{instruction}'" + ("" if key == "instruction_template" else " (or be empty: passages use instruction_template)")

    def validate(self) -> "ModelSetup":
        for key, why in self.problems():
            raise refusal(self, key, why)
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSetup":
        """The setup fields of `values` (a meta file, a manifest, ullme.json); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known}).validate()

    def instruction_prefix(self, kind: str, instruction: str | None = None) -> str:
        """What goes before a text of `kind` (query or passage): the template around the instruction
        (`instruction` overrides the setup's for that kind), or nothing where there is no instruction."""
        if kind not in KINDS:
            raise UllmeError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)})")
        if kind == "passage" and self.passage_template:
            instruction = instruction or self.passage_instruction or self.query_instruction
            return self.passage_template.format(instruction=instruction) if instruction else ""
        if instruction is None:
            instruction = self.query_instruction if kind == "query" else self.passage_instruction
        return self.instruction_template.format(instruction=instruction) if instruction else ""

    def record(self) -> dict:
        return asdict(self)

    def vector_record(self, kind: str, instruction: str | None, compute_dtype: str, truncate_dim: int | None) -> dict:
        """What defines the vectors of `kind` made with this setup: the record every meta file, manifest and
        encode job carries, and that the agreement check (io/agreement.py) compares."""
        return {**self.record(), "kind": kind, "instruction": self.instruction_prefix(kind, instruction),
                "compute_dtype": compute_dtype, "truncate_dim": truncate_dim}  # fmt: skip

    def replace(self, **overrides) -> "ModelSetup":
        """A copy with `overrides` applied; None means keep."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()


# Named templates (`model.template` in a recipe): the setup fields each sets, where the recipe leaves them out.
TEMPLATES = {
    # ullme's default: e5's query format; passages bare (no passage instruction).
    "e5": {"instruction_template": "Instruct: {instruction}\nQuery: ", "passage_template": "", "generation_separator": "\n"},
    # The original ULLME (nlp-uoregon/ullme, ULLMECollator): queries "{instruction}\n{text}", candidates
    # "{instruction}\nCandidate:\n{text}" with the task's instruction, and the generation example
    # "{alignment instruction}. Query:\n{query}\n\n{passage}". That collator defines the candidate format but
    # formats passages like queries; its successor GenC (RepLearningCollator) uses a candidate format.
    "ullme-paper": {
        "instruction_template": "{instruction}\n", "passage_template": "{instruction}\nCandidate:\n",
        "generation_instruction": "Please write a passage that can be used to answer above query. Query:\n", "generation_separator": "\n\n",
    },
}  # fmt: skip


@dataclass(frozen=True)
class Runtime:
    """Where and how fast vectors are computed, never what they are. Its fields declare the runtime flags that
    every command loading a model offers (cli.py)."""

    dtype: str = option("auto", "Compute dtype (auto: bf16 where the CPU/GPU runs it fast)", COMPUTE_CHOICES, refusal="unknown dtype '{value}' (choose from {choices})")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, mps, ...")
    trust_remote_code: bool = option(False, "Run model code from the hub. Off unless you ask.")
    # True always, False never, None when compile_policy.py finds it pays
    compile: bool | None = option(None, "Encode through torch.compile, or never. Default: compile where it pays (a bf16 CPU and a job long enough that "
                                        "compiling takes under 10% of it); the log says what was decided.", flag="--compile/--no-compile")  # fmt: skip
    backend: str = option("auto", "auto runs a folder `ullme export --format onnx` wrote in ONNX Runtime, any other in torch", BACKENDS)

    def __post_init__(self):
        check_choices(self)


# The setup fields that every command loading a model by name lets its flags override (None keeps the model's own),
# beside all of Runtime's. Instructions are each command's own (encode's --kind, serve's input_type, evaluate's table).
SETUP_FLAGS = ("pooling", "attention", "max_length")


SETUP_FIELDS = tuple(f.name for f in fields(ModelSetup))


def is_local_path(name: str) -> bool:
    return Path(name).exists() or name.startswith((".", "/", "~"))


def resolve_setup(model: str = DEFAULT_MODEL, **overrides) -> ModelSetup:
    """The setup to load: the saved one of an Embedder folder (or the defaults), with `overrides` applied.

    A local path is made absolute, so a manifest that names it works from any working folder.
    """
    source = str(Path(model).expanduser().resolve()) if is_local_path(model) else model
    saved = Path(source) / SETUP_FILE
    base = ModelSetup(model=source)
    if saved.is_file():
        base = ModelSetup.from_dict({**read_setup_file(saved), "model": source, "fingerprint": ""})
    return base.replace(**overrides)


def read_setup_file(path: Path) -> dict:
    """An Embedder folder's ullme.json: a newer layout is refused, keys this ullme does not know are named.
    One load reads it in several places (the setup, the adapter's base, the Matryoshka sizes); the checks
    and their warning run once per content."""
    return copy.deepcopy(_checked_setup_file(str(path), Path(path).read_bytes()))


@functools.lru_cache(maxsize=16)
def _checked_setup_file(path: str, data: bytes) -> dict:
    from ullme_cli.io.rows import parse_json_object  # --help: cli.py imports this module for its flags; the reader waits

    values = parse_json_object(path, data)
    version = values.get("ullme_format", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > SETUP_FORMAT:
        raise UllmeError(f"{path}: field 'ullme_format' is {version!r}; this ullme reads up to {SETUP_FORMAT}: upgrade ullme to load this model")
    unknown = sorted(set(values) - set(SETUP_FIELDS) - set(SETUP_FILE_KEYS) - {"model", "fingerprint"})
    if unknown:
        logging.getLogger(__name__).warning(f"{path}: ignoring keys this ullme does not know: {', '.join(unknown)}")
    return values
