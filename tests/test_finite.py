"""Bounded and finite (design.md §11): no number that is not finite gets into training, and a step that goes
non-finite anyway stops the run before its weights are saved. Real runs of the tiny model, in this process."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import RESOURCES, demo_texts, run_cli, write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from ullme_cli.errors import UllmeError

TRAIN = RESOURCES / "trecqa-train" / "train.jsonl"
# Every float a recipe holds, as (section, key): the property below puts any number into each.
FLOAT_FIELDS = [("loss", k) for k in ("temperature", "tau_kl", "tau_gen", "beta", "dpo_label_smoothing", "mask_probability", "teacher_temperature")] + [
    ("train", k) for k in ("learning_rate", "weight_decay", "max_grad_norm")] + [("lora", "dropout"), ("loss", "weights.contrastive"),
    ("loss", "weights.distill"), ("loss", "matryoshka_weights")]  # fmt: skip
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e300, -1e308, 1e308, 0.0, -1.0, 0.5, 1e20]))


def scored_rows(path: Path, pos: float, neg: float) -> Path:
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[:6]]
    with path.open("w") as f:  # json.dumps writes NaN and Infinity as JSON readers accept them
        for row in rows:
            first = lambda v: v if isinstance(v, str) else v[0]  # noqa: E731 - one positive and one negative, one score each
            f.write(json.dumps({"query": row["query"], "positive": first(row["positive"]), "negative": [first(row["negative"])],
                                "pos_scores": [pos], "neg_scores": [neg]}) + "\n")  # fmt: skip
    return path


def weights_finite(folder: Path) -> bool:
    return all(np.isfinite(t).all() for f in folder.rglob("*.safetensors") for t in load_file(str(f)).values())


def train_once(root: Path, model: Path, section: str, key: str, value, pos: float = 0.9, neg: float = 0.1) -> str:
    """finetune one step with `value` at section.key (and teacher scores pos/neg): "refused" (nothing
    written), "stopped" (the guard: no model saved) or "trained" (a model saved). Asserts what each leaves."""
    from ullme_cli.recipes import load_recipe
    from ullme_cli.training.trainer import finetune

    out = root / "run"
    recipe = {"output_dir": str(out), "model": {"name": str(model), "max_length": 64},
              "data": {"train": str(scored_rows(root / "t.jsonl", pos, neg))}, "loss": {"weights": {"contrastive": 1.0, "distill": 1.0}},
              "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 1}}  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    override = f"{section}.{key}={[value, 1.0] if key == 'matryoshka_weights' else value}"
    extra = ["loss.matryoshka_dims=[8, full]"] if key == "matryoshka_weights" else []
    try:
        loaded = load_recipe(str(root / "recipe.yaml"), [override.replace("nan", ".nan").replace("inf", ".inf"), *extra])
    except UllmeError:
        assert not out.exists(), "a refused recipe wrote its output_dir"
        return "refused"
    try:
        finetune(loaded, show_progress=False)
    except UllmeError as e:
        assert not (out / "model").exists(), "a stopped run saved a model"
        assert weights_finite(out), f"a checkpoint holds weights that are not finite ({e})"
        return "refused" if "step " not in str(e) else "stopped"
    assert weights_finite(out / "model") and weights_finite(out), "a run saved weights that are not finite"
    return "trained"


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FLOAT_FIELDS), value=NUMBERS, pos=NUMBERS)
def test_any_number_in_a_recipe_or_a_teacher_score_is_refused_or_trains_finite_weights(tiny_llama, tmp_path_factory, field, value, pos):
    """Every float field of a recipe, and a row's teacher score, with any number: a clean refusal before
    anything is written, a run the step guard stops with no model saved, or a model whose weights are finite."""
    root = tmp_path_factory.mktemp("finite")
    section, key = field
    try:
        outcome = train_once(root, tiny_llama, section, key, value, pos=pos)
    except UllmeError as e:  # teacher scores are read when the data is: refused before anything is written
        assert not math.isfinite(pos) and "pos_scores" in str(e), e
        assert not (root / "run").exists()
        return
    if not math.isfinite(value) or not math.isfinite(pos):
        assert outcome == "refused", (field, value, pos, outcome)


def test_a_learning_rate_past_float32_is_refused_and_a_step_that_leaves_infinite_weights_stops(tiny_llama, tmp_path):
    """AdamW turns the learning rate into a float32 scalar, so 1e39 (finite in the recipe) was a torch
    traceback: the recipe refuses it. A step whose update overflows anyway (an optimizer state pushed to
    infinity stands in for a diverged one) stops the run naming the step, before its checkpoint."""
    import torch

    from ullme_cli.recipes import load_recipe
    from ullme_cli.training import trainer

    assert train_once(tmp_path, tiny_llama, "train", "learning_rate", 1e39) == "refused"
    result = run_cli("finetune", tmp_path / "recipe.yaml", "--set", "output_dir=" + str(tmp_path / "cli"), "--set", "train.learning_rate=1e39")
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "'train.learning_rate' must be above 0 and at most 10, got 1e+39" in stderr and "Traceback" not in stderr, stderr
    run = trainer.prepare(load_recipe(str(tmp_path / "recipe.yaml")), tmp_path / "run")
    assert not trainer.resume_run(run, False)
    trainer.train_step(run)
    for state in run.optimizer.state.values():
        state["exp_avg"].fill_(float("inf"))
    with pytest.raises(UllmeError, match="step 2: the optimizer step left weights that are not finite"):
        trainer.train_step(run)
    assert not (tmp_path / "run" / "model").exists() and not torch.isfinite(next(iter(run.params.values()))).all()


def test_a_nan_loss_names_its_component_and_keeps_the_last_checkpoint(tiny_llama, tmp_path):
    """Two steps with a checkpoint after the first; a weight set to NaN between them (as a diverged step
    would leave it) makes step 2's loss NaN: the error names step 2 and the component, the step-1
    checkpoint stays as it was, and no model is written."""
    import torch

    from ullme_cli.recipes import load_recipe
    from ullme_cli.training import trainer

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64}, "data": {"train": str(TRAIN)},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 1}}))  # fmt: skip
    run = trainer.prepare(load_recipe(str(tmp_path / "recipe.yaml")), tmp_path / "run")
    assert not trainer.resume_run(run, False)
    loss, parts, grad_norm = trainer.train_step(run)
    trainer.log_and_checkpoint(run, {"step": run.step, "loss": loss, **parts})
    checkpoint = trainer.latest_checkpoint(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    with torch.no_grad():
        next(iter(run.params.values())).fill_(float("nan"))
    with pytest.raises(UllmeError, match=r"step 2: the loss is not finite \(contrastive = nan\)"):
        trainer.train_step(run)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before
    assert not (tmp_path / "run" / "model").exists()


def test_yaml_1_2_numbers_and_no_others():
    from ullme_cli.recipes import read_yaml

    assert read_yaml("a: 1e-3")["a"] == 0.001 and read_yaml("a: 5e2")["a"] == 500.0 and read_yaml("a: 0x10")["a"] == 16
    assert math.isnan(read_yaml("a: .nan")["a"]) and read_yaml("a: -.inf")["a"] == -math.inf
    assert read_yaml("a: 1_000")["a"] == "1_000" and read_yaml("a: 1:30")["a"] == "1:30" and read_yaml("a: 010")["a"] == 10


@pytest.fixture
def full_disk(tmp_path):
    """A 16 kB tmpfs mounted for the test (CI runs as root); skipped where mounting is not allowed."""
    folder = tmp_path / "full"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_writing_onto_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama, tmp_path, full_disk):
    corpus = write_corpus(tmp_path / "c.jsonl", demo_texts(300))
    result = run_cli("encode", corpus, "-o", full_disk / "e.npy", "-m", tiny_llama, "--dtype", "float32", "-q")
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "could not be written: no space left on device" in stderr.lower(), stderr
    assert run_cli("encode", corpus, "-o", tmp_path / "e.npy", "-m", tiny_llama, "--dtype", "float32", "-q").returncode == 0
    result = run_cli("index", tmp_path / "e.npy", "-o", full_disk / "idx", "-q")
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr and "could not be written" in stderr, stderr
    left = [p.name for p in full_disk.iterdir() if not p.name.startswith(".e.npy.partial") and p.name != "e.npy.partial"]
    assert left == [], left


def test_truncation_is_counted_in_the_summary_line(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", ["short text", "word " * 400])
    result = run_cli("encode", corpus, "-o", tmp_path / "e.npy", "-m", tiny_llama, "--max-length", "32")
    assert result.returncode == 0, result.stderr.decode()
    assert "encode: 1 text(s) cut at max_length 32" in result.stderr.decode()
