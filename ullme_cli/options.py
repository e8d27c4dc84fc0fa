"""An option declared once: its default, its allowed values and its help live in one dataclass field (as peft
and Tevatron declare theirs). The CLI derives its flags from the fields (cli.py `field_option`), and a
section's `validate` checks the choices the fields name (`check_choices`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ullme_cli.errors import UllmeError


MUST_BE = "{flag} must be one of {choices}, got '{value}'"
UNKNOWN = "unknown {flag} '{value}' (choose from {choices})"


def option(default: Any, help: str, choices: Sequence[str] | None = None, flag: str | None = None, refusal: str = MUST_BE) -> Any:
    """A dataclass field with its CLI help, its allowed values, its flag (default: --name-with-dashes) and the
    refusal of a value outside them."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "refusal": refusal}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def check_choices(section) -> None:
    """Refuse a value outside its field's choices, naming the flag and the choices."""
    for field in dataclasses.fields(section):
        choices = field.metadata.get("choices")
        value = getattr(section, field.name)
        if choices and value not in choices:
            raise UllmeError(field.metadata["refusal"].format(flag=flag_of(field), choices=", ".join(choices), value=value))
