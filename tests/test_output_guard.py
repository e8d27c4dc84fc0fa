"""The one output guard (ullme_cli/io/outputs.py), command by command, through the real CLI.

Every writer meets the same cases: the output is an input, lies inside one, is a symlink to one, exists
(without --overwrite), is a folder of the user's files (with --overwrite), or sits behind a symlinked folder.
A refusal must be one line with exit 2, and leave every input and the output as they were: bytes, modes,
symlinks and folder listings. A write through a symlinked folder must succeed, land where the link points,
and keep the link.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import RESOURCES, run_cli

from ullme_cli.cli import app


def state(*folders: Path) -> dict:
    """Every entry below `folders`: a link's target, a file's digest and mode, a folder's mode."""
    entries = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.name.endswith(".lock"):
                continue
            if p.is_symlink():
                entries[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                entries[str(p)] = ("dir", oct(p.stat().st_mode))
            else:
                entries[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), oct(p.stat().st_mode))
    return entries


@pytest.fixture(scope="module")
def shared(artefacts) -> Path:
    return artefacts  # conftest.py: the model, corpora, embeddings, index, adapter and run every case points at


def link(name: str, target: str):
    def prepare(d: Path, s: Path) -> None:
        (d / name).symlink_to(target.format(d=d, s=s))

    return prepare


def copy(source: str, name: str, extra: dict | None = None):
    def prepare(d: Path, s: Path) -> None:
        src = s / source
        shutil.copytree(src, d / name) if src.is_dir() else shutil.copy(src, d / name)
        for relative, content in (extra or {}).items():
            (d / name / relative).parent.mkdir(parents=True, exist_ok=True)
            (d / name / relative).write_text(content)

    return prepare


def steps(*prepares):
    def prepare(d: Path, s: Path) -> None:
        for p in prepares:
            p(d, s)

    return prepare


def write(name: str, content: str = "mine"):
    def prepare(d: Path, s: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(content)

    return prepare


def recipe(output_dir: str, at: str = "recipe.yaml", data: str = "{s}/train.jsonl", model: str = "{s}/model"):
    def prepare(d: Path, s: Path) -> None:
        import yaml

        values = {"output_dir": output_dir.format(d=d, s=s), "model": {"name": model.format(d=d, s=s), "max_length": 64},
                  "data": {"train": data.format(d=d, s=s)}, "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0}}  # fmt: skip
        (d / at).parent.mkdir(parents=True, exist_ok=True)
        (d / at).write_text(yaml.safe_dump(values))

    return prepare


def nothing(d: Path, s: Path) -> None:
    pass


ENCODE = ["encode", "{s}/corpus.jsonl", "-m", "{s}/model", "-q"]
SEARCH = ["search", "{s}/idx", "{s}/queries.jsonl", "-q"]
MINE = ["mine", "{s}/train.jsonl", "--corpus", "{s}/corpus.jsonl", "-m", "{s}/model", "--negatives", "2", "--range", "0:", "-q"]
# (command, case, arguments, preparation, expected: a refusal's text, or None for success)
CASES = [
    ("encode", "output-is-input", ["encode", "{d}/c.jsonl", "-o", "{d}/c.jsonl", "-m", "{s}/model"], copy("corpus.jsonl", "c.jsonl"), "is the input"),
    ("encode", "output-inside-model", [*ENCODE, "-o", "{s}/model/e.npy"], nothing, "lies inside the input"),
    ("encode", "output-inside-save-to-disk", ["encode", "{s}/ds", "-m", "{s}/model", "-o", "{s}/ds/e.npy"], nothing, "lies inside the input"),
    ("encode", "output-inside-local-hf", ["encode", "hf:{s}/ds", "-m", "{s}/model", "-o", "{s}/ds/data-00000-of-00001.arrow", "--overwrite"], nothing, "lies inside the input"),
    ("encode", "output-links-to-input", [*ENCODE, "-o", "{d}/l.npy", "--overwrite"], link("l.npy", "{s}/corpus.jsonl"), "is the input"),
    ("encode", "output-exists", [*ENCODE, "-o", "{d}/e.npy"], write("e.npy"), "exists already; pass --overwrite"),
    ("encode", "output-hard-links-to-input", [*ENCODE, "-o", "{d}/h.npy", "--overwrite"], lambda d, s: os.link(s / "corpus.jsonl", d / "h.npy"), "is the input"),
    ("encode", "output-inside-adapters-base", ["encode", "{s}/corpus.jsonl", "-m", "{s}/adapter", "-o", "{s}/model/e.npy"], nothing, "lies inside the input"),
    ("encode", "output-folder-is-a-link", [*ENCODE, "-o", "{d}/ln/e.npy"], steps(write("real/keep.txt"), link("ln", "{d}/real")), None),
    ("join", "output-is-a-shard", ["join", "{s}/s0.npy", "{s}/s1.npy", "-o", "{s}/s0.npy", "--overwrite"], nothing, "is the input"),
    ("join", "output-is-a-shard-sidecar", ["join", "{s}/s0.npy", "{s}/s1.npy", "-o", "{d}/l.npy", "--overwrite"], link("l.ids.jsonl", "{s}/s1.ids.jsonl"), "is the input"),
    ("join", "output-exists", ["join", "{s}/s0.npy", "{s}/s1.npy", "-o", "{d}/j.npy"], write("j.meta.json"), "exists already"),
    ("join", "output-folder-is-a-link", ["join", "{s}/s0.npy", "{s}/s1.npy", "-o", "{d}/ln/j.npy"], steps(write("real/keep.txt"), link("ln", "{d}/real")), None),
    ("index", "trained-from-is-output", ["index", "{s}/emb.npy", "-o", "{d}/idx", "--trained-from", "{d}/idx", "--overwrite"], copy("idx", "idx"), "is the input"),
    ("index", "output-inside-trained-from", ["index", "{s}/emb.npy", "-o", "{s}/idx/sub", "--trained-from", "{s}/idx"], nothing, "lies inside the input"),
    ("index", "output-links-to-trained-from", ["index", "{s}/emb.npy", "-o", "{d}/ln", "--trained-from", "{s}/idx", "--overwrite"], link("ln", "{s}/idx"), "is the input"),
    ("index", "output-is-embeddings-sidecar", ["index", "{s}/emb.npy", "-o", "{s}/emb.ids.jsonl"], nothing, "is the input"),
    ("index", "output-exists", ["index", "{s}/emb.npy", "-o", "{d}/idx"], copy("idx", "idx"), "an index exists here already"),
    ("index", "overwrite-user-files", ["index", "{s}/emb.npy", "-o", "{d}/idx", "--overwrite"], copy("idx", "idx", {"notes.txt": "mine"}), "did not write (notes.txt)"),
    ("index", "add-user-files", ["index", "{s}/emb2.npy", "-o", "{d}/idx", "--add"], copy("idx", "idx", {"notes.txt": "mine"}), "did not write (notes.txt)"),
    ("index", "overwrite-plain-folder", ["index", "{s}/emb.npy", "-o", "{d}/mine", "--overwrite"], write("mine/x.txt"), "has no .ullme-files record"),
    ("index", "overwrite-older-ullme-index", ["index", "{s}/emb.npy", "-o", "{d}/idx", "--overwrite"], steps(copy("idx", "idx"), lambda d, s: (d / "idx" / ".ullme-files").unlink()),
     "an older ullme's folder"),
    ("index", "output-folder-is-a-link", ["index", "{s}/emb.npy", "-o", "{d}/ln"], link("ln", "{d}/real"), None),
    ("index", "add-through-a-link", ["index", "{s}/emb2.npy", "-o", "{d}/ln", "--add"], steps(copy("idx", "real"), link("ln", "{d}/real")), None),
    ("search", "output-inside-index", [*SEARCH, "-o", "{s}/idx/ids.jsonl", "--overwrite"], nothing, "lies inside the input"),
    ("search", "output-is-queries", [*SEARCH, "-o", "{s}/queries.jsonl", "--overwrite"], nothing, "is the input"),
    ("search", "output-links-into-index", [*SEARCH, "-o", "{d}/l.jsonl", "--overwrite"], link("l.jsonl", "{s}/idx/ids.jsonl"), "lies inside the input"),
    ("search", "output-is-embeddings-sidecar", ["search", "{s}/idx", "--embeddings", "{s}/emb.npy", "-o", "{s}/emb.meta.json", "--overwrite"], nothing, "is the input"),
    ("search", "output-exists", [*SEARCH, "-o", "{d}/r.jsonl"], write("r.jsonl"), "exists already"),
    ("search", "output-inside-the-indexs-model", [*SEARCH, "-o", "{s}/model/r.jsonl"], nothing, "lies inside the input"),
    ("search", "output-folder-is-a-link", [*SEARCH, "-o", "{d}/ln/r.jsonl"], steps(write("real/keep.txt"), link("ln", "{d}/real")), None),
    ("mine", "output-is-training", [*MINE, "-o", "{s}/train.jsonl", "--overwrite"], nothing, "is the input"),
    ("mine", "output-inside-model", [*MINE, "-o", "{s}/model/m.jsonl"], nothing, "lies inside the input"),
    ("mine", "output-links-to-corpus", [*MINE, "-o", "{d}/l.jsonl", "--overwrite"], link("l.jsonl", "{s}/corpus.jsonl"), "is the input"),
    ("mine", "output-exists", [*MINE, "-o", "{d}/m.jsonl"], write("m.jsonl"), "exists already"),
    ("mine", "output-folder-is-a-link", [*MINE, "-o", "{d}/ln/m.jsonl"], steps(write("real/keep.txt"), link("ln", "{d}/real")), None),
    ("export", "output-is-input", ["export", "{d}/m", "-o", "{d}/m", "--overwrite"], copy("model", "m"), "is the input"),
    ("export", "output-inside-model", ["export", "{s}/model", "-o", "{s}/model/exported"], nothing, "lies inside the input"),
    ("export", "output-links-to-model", ["export", "{s}/model", "-o", "{d}/ln", "--overwrite"], link("ln", "{s}/model"), "is the input"),
    ("export", "output-exists", ["export", "{s}/model", "-o", "{d}/out"], write("out/x.txt"), "exists already"),
    ("export", "output-inside-adapters-base", ["export", "{s}/adapter", "-o", "{s}/model/exported"], nothing, "lies inside the input"),
    ("export", "overwrite-user-files", ["export", "{s}/model", "-o", "{d}/out", "--overwrite"], copy("model", "out", {"notes.txt": "mine", "eval-results/a.json": "{}"}), "--overwrite replaces only"),
    ("export", "output-folder-is-a-link", ["export", "{s}/model", "-o", "{d}/ln"], link("ln", "{d}/real"), None),
    ("finetune", "output-holds-the-recipe", ["finetune", "{d}/run/recipe.yaml"], recipe("{d}/run", at="run/recipe.yaml"), "holds the input"),
    ("finetune", "output-holds-the-data", ["finetune", "{d}/recipe.yaml"], steps(copy("train.jsonl", "t.jsonl"), recipe("{d}", data="{d}/t.jsonl")), "holds the input"),
    ("finetune", "output-inside-model", ["finetune", "{d}/recipe.yaml"], recipe("{s}/model/run"), "lies inside the input"),
    ("finetune", "output-is-a-file", ["finetune", "{d}/recipe.yaml"], steps(write("out"), recipe("{d}/out")), "is a file; expected a folder"),
    ("plot", "output-is-metrics", ["plot", "{s}/run", "-o", "{s}/run/metrics.jsonl", "--overwrite"], nothing, "is the input"),
    ("plot", "output-links-to-metrics", ["plot", "{s}/run", "-o", "{d}/l.png", "--overwrite"], link("l.png", "{s}/run/metrics.jsonl"), "is the input"),
    ("plot", "output-exists", ["plot", "{s}/run", "-o", "{d}/c.png"], write("c.png"), "exists already"),
    ("plot", "output-folder-is-a-link", ["plot", "{s}/run", "-o", "{d}/ln/c.png"], steps(write("real/keep.txt"), link("ln", "{d}/real")), None),
    ("evaluate", "output-inside-model", ["evaluate", "-m", "{s}/model", "--task-dir", "{d}/t", "--output-dir", "{s}/model/results"], copy("../trecqa", "t"), "lies inside the input"),
    ("evaluate", "output-inside-task", ["evaluate", "-m", "{s}/model", "--task-dir", "{d}/t", "--output-dir", "{d}/t/results"], copy("../trecqa", "t"), "lies inside the input"),
]


@pytest.fixture(scope="module")
def places(shared) -> Path:
    # the bundled TREC QA test set, beside the shared folder, so that cases can copy it
    target = shared.parent / "trecqa"
    if not target.exists():
        shutil.copytree(RESOURCES / "trecqa-test", target)
    return shared


@pytest.mark.parametrize("command, case, args, prepare, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_writer_meets_the_output_guard(places, tmp_path, command, case, args, prepare, expected):
    shared = places
    prepare(tmp_path, shared)
    before_shared, before_here = state(shared), state(tmp_path)
    result = run_cli(*[a.format(s=shared, d=tmp_path) for a in args])
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert state(shared) == before_shared, "an input changed"
    if expected is not None:
        lines = stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], stderr
        assert state(tmp_path) == before_here, "a refused command changed files"
        return
    assert result.returncode == 0, stderr
    assert (tmp_path / "ln").is_symlink(), "the symlinked folder was replaced by a real one"
    assert not list(tmp_path.glob(".*old*")) and not list(tmp_path.glob(".*staging*")), "leftovers"
    real = tmp_path / "real"
    assert real.is_dir() and any(p.name != "keep.txt" for p in real.iterdir()), "nothing written where the link points"
    if (before_here.get(str(real / "keep.txt"))) is not None:
        assert (real / "keep.txt").read_text() == "mine"


# Commands that write no file: they take no output option at all (checked below), so nothing to guard.
WRITES_NOTHING = {"serve"}


def test_every_command_has_guard_rows():
    """A new command that writes must join this table (read from the Typer app, not a list kept by hand)."""
    import inspect

    commands = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    assert set(commands) - WRITES_NOTHING <= {c[0] for c in CASES}, sorted(set(commands) - WRITES_NOTHING - {c[0] for c in CASES})
    for name in WRITES_NOTHING:
        assert not {"output", "output_dir", "overwrite"} & set(inspect.signature(commands[name]).parameters), f"{name} writes: give it guard rows"


def test_an_unset_input_is_not_the_working_folder(tmp_path, monkeypatch):
    """A recipe's empty eval.task_dir is no input: an output_dir under the working folder is fine (it was
    refused as lying inside the input '', which resolved to the working folder)."""
    from ullme_cli.errors import UllmeError
    from ullme_cli.io.outputs import guard_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    guard_output([tmp_path / "runs" / "a"], ["", None, str(tmp_path / "train.jsonl")], folder=True, exists_ok=True)
    with pytest.raises(UllmeError, match="inside the input"):
        guard_output([tmp_path / "runs" / "a"], [str(tmp_path)], folder=True, exists_ok=True)
