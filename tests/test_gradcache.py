"""GradCache gives the full batch's loss and gradients (docs/design.md §4), within 1e-5."""

import pytest
import torch

from conftest import lora_step_gradients


@pytest.mark.parametrize("weights", [{"contrastive": 1.0}, {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0, "sft": 0.2}])
def test_grad_cache_matches_the_full_batch(tiny_llama, weights):
    full_loss, full_parts, full, _ = lora_step_gradients(tiny_llama, weights, chunk=0)
    cached_loss, cached_parts, cached, _ = lora_step_gradients(tiny_llama, weights, chunk=2)
    assert cached_loss == pytest.approx(full_loss, abs=1e-5)
    assert cached_parts == pytest.approx(full_parts, abs=1e-5)
    assert set(cached) == set(full) and len(full) > 0
    for name in full:
        torch.testing.assert_close(cached[name], full[name], atol=1e-5, rtol=1e-4)
