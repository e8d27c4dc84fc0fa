"""An option declared once: its default, its allowed values and its help live in one dataclass field (as peft
and Tevatron declare theirs). The CLI derives its flags from the fields (cli.py `field_option`), and a
section's `validate` checks the choices the fields name (`check_choices`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

from ullme_cli.errors import UllmeError


MUST_BE = "{flag} must be one of {choices}, got '{value}'"
UNKNOWN = "unknown {flag} '{value}' (choose from {choices})"


def option(default: Any, help: str, choices: Sequence[str] | None = None, flag: str | None = None, refusal: str = MUST_BE) -> Any:
    """A dataclass field with its CLI help, its allowed values, its flag (default: --name-with-dashes) and the
    refusal of a value outside them."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "refusal": refusal}
    return dataclasses.field(default=default, metadata=metadata)


def field_of(section, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(section) if f.name == name)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def outside_choices(section, field: dataclasses.Field) -> bool:
    """The field declares choices and holds another value. None is a value of a field typed `X | None` (not given,
    or its own meaning there: search's aggregate None returns chunks), never of a plain `str` field."""
    choices, value = field.metadata.get("choices"), getattr(section, field.name)
    return bool(choices) and value not in choices and not (value is None and "None" in str(field.type))


def choice_problems(section) -> Iterator[tuple[str, str]]:
    """Each field whose value is outside its declared choices, with why (as a recipe reports it)."""
    for field in dataclasses.fields(section):
        if outside_choices(section, field):
            yield field.name, f"must be one of {', '.join(field.metadata['choices'])}"


def refusal(section, name: str, why: str) -> UllmeError:
    """The error for field `name`'s problem `why`: a choice field's declared refusal (naming the flag, the value and
    the choices), else `NAME WHY`."""
    field = field_of(section, name)
    if not outside_choices(section, field):
        return UllmeError(f"{name} {why}")
    return UllmeError(field.metadata["refusal"].format(flag=flag_of(field), choices=", ".join(field.metadata["choices"]), value=getattr(section, name)))


def check_choices(section) -> None:
    """Refuse a value outside its field's choices, naming the flag and the choices."""
    for name, why in choice_problems(section):
        raise refusal(section, name, why)
