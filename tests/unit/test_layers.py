"""Imports run one way (docs/design.md §1): a module imports from its own layer or the layers below it,
and no modules import one another around a circle. Read with `ast` from the source, every import
statement counted, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ullme_cli"
# docs/design.md §1, from the bottom up: the first name after `ullme_cli.` decides a module's layer.
LAYERS = [
    ("base", {"constants", "dtypes", "errors", "options", "progress", "io", "fingerprints", "losses"}),
    ("schema", {"model_setup", "encode_options", "mine_options", "retrieval_options", "data", "artifacts", "recipes", "instructions"}),
    ("models", {"models"}),
    ("jobs", {"encoding", "retrieval", "training", "evaluation"}),
    ("serving", {"serving"}),
    ("cli", {"cli", "__main__", ""}),  # "": the package itself (ullme_cli.load)
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    return next(n for n, (_, names) in enumerate(LAYERS) if first in names)


def imports() -> dict[str, set[str]]:
    """Each ullme module's imports of other ullme modules (`from ullme_cli.x import y`, where y is a module
    of x, counts as ullme_cli.x.y)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("ullme_cli")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ullme_cli"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        found[module] = {t for t in targets if t != module}
    return found


def test_every_module_has_a_layer():
    assert all(layer(module) is not None for module in imports())


def test_imports_run_down_the_layers():
    upward = sorted(f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
                    for module, targets in imports().items() for target in targets if layer(target) > layer(module))  # fmt: skip
    assert not upward, "\n".join(upward)


def test_no_modules_import_one_another_around_a_circle():
    graph = imports()
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, circles
