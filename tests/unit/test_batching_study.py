"""scripts/batching_study.py's pieces that decide what an arm trains on: the same-source arm gets the mixed
arm's rows as three sources weighted by their row counts, and mined rows are reused only when they were
mined from the same rows, teacher and settings."""

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import batching_study  # noqa: E402

from ullme_cli.recipes import load_recipe  # noqa: E402


def test_same_source_arm_trains_on_the_mixed_rows_as_weighted_sources(tmp_path):
    for name, count in (("trecqa", 2), ("sick", 3), ("msrp", 1)):
        (tmp_path / f"train-{name}.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "positive": [f"p{i}"]}) + "\n" for i in range(count)))
    recipe = load_recipe(str(REPO / "recipes" / "multitask" / "contrastive.yaml"), batching_study.data_overrides("contrastive, same-source", tmp_path, None)[1::2])
    sources = recipe.data.source_list()
    assert [(s.path, s.weight) for s in sources] == [(str(tmp_path / f"train-{n}.jsonl"), w) for n, w in (("trecqa", 2), ("sick", 3), ("msrp", 1))]
    assert recipe.train.batching == "auto" and not recipe.data.train  # auto: same-source with several sources
    mixed = load_recipe(str(REPO / "recipes" / "multitask" / "contrastive.yaml"), batching_study.data_overrides("contrastive, mixed", tmp_path, None)[1::2])
    assert mixed.data.train == str(tmp_path / "train.jsonl") and not mixed.data.sources


def test_mined_rows_from_other_inputs_are_refused(tmp_path, monkeypatch):
    data, root = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    root.mkdir()
    (data / "train.jsonl").write_text('{"query": "q", "positive": ["p"]}\n')
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights")
    (root / "mined.jsonl").write_text('{"query": "q", "positive": ["p"], "negative": ["n"]}\n')
    (root / "mined.inputs.json").write_text(json.dumps({"train": "another file's hash"}))
    with pytest.raises(SystemExit, match="mined from other rows"):
        batching_study.mined_rows(data, root, str(teacher))
