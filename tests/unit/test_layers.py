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
    ("schema", {"model_setup", "encode_options", "mine_options", "retrieval_options", "export_options", "data", "artifacts", "recipes", "instructions"}),
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


# What may wait inside a function: libraries slow to import (torch and what stands on it, mteb, faiss, numpy) and
# those only an extra installs (serve, plot, onnx, gguf, tensorboard). Naming the library is the deferral's reason.
DEFERRABLE = {
    "torch", "transformers", "peft", "accelerate", "mteb", "faiss", "datasets", "numpy", "safetensors", "huggingface_hub",
    "tokenizers", "sentence_transformers", "pyarrow", "pandas", "scipy", "sklearn",  # slow to import
    "fastapi", "uvicorn", "starlette", "prometheus_client", "matplotlib", "onnxruntime", "onnx", "onnxscript", "optimum",
    "gguf", "llama_cpp", "tensorboard",  # extras
}  # fmt: skip


def import_statements(path: Path, modules: dict) -> tuple[set[str], list[tuple[int, set[str], str]]]:
    """A file's imports at its top (module level, also under if/try) and, with their lines and source text, those
    inside functions."""
    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        return set() if node.level else {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}

    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, str(path))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    top, deferred = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if id(node) in inside:
                deferred.append((node.lineno, targets(node), lines[node.lineno - 1]))
            else:
                top |= targets(node)
    return top, deferred


def test_an_import_inside_a_function_defers_a_heavy_library():
    """An import waits inside a function only for a DEFERRABLE library, itself or through the ullme module it names
    (at that module's top, however deep), or to keep `ullme --help` fast, said on its line (`# --help: why`);
    anything else sits at the top of its file, so a reader can tell a deliberate deferral from a habit. Nor does
    a function import again what its file's top already imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    statements = {m: import_statements(p, modules) for m, p in modules.items()}
    heavy: dict[str, bool] = {}

    def is_heavy(module: str, seen: frozenset = frozenset()) -> bool:
        if not module.startswith("ullme_cli"):
            return module.split(".")[0] in DEFERRABLE
        if module not in heavy:
            if module in seen or module not in statements:
                return False
            heavy[module] = any(is_heavy(t, seen | {module}) for t in statements[module][0])
        return heavy[module]

    habits, again = [], []
    for module, (top, deferred) in statements.items():
        for line, targets, source in deferred:
            if not any(is_heavy(t) for t in targets) and "# --help: " not in source:
                habits.append(f"{modules[module].name}:{line} imports {', '.join(sorted(targets))}")
            if targets & top - {"ullme_cli"}:
                again.append(f"{modules[module].name}:{line} imports {', '.join(sorted(targets & top))} again")
    assert not habits, "light imports inside functions (move them to the top):\n" + "\n".join(habits)
    assert not again, "\n".join(again)
