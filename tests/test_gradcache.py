"""GradCache gives the full batch's loss and gradients (docs/design.md §4), within 1e-5."""

import pytest
import torch

from ullme_cli.data import read_training_examples
from ullme_cli.models.embedder import Embedder
from ullme_cli.recipes import LossSection
from ullme_cli.training.step import StepLoss
from ullme_cli.training.trainer import trainable_parameters
from conftest import RESOURCES


def gradients(tiny_llama, weights: dict, chunk: int):
    torch.manual_seed(0)
    embedder = Embedder.load(str(tiny_llama), dtype="float32", max_length=48, generation_instruction="Answer: ")
    embedder.add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # adapters that matter, so the DPO reference differs from the policy
    examples, _ = read_training_examples(str(RESOURCES / "trecqa-train" / "train.jsonl"))
    step = StepLoss(embedder, LossSection(weights=weights), negatives_per_query=2, chunk_size=chunk)
    loss, parts = step.backward(examples[:6], torch.Generator().manual_seed(0))
    grads = {n: p.grad.clone() for n, p in trainable_parameters(embedder).items() if p.grad is not None}
    return loss, parts, grads


@pytest.mark.parametrize("weights", [{"contrastive": 1.0}, {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0, "sft": 0.2}])
def test_grad_cache_matches_the_full_batch(tiny_llama, weights):
    full_loss, full_parts, full = gradients(tiny_llama, weights, chunk=0)
    cached_loss, cached_parts, cached = gradients(tiny_llama, weights, chunk=2)
    assert cached_loss == pytest.approx(full_loss, abs=1e-5)
    assert cached_parts == pytest.approx(full_parts, abs=1e-5)
    assert set(cached) == set(full) and len(full) > 0
    for name in full:
        torch.testing.assert_close(cached[name], full[name], atol=1e-5, rtol=1e-4)
