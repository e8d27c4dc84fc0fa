"""A CLI default is its dataclass field's default (the field is the one declaration): where the CLI cannot
import the dataclass without slowing `--help` it types the value again, and this test holds the two equal."""

from __future__ import annotations

import dataclasses

import pytest
from typer.main import get_command

from ullme_cli.cli import app
from ullme_cli.encoding import EncodeOptions
from ullme_cli.mine_options import MiningOptions
from ullme_cli.model_setup import Runtime
from ullme_cli.serving.limits import Limits

COMMANDS = get_command(app).commands


def defaults(command: str) -> dict:
    return {param.name: param.default for param in COMMANDS[command].params}


@pytest.mark.parametrize("command, fields, scale", [
    ("encode", EncodeOptions, {}),
    ("mine", MiningOptions, {}),
    ("serve", Limits, {"max_wait_ms": ("max_wait", 1000), "max_request_mb": ("max_request_bytes", 2**-20)}),
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


@pytest.mark.parametrize("command", ["encode", "serve", "search", "mine", "evaluate"])
def test_the_runtime_flags_default_to_the_runtime_defaults(command):
    given, runtime = defaults(command), Runtime()
    for name in ("dtype", "device", "trust_remote_code", "backend"):
        if name in given:
            assert given[name] == getattr(runtime, name), (command, name)


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
