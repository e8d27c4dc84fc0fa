"""Gradient checkpointing changes memory, not gradients: LoRA and full fine-tuning, GRL (both attention
modes in one step) and GradCache, with dropout on."""

import pytest
import torch
from conftest import RESOURCES

from ullme_cli.data import read_training_examples
from ullme_cli.models.embedder import Embedder
from ullme_cli.recipes import LossSection
from ullme_cli.training.step import StepLoss
from ullme_cli.training.trainer import trainable_parameters


def gradients(tiny_llama, lora: bool, weights: dict, chunk: int, checkpointing: bool):
    torch.manual_seed(0)
    embedder = Embedder.load(str(tiny_llama), dtype="float32", max_length=48, generation_instruction="Answer: ")
    if lora:
        embedder.add_lora(r=4, alpha=8, dropout=0.1)
    else:
        embedder.model.requires_grad_(True)
    if checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.model.train()
    examples, _ = read_training_examples(str(RESOURCES / "trecqa-train" / "train.jsonl"))
    loss = LossSection(weights=weights, reference_free=not lora)
    torch.manual_seed(1)  # the step's dropout draws
    StepLoss(embedder, loss, negatives_per_query=1, chunk_size=chunk).backward(examples[:4], torch.Generator().manual_seed(0))
    return {n: p.grad.clone() for n, p in trainable_parameters(embedder).items() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("weights, chunk", [({"contrastive": 1.0, "dpo": 0.5, "kl": 1.0}, 0), ({"contrastive": 1.0}, 2)])
def test_gradients_are_the_same_with_checkpointing(tiny_llama, lora, weights, chunk):
    plain = gradients(tiny_llama, lora, weights, chunk, checkpointing=False)
    checkpointed = gradients(tiny_llama, lora, weights, chunk, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    # 1e-5, not 1e-6: without checkpointing a CPU step takes the math attention route on short rows, with it
    # SDPA's own kernel (`attention_kernel`), so float32 rounding differs between the two.
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)
