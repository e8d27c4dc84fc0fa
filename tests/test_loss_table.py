"""The loss table (docs/design.md §4) and the paper's templates (§3): recipe validation and the training step
read one table of components, and `model.template: ullme-paper` formats queries, candidates and the
generation prompt as the original ULLME does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ullme_cli.data import TrainingExample
from ullme_cli.errors import UllmeError
from ullme_cli.losses.table import LOSS_TABLE, STRATEGIES, Component
from ullme_cli.recipes import LOSS_COMPONENTS, LossSection, load_recipe


def write_recipe(tmp_path, text: str):
    (tmp_path / "train.jsonl").write_text('{"query": "q", "positive": ["p"], "negative": ["n"]}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {train: train.jsonl}\n" + text)
    return path


def test_every_component_builds_from_its_recipe_parameters():
    fields = {f.name for f in dataclasses.fields(LossSection)}
    assert LOSS_COMPONENTS == tuple(LOSS_TABLE)
    for name, component in LOSS_TABLE.items():
        assert set(component.parameters) <= fields, f"{name} reads a loss parameter that recipes do not have"
        assert isinstance(component.build(LossSection()), nn.Module)
    assert all(set(weights) <= set(LOSS_TABLE) for weights in STRATEGIES.values())
    # A parameter reaches the module: the table passes the recipe's value, not the class default.
    assert LOSS_TABLE["dpo"].build(LossSection(beta=0.3, dpo_label_smoothing=0.1)).beta == 0.3


def test_recipe_validation_reads_the_table(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, "loss: {weights: {kl: 1.0}}\ndata: {train: train.jsonl, negatives_per_query: 0}\n")
    with pytest.raises(UllmeError, match="negatives_per_query' must be at least 1 for distill, dpo, kl"):
        load_recipe(str(path))
    # A component the table marks as not replayable by GradCache is refused with GradCache, by the table alone.
    monkeypatch.setitem(LOSS_TABLE, "contrastive", dataclasses.replace(LOSS_TABLE["contrastive"], grad_cache=False))
    path = write_recipe(tmp_path, "train: {grad_cache_chunk: 2}\n")
    with pytest.raises(UllmeError, match="grad_cache_chunk' GradCache covers distill, kl, sft, dpo, not contrastive"):
        load_recipe(str(path))


def test_step_builds_only_the_recipe_components_from_the_table(monkeypatch):
    from ullme_cli.training.step import StepLoss

    step = StepLoss(None, LossSection(strategy="grl", beta=0.25), negatives_per_query=1)
    assert set(step.terms) == {"contrastive", "dpo", "kl"} and step.terms["dpo"].beta == 0.25
    built = []
    monkeypatch.setitem(LOSS_TABLE, "sft", Component("sft", "sft:SFTLoss", (), frozenset({"generation"})))
    original = Component.build
    monkeypatch.setattr(Component, "build", lambda self, section: built.append(self.name) or original(self, section))
    StepLoss(None, LossSection(strategy="sft"), negatives_per_query=0)
    assert built == ["sft"]


def test_paper_template_sets_the_original_formats_and_the_recipe_wins(tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path, "model: {template: ullme-paper, query_instruction: Retrieve answers}\n")))
    setup = recipe.model.setup()
    assert setup.instruction_prefix("query") == "Retrieve answers\n"
    assert setup.instruction_prefix("passage") == "Retrieve answers\nCandidate:\n", "candidates carry the task's instruction"
    assert setup.instruction_prefix("passage", "Find duplicates") == "Find duplicates\nCandidate:\n"
    assert setup.generation_instruction + "why?" + setup.generation_separator == "Please write a passage that can be used to answer above query. Query:\nwhy?\n\n"
    own = load_recipe(str(write_recipe(tmp_path, "model: {template: ullme-paper, generation_separator: ' '}\n")))
    assert own.model.generation_separator == " " and own.model.passage_template == "{instruction}\nCandidate:\n"
    assert load_recipe(str(write_recipe(tmp_path, ""))).model.setup().instruction_prefix("passage") == "", "the default stays: bare passages"
    with pytest.raises(UllmeError, match=r"recipe.yaml: 'model.template' must be one of e5, ullme-paper, got 'paper'"):
        load_recipe(str(write_recipe(tmp_path, "model: {template: paper}\n")))
    with pytest.raises(UllmeError, match=r"'model.passage_template' must contain '\{instruction\}'"):
        load_recipe(str(write_recipe(tmp_path, "model: {passage_template: 'Candidate: '}\n")))


def test_training_gives_each_candidate_its_rows_instruction_under_the_paper_template(tiny_llama):
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.training.step import StepLoss

    embedder = Embedder.load(str(tiny_llama), dtype="float32", device="cpu", instruction_template="{instruction}\n",
                             passage_template="{instruction}\nCandidate:\n", query_instruction="Default task")  # fmt: skip
    prefixes = []
    tokenize = embedder.tokenize
    embedder.tokenize = lambda texts, kind="passage", instruction=None, **kw: prefixes.append((kind, embedder.instruction_prefix(kind, instruction))) or tokenize(texts, kind, instruction, **kw)
    rows = [TrainingExample("q0", ["a"], ["x"], instruction="Task A"), TrainingExample("q1", ["b"], ["y"], instruction=None)]
    StepLoss(embedder, LossSection(), negatives_per_query=1).backward(rows, torch.Generator().manual_seed(0))
    assert prefixes.count(("passage", "Task A\nCandidate:\n")) == 2, "row 0's positive and negative"
    assert prefixes.count(("passage", "Default task\nCandidate:\n")) == 2, "row 1 has no instruction: the setup's"
    assert ("query", "Task A\n") in prefixes


TOY_LOSS = '''
import torch
from torch import nn


class AlignmentLoss(nn.Module):
    """Alignment (Wang and Isola, 2020) of each query with its positive, scaled:

        L = 1/B Σ_i (1 - s(q_i, p_i⁺)) / τ

    Inputs: queries (B, d), positives (B, d), unit vectors. Returns a scalar.
    """

    seen = []  # the embeddings it was given, for the test to recompute the value by hand

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries, positives):
        return (1 - (queries * positives).sum(-1)).mean() / self.temperature

    def from_step(self, inputs):
        AlignmentLoss.seen.append((inputs.queries.detach().clone(), inputs.positives.detach().clone()))
        return self(inputs.queries, inputs.positives)
'''


def test_a_new_loss_is_one_file_and_one_row(tmp_path, monkeypatch, tiny_llama):
    """design.md §5: the loss table drives the step. A loss added as one file (its class with `from_step`)
    and one table row is accepted by recipes, counted by the dry run as the step runs it, computed by the
    step, and replayed by GradCache by its row's rule; nothing else changes."""
    from conftest import lora_step_gradients

    from ullme_cli.training.step import step_texts

    package = tmp_path / "toylosses"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "alignment.py").write_text(TOY_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(LOSS_TABLE, "alignment", Component("alignment", "toylosses.alignment:AlignmentLoss", ("temperature",), frozenset({"pairs"})))

    recipe = load_recipe(str(write_recipe(tmp_path, "loss: {weights: {alignment: 1.0}, temperature: 0.5}\n")))
    assert recipe.loss.resolved_weights() == {"alignment": 1.0}
    assert step_texts({"alignment": 1.0}, 6, 2) == (6 * 4, 0), "queries, positives and two negatives per row; no LM head"

    import toylosses.alignment as toy

    loss, parts, grads, passes = lora_step_gradients(tiny_llama, {"alignment": 1.0})
    (queries, positives), = toy.AlignmentLoss.seen
    expected = float((1 - (queries * positives).sum(-1)).mean() / 0.05)  # LossSection's default temperature
    assert set(parts) == {"alignment"} and parts["alignment"] == pytest.approx(expected, rel=1e-6) and loss == pytest.approx(expected, rel=1e-6)
    assert passes == 3, "one embedding pass per role (queries, positives, negatives), no generation pass"
    assert grads, "its gradient reaches the adapters"

    chunked_loss, _, chunked_grads, _ = lora_step_gradients(tiny_llama, {"alignment": 1.0}, chunk=2)
    assert chunked_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_step_names_no_loss():
    """The step reads the table; no component's name is spelled in training/step.py."""
    import ast
    from pathlib import Path

    import ullme_cli.training.step as step_module

    strings = {node.value for node in ast.walk(ast.parse(Path(step_module.__file__).read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & set(LOSS_TABLE), sorted(strings & set(LOSS_TABLE))
