"""Generation log-probabilities equal the model's own causal-LM logits, for every family (issue: Granite,
Cohere and Cohere2 scale their logits after the head, which an LM-head-only path missed)."""

import pytest
import torch
from conftest import demo_texts
from tiny_models import tiny_model, tiny_tokenizer

from ullme_cli.model_setup import ModelSetup
from ullme_cli.models import generation
from ullme_cli.models.bidirectional import TESTED_MODEL_TYPES
from ullme_cli.models.embedder import Embedder

# Scales away from 1, so that a path that skips them cannot pass by accident.
SCALES = {"granite": {"logits_scaling": 4.0}, "cohere": {"logit_scale": 0.5}, "cohere2": {"logit_scale": 0.5},
          "gemma2": {"final_logit_softcapping": 3.0}}  # fmt: skip
PROMPTS = ["Who wrote The Iron Lady ?", "Why"]
CONTINUATIONS = ["Hugo Young wrote the biography .", "because of the rain and the wind"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(demo_texts())


def reference(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation token) from HF's own forward on the unpadded sequence."""
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([p_ids + c_ids])).logits.float().log_softmax(-1)[0]
    return sum(logprobs[len(p_ids) + j - 1, t].item() for j, t in enumerate(c_ids)), len(c_ids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_generation_logprobs_equal_the_models_own_logits(tokenizer, model_type, padding_side):
    model = tiny_model(model_type, **SCALES.get(model_type, {}))
    embedder = Embedder(model, tokenizer, ModelSetup(model="tiny", padding_side=padding_side, max_length=256), torch.device("cpu"))
    scores = generation.generation_logprobs(embedder, PROMPTS, CONTINUATIONS)
    for row, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS)):
        total, count = reference(model, tokenizer, prompt, continuation)
        assert scores["tokens"][row].item() == count
        assert scores["sum"][row].item() == pytest.approx(total, abs=1e-5 * count)
        assert scores["mean"][row].item() == pytest.approx(total / count, abs=1e-5)


def test_the_lm_head_runs_on_the_longest_continuation_only(tokenizer, monkeypatch):
    """Prompts of different lengths: the positions that go through the LM head are those of the longest
    continuation (plus none of the prompts' band), so a large vocabulary costs what the targets need."""
    import ullme_cli.models.generation as generation_module

    seen = []
    original = generation_module.lm_logits

    def recording(model, ids, mask, mode, keep=None):
        seen.append(len(keep))
        return original(model, ids, mask, mode, keep)

    monkeypatch.setattr(generation_module, "lm_logits", recording)
    model = tiny_model("llama")
    prompts = ["Who wrote The Iron Lady , the biography of the prime minister , and when ?", "Why"]
    embedder = Embedder(model, tokenizer, ModelSetup(model="tiny", padding_side="right", max_length=256), torch.device("cpu"))
    scores = generation.generation_logprobs(embedder, prompts, CONTINUATIONS)
    assert seen == [max(scores["tokens"]).item()]
    for row, (prompt, continuation) in enumerate(zip(prompts, CONTINUATIONS)):
        assert scores["sum"][row].item() == pytest.approx(reference(model, tokenizer, prompt, continuation)[0], abs=1e-4)
