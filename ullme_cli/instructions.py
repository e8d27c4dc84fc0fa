"""Per-task query instructions: the shipped table (instructions.yaml), optionally overridden by a user file."""

from __future__ import annotations

from pathlib import Path

import yaml

from ullme_cli.errors import UllmeError

SHIPPED = Path(__file__).with_name("resources") / "instructions.yaml"


def load_instruction_table(override: str | None = None) -> dict[str, dict[str, str]]:
    table = yaml.safe_load(SHIPPED.read_text())
    if override:
        path = Path(override)
        if not path.exists():
            raise UllmeError(f"{override}: file not found")
        try:
            extra = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UllmeError(f"{override}: not valid YAML ({e})") from None
        unknown = set(extra) - {"tasks", "types"}
        if unknown or not all(isinstance(v, dict) for v in extra.values()):
            raise UllmeError(f"{override}: expected mappings 'tasks' and/or 'types' (found {sorted(extra)})")
        for section in ("tasks", "types"):
            table[section] = {**table.get(section, {}), **extra.get(section, {})}
    return table


def instruction_for(table: dict[str, dict[str, str]], task_name: str, task_type: str) -> str:
    """A task's own instruction, else its type's, else none."""
    return table["tasks"].get(task_name) or table["types"].get(task_type) or ""
