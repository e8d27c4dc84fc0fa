"""Padding-free batches (docs/design.md §2, §7): texts packed end to end in rows, each attending to itself only,
give the padded path's vectors (cosine ≥ 0.9999 in float32) and the same training gradients (1e-5)."""

import pytest
import torch
from conftest import lora_step_gradients
from tiny_models import tiny_model, tiny_tokenizer

from ullme_cli.model_setup import ModelSetup
from ullme_cli.models.bidirectional import TESTED_MODEL_TYPES
from ullme_cli.models.embedder import Embedder, pack_rows, packed_share

TEXTS = [
    "what is the capital of France",
    "Paris is the capital and most populous city of France, with an estimated population of two million",
    "hi",
    "the quick brown fox jumps over the lazy dog while the cat watches from the warm window sill",
    "a b c",
    "gradient descent",
    "embedding models map texts to vectors so that related texts lie close together",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXTS)


def embedder_for(model_type, tokenizer, **setup):
    return Embedder(tiny_model(model_type), tokenizer, ModelSetup(model="tiny", max_length=64, **setup), torch.device("cpu"))


def test_pack_rows_fits_every_text_once_within_capacity():
    lengths = [9, 3, 7, 1, 5, 5, 2, 9]
    rows = pack_rows(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert len(rows) == 5  # 41 tokens in rows of 9: first-fit decreasing needs ceil(41/9) = 5 here
    assert packed_share([[0, 1, 2, 3, 4, 5, 6, 7]], lengths) == (41, 72, 45)


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_packed_vectors_equal_padded_ones(tokenizer, model_type, mode):
    embedder = embedder_for(model_type, tokenizer, attention=mode)
    items = embedder.tokenize(TEXTS, "query")
    with torch.no_grad():
        padded = embedder.embed(embedder.collate(items))
        batch = embedder.collate(items, packed=True)
        packed = embedder.embed(batch)
    if embedder.can_pack():
        assert batch.packing.input_ids.shape[0] < len(TEXTS)  # several texts share a row
    else:  # causal with a sliding window: one packed mask cannot say it, so the batch stays padded
        assert mode == "causal" and batch.packing is None
    cosine = torch.nn.functional.cosine_similarity(padded, packed)
    assert cosine.min().item() >= 0.9999, (model_type, cosine)


@pytest.mark.parametrize("setup", [dict(pooling="last-token", padding_side="left"), dict(pooling="weighted-mean"),
                                   dict(pooling="cls"), dict(pooling="mean", padding_side="left")])  # fmt: skip
def test_packing_keeps_each_pooling_and_padding_side(tokenizer, setup):
    embedder = embedder_for("llama", tokenizer, **setup)
    items = embedder.tokenize(TEXTS, "query", instruction="Retrieve")
    with torch.no_grad():
        padded, packed = (embedder.embed(embedder.collate(items, packed=p)) for p in (False, True))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_packed_training_gradients_equal_padded_ones(tokenizer, model_type):
    """A contrastive-style loss over queries and passages: every parameter's gradient matches to 1e-5."""
    grads = []
    for packed in (False, True):
        embedder = embedder_for(model_type, tokenizer)
        embedder.model.train()
        q = embedder.embed(embedder.collate(embedder.tokenize(TEXTS[::2], "query"), packed=packed))
        p = embedder.embed(embedder.collate(embedder.tokenize(TEXTS[1::2] + TEXTS[:1], "passage"), packed=packed))
        loss = torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))
        loss.backward()
        grads.append({n: w.grad.clone() for n, w in embedder.model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("weights", [{"contrastive": 1.0}, {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0}])
def test_a_padding_free_step_embeds_every_role_in_one_pass_with_the_padded_gradients(tiny_llama, weights):
    """Padding-free, a step embeds queries, positives and negatives in one forward pass instead of three
    (a small batch's passes cost more in overhead than in matmuls: docs/benchmarks.md), with the padded step's
    loss and gradients to 1e-5."""
    runs = {packing: lora_step_gradients(tiny_llama, weights, packing=packing) for packing in (False, True)}
    (loss, parts, padded, padded_passes), (packed_loss, packed_parts, packed, packed_passes) = runs[False], runs[True]
    assert packed_passes == padded_passes - 2  # three embedding passes became one; generation passes unchanged
    assert packed_loss == pytest.approx(loss, abs=1e-5) and packed_parts == pytest.approx(parts, abs=1e-5)
    assert packed.keys() == padded.keys() and padded
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=1e-4, msg=name)
