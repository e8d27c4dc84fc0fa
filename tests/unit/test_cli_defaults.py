"""A CLI default is its dataclass field's default (the field is the one declaration): where the CLI cannot
import the dataclass without slowing `--help` it types the value again, and this test holds the two equal."""

from __future__ import annotations

import dataclasses

import pytest
from typer.main import get_command

from ullme_cli.cli import app
from ullme_cli.encoding import EncodeOptions
from ullme_cli.export_options import ExportOptions
from ullme_cli.mine_options import MiningOptions
from ullme_cli.model_setup import SETUP_FLAGS, ModelSetup, Runtime
from ullme_cli.retrieval_options import IndexOptions, SearchOptions
from ullme_cli.serving.limits import Limits

COMMANDS = get_command(app).commands


def defaults(command: str) -> dict:
    return {param.name: param.default for param in COMMANDS[command].params}


@pytest.mark.parametrize("command, fields, scale", [
    ("encode", EncodeOptions, {}),
    ("mine", MiningOptions, {}),
    ("serve", Limits, {"max_wait_ms": ("max_wait", 1000), "max_request_mb": ("max_request_bytes", 2**-20)}),
    ("index", IndexOptions, {}),
    ("export", ExportOptions, {}),
    ("search", SearchOptions, {"fmt": ("format", 1)}),
])  # fmt: skip
def test_cli_defaults_equal_the_dataclass_defaults(command, fields, scale):
    values = {f.name: f.default for f in dataclasses.fields(fields)}
    given = defaults(command)
    compared = 0
    for name, default in given.items():
        field, factor = scale.get(name, (name, 1))
        if field in values:
            assert default == values[field] * factor if factor != 1 else default == values[field], (command, name, default, values[field])
            compared += 1
    assert compared >= 3, (command, compared)


RUNTIME_FLAGS = [f.name for f in dataclasses.fields(Runtime)]


@pytest.mark.parametrize("command", ["encode", "serve", "search", "mine", "evaluate"])
def test_the_runtime_flags_default_to_the_runtime_defaults(command):
    given, runtime = defaults(command), Runtime()
    for name in RUNTIME_FLAGS:
        assert given[name] == getattr(runtime, name), (command, name)


@pytest.mark.parametrize("command", ["serve", "search", "mine", "evaluate"])
def test_every_command_that_loads_a_model_offers_the_same_setup_flags(command):
    """The setup flags are declared once (ModelSetup's and Runtime's fields): each command that loads a model by
    name offers all of them, spelled, defaulted and explained as `encode` does; `search` the runtime ones, since
    its setup is the index's."""
    params, reference = {p.name: p for p in COMMANDS[command].params}, {p.name: p for p in COMMANDS["encode"].params}
    for name in RUNTIME_FLAGS + ([] if command == "search" else ["model", *SETUP_FLAGS]):
        assert name in params, (command, name)
        ours, theirs = params[name], reference[name]
        assert (ours.default, getattr(ours, "help", None)) == (theirs.default, theirs.help), (command, name)
        if ours.param_type_name == "option":  # serve takes MODEL as its argument
            assert ours.opts == theirs.opts and ours.secondary_opts == theirs.secondary_opts, (command, name)


def test_a_setup_flag_keeps_the_models_value_and_names_the_fallback():
    """--pooling and the like default to None (the folder's own setup); their help names the field's default."""
    given = {p.name: p for p in COMMANDS["encode"].params}
    for name in SETUP_FLAGS:
        assert given[name].default is None
        assert f"else {getattr(ModelSetup, name)})" in given[name].help, name


def test_ullme_load_takes_the_parameters_of_embedder_load():
    """One Python entry point: `ullme.load` offers what `Embedder.load` does, with the same defaults."""
    import inspect

    import ullme_cli
    from ullme_cli.models.embedder import Embedder

    ours = inspect.signature(ullme_cli.load).parameters
    theirs = inspect.signature(Embedder.load).parameters
    named = lambda params: {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}  # noqa: E731
    assert named(ours) == named(theirs)
    assert list(ours.values())[0].default == list(theirs.values())[0].default, "the same default model"


def test_the_loss_classes_and_add_lora_default_to_the_recipe_defaults():
    """A recipe's loss and lora sections are the declaration a run uses; the classes' own defaults (for Python
    callers) must not drift from them: each table row's class, for every recipe parameter it takes, and
    `Embedder.add_lora`."""
    import importlib
    import inspect

    from ullme_cli.losses.table import LOSS_TABLE
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.recipes import LoraSection, LossSection

    compared = 0
    for component in LOSS_TABLE.values():
        module, cls = component.loss_class.split(":")
        module = module if "." in module else f"ullme_cli.losses.{module}"
        params = list(inspect.signature(getattr(importlib.import_module(module), cls)).parameters.values())
        for param, field in zip(params, component.arguments):  # the table passes the fields in order
            if param.default is not inspect.Parameter.empty:
                assert param.default == getattr(LossSection, field), (component.name, param.name, field)
                compared += 1
    assert compared >= 8
    lora = inspect.signature(Embedder.add_lora).parameters
    for name in ("r", "alpha", "dropout", "target_modules"):
        assert lora[name].default == getattr(LoraSection, name), name
