"""Every strategy × GradCache on/off × mixed precision no/bf16 × LoRA on/off either trains two steps on a
tiny model or is refused when the recipe is read, with a one-line reason (never a crash mid-training)."""

import itertools
import json

import pytest
import yaml
from conftest import RESOURCES

from ullme_cli.errors import UllmeError
from ullme_cli.recipes import STRATEGIES, load_recipe
from ullme_cli.training.trainer import finetune

# The combinations that the recipe validator refuses, and why.
REFUSED = {
    ("simcse", 2): "GradCache covers contrastive, distill, kl, sft, dpo, not ",
    ("mntp", 2): "GradCache covers contrastive, distill, kl, sft, dpo, not ",
}
COMBINATIONS = list(itertools.product(STRATEGIES, (0, 2), ("no", "bf16"), (True, False)))


@pytest.mark.slow
@pytest.mark.parametrize("strategy, chunk, precision, lora", COMBINATIONS, ids=["-".join(map(str, c)) for c in COMBINATIONS])
def test_each_combination_trains_two_steps_or_is_refused_up_front(tiny_llama, tmp_path, strategy, chunk, precision, lora):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(tiny_llama), "max_length": 64},
        "lora": {"enabled": lora, "r": 2, "alpha": 4, "dropout": 0.1},
        "data": {"train": str(RESOURCES / "trecqa-train" / "train.jsonl"), "negatives_per_query": 1},
        "loss": {"strategy": strategy},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "grad_cache_chunk": chunk, "mixed_precision": precision},
    }
    if strategy == "distill":  # teacher scores, one per positive and negative, as `mine --teacher` writes them
        rows = [json.loads(line) for line in (RESOURCES / "trecqa-train" / "train.jsonl").read_text().splitlines()]
        for row in rows:
            positives, negatives = (row[k] if isinstance(row[k], list) else [row[k]] for k in ("positive", "negative"))
            row.update(positive=positives, negative=negatives, pos_scores=[0.9] * len(positives), neg_scores=[0.1 * (i % 5) for i in range(len(negatives))])
        (tmp_path / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe["data"]["train"] = str(tmp_path / "scored.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    refusal = REFUSED.get((strategy, chunk))
    if "dpo" in STRATEGIES[strategy] and not lora:  # dpo and grl: the reference is the model with adapters off
        refusal = "'loss.reference_free' must be true for DPO without LoRA"
    if refusal:
        with pytest.raises(UllmeError, match=refusal) as caught:
            load_recipe(str(path))
        assert "\n" not in str(caught.value)
        return
    summary = finetune(load_recipe(str(path)), show_progress=False)
    assert summary["steps"] == 2 and (tmp_path / "run" / "model" / "ullme.json").exists()
