"""`finetune --dry-run` (docs/design.md §4, "Dry run"): the paper recipes budget offline from their shipped configs, and the
memory the meta-device trace predicts matches a real step's measured peak on a small random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO, demo_texts, lora_step_gradients, run_cli

from ullme_cli.losses.table import STRATEGIES
from ullme_cli.recipes import load_recipe
from ullme_cli.training.dry_run import dry_run

PAPER = REPO / "recipes" / "paper"
# Published sizes of the backbones (parameters, embeddings included): a check that the shipped configs are theirs.
# (Llama-3-8B is checked through the CLI below, on the GenC recipe that shares its config.)
PUBLISHED = {"mistral-7b-instruct": 7.24e9, "phi-1_5": 1.42e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_paper_recipes_budget_offline_from_their_shipped_configs(name):
    recipe = load_recipe(str(PAPER / f"{name}.yaml"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        budget = dry_run(recipe, processes=8)
    assert recipe.train.gradient_checkpointing and not [w for w in caught if w.category is FutureWarning], [str(w.message) for w in caught]
    assert budget.config_from.endswith(f"{name}.config.json"), "the Hub is not reachable here: the shipped config is read"
    assert budget.parameters - budget.trainable == pytest.approx(PUBLISHED[name], rel=0.01)
    assert budget.trainable < 0.01 * budget.parameters, "LoRA r=16 trains well under 1% of the weights"
    assert [s.rows for s in budget.sources] == [None, None] and all("hf:" in s.problem or "Hieuman" in s.problem for s in budget.sources)
    # A step of every text at max_length costs at least a forward and an input-gradient backward (4·P·T).
    assert budget.flops_per_step >= 4 * budget.parameters * 0.8 * budget.tokens_per_step
    assert budget.memory["parameters"] == pytest.approx(2 * budget.parameters / 8, rel=0.01), "bf16 weights sharded over 8 (fsdp)"


def test_the_dry_run_prints_the_budget_and_writes_nothing(tmp_path):
    done = run_cli("finetune", str(PAPER / "genc-llama-3-8b-instruct.yaml"), "--dry-run", "--processes", "8", "--set", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = done.stdout.decode()
    for expected in ("model config:", "parameters: 8.07", "not reachable here", "500 steps of 64 rows per process x 8 processes = 512 rows per step",
                     "GradCache chunks of 4", "TFLOP", "memory per process, weights sharded over 8 (fsdp)"):  # fmt: skip
        assert expected in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_predicted_step_memory_is_within_a_quarter_of_the_measured_peak(tmp_path):
    from tiny_models import save_tiny

    texts = demo_texts()
    model = save_tiny(tmp_path / "model", "llama", texts, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=6)  # fmt: skip
    long = [" ".join(texts[i : i + 12]) for i in range(0, 240, 12)]  # each well over max_length tokens
    rows = [{"query": long[i], "positive": [long[(i + 1) % 20]], "negative": [long[(i + 2) % 20]]} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for arm, extra in {"full": "lora: {enabled: false}\n", "lora": "lora: {enabled: true, r: 8, dropout: 0.0}\n"}.items():
        recipe = tmp_path / f"{arm}.yaml"
        recipe.write_text(f"output_dir: {tmp_path / arm}\nmodel: {{name: {model}, max_length: 128}}\n{extra}"
                          f"data: {{train: {tmp_path / 'train.jsonl'}, negatives_per_query: 1}}\ntrain: {{steps: 1, batch_size: 8, warmup_steps: 0}}\n")  # fmt: skip
        measured = subprocess.run([sys.executable, str(REPO / "tests" / "step_memory.py"), str(recipe), str(tmp_path / arm)],
                                  capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})  # fmt: skip
        assert measured.returncode == 0, measured.stderr[-2000:]
        memory = json.loads(measured.stdout.strip().splitlines()[-1])
        step = memory["peak"] - memory["before"]
        predicted = dry_run(load_recipe(str(recipe))).memory
        expected = predicted["gradients"] + predicted["optimizer"] + predicted["activations"] + predicted["transient"]
        assert expected == pytest.approx(step, rel=0.25), f"{arm}: predicted {expected / 2**20:.0f} MiB, measured {step / 2**20:.0f} MiB"


# distill reads teacher scores from its rows (the TREC QA rows have none); its passes are the pairs' passes.
@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"distill"}))
def test_the_dry_run_counts_the_texts_the_step_runs(strategy, tiny_llama, monkeypatch):
    """The dry run's text counts come from `step.step_texts`, the step's own; here the step's real passes
    are counted for every strategy: texts through the embedding forward, and through the LM head with a
    graph. (The dry run counted SimCSE's two views of queries and positives as 2B texts: the step runs 4B.)"""
    from ullme_cli.models import embedder as embedder_module
    from ullme_cli.models import generation
    from ullme_cli.training import step as step_module
    from ullme_cli.training.step import step_texts

    embedded, through_lm = [], []
    original_embed = embedder_module.Embedder.embed

    def counting_embed(self, batch, mode=None):
        embedded.append(batch.input_ids.shape[0])
        return original_embed(self, batch, mode)

    def counting(lm_logits):
        def wrapped(model, ids, *args, **kwargs):
            if torch.is_grad_enabled():
                through_lm.append(ids.shape[0])
            return lm_logits(model, ids, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(embedder_module.Embedder, "embed", counting_embed)
    monkeypatch.setattr(generation, "lm_logits", counting(generation.lm_logits))
    monkeypatch.setattr(step_module, "lm_logits", counting(step_module.lm_logits))
    weights = STRATEGIES[strategy]
    lora_step_gradients(tiny_llama, weights)
    assert (sum(embedded), sum(through_lm)) == step_texts(weights, 6, 2), strategy
