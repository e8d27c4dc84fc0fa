"""The switch test of docs/design.md §2, for every family: in bidirectional mode the last token reaches the first."""

import pytest
import torch
from tiny_models import tiny_model

from ullme_cli.models.bidirectional import (
    TESTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    check_supported,
    hidden_states,
    verify_bidirectional,
)

LENGTH = 10  # longer than the tiny models' sliding window (4), so a clipping window would be caught
PAD = 3


def first_token_states(model, ids: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    mask = torch.ones_like(ids)
    if padding != "none":
        pad_ids, pad_mask = torch.zeros(1, PAD, dtype=torch.long), torch.zeros(1, PAD, dtype=torch.long)
        parts = [(pad_ids, ids), (pad_mask, mask)] if padding == "left" else [(ids, pad_ids), (mask, pad_mask)]
        ids, mask = (torch.cat(p, dim=1) for p in parts)
    first = PAD if padding == "left" else 0
    with torch.no_grad():
        return hidden_states(model, ids, mask, mode)[0, first]


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_last_token_reaches_first_only_when_bidirectional(model_type, padding):
    model = tiny_model(model_type)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (1, LENGTH))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 300 + 3
    bi = [first_token_states(model, x, "bidirectional", padding) for x in (ids, changed)]
    causal = [first_token_states(model, x, "causal", padding) for x in (ids, changed)]
    assert (bi[0] - bi[1]).abs().max() > 1e-4
    torch.testing.assert_close(causal[0], causal[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma2", "gemma3_text"])
def test_padding_side_does_not_change_states(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(3, 300, (1, LENGTH))
    mask = torch.ones_like(ids)
    pad = torch.zeros(1, PAD, dtype=torch.long)
    with torch.no_grad():
        plain = hidden_states(model, ids, mask, "bidirectional")[0]
        right = hidden_states(model, torch.cat([ids, pad], 1), torch.cat([mask, pad], 1), "bidirectional")[0, :LENGTH]
        left = hidden_states(model, torch.cat([pad, ids], 1), torch.cat([pad, mask], 1), "bidirectional")[0, PAD:]
    torch.testing.assert_close(right, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, plain, atol=1e-4, rtol=1e-4)


def test_is_causal_flags_are_restored_after_a_bidirectional_call():
    model = tiny_model("llama")
    before = [m.is_causal for m in model.modules() if hasattr(m, "is_causal")]
    ids = torch.randint(3, 300, (2, 6))
    hidden_states(model, ids, torch.ones_like(ids), "bidirectional")
    assert [m.is_causal for m in model.modules() if hasattr(m, "is_causal")] == before
    assert all(before)


def test_unpadded_batch_is_bidirectional_even_through_the_sdpa_causal_kernel():
    """The bug of the paper's first release: no padding, no mask, SDPA falls back to is_causal=True."""
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (1, LENGTH))
    changed = ids.clone()
    changed[0, -1] = 5
    states = [hidden_states(model, x, torch.ones_like(x), "bidirectional")[0, 0] for x in (ids, changed)]
    assert not torch.allclose(*states)


def test_verify_passes_on_a_supported_model():
    verify_bidirectional(tiny_model("qwen3"))


def test_architecture_without_a_decoder_body_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="decoder body"):
        check_supported(model)


def test_attention_kernel_that_ignores_4d_masks_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    model.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedArchitectureError, match="ignores 4-D masks"):
        check_supported(model)


def test_a_switch_that_has_no_effect_is_an_error_not_silent_causal(monkeypatch):
    import ullme_cli.models.bidirectional as bidirectional

    model = tiny_model("llama")
    real = bidirectional.hidden_states
    monkeypatch.setattr(bidirectional, "hidden_states", lambda m, i, a, mode: real(m, i, a, "causal"))
    with pytest.raises(UnsupportedArchitectureError, match="no effect"):
        verify_bidirectional(model)


# ---------------------------------------------------------------- one switch (docs/design.md §2)
@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_the_config_flag_gives_the_4d_mask_states_logits_and_gradients(model_type):
    """transformers' `is_causal=False` and ullme's 4-D mask agree to 1e-6 in float32: states (padded
    batches), bidirectional and causal logits, and the gradients of a loss on the states."""
    from ullme_cli.models.bidirectional import config_switch_honoured, lm_logits, switch_route

    model = tiny_model(model_type)
    length = 3  # shorter than the tiny sliding windows (4), where the flag route runs
    ids = torch.randint(3, 300, (2, length))
    mask = torch.tensor([[1] * length, [0] + [1] * (length - 1)])
    if model_type == "stablelm":  # its forward ignores the flag: the probe sends it down ullme's mask route
        assert not config_switch_honoured(model) and switch_route(model, length) == "mask"
        return
    assert config_switch_honoured(model) and switch_route(model, length) == "config"

    def loss_and_grads(route):
        model.zero_grad()
        states = hidden_states(model, ids, mask, "bidirectional", route=route)
        (states * mask[..., None]).pow(2).mean().backward()
        return states.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (flag, flag_grads), (masked, masked_grads) = loss_and_grads(None), loss_and_grads("mask")
    torch.testing.assert_close(flag[mask.bool()], masked[mask.bool()], atol=1e-6, rtol=0)
    assert flag_grads.keys() == masked_grads.keys()
    for name in flag_grads:
        torch.testing.assert_close(flag_grads[name], masked_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        for mode in ("bidirectional", "causal"):
            torch.testing.assert_close(lm_logits(model, ids, mask, mode)[mask.bool()], lm_logits(model, ids, mask, mode, route="mask")[mask.bool()],
                                       atol=1e-6, rtol=0)  # fmt: skip


def test_a_batch_as_long_as_a_sliding_window_takes_the_mask_that_does_not_clip():
    from ullme_cli.models.bidirectional import switch_route

    model = tiny_model("mistral")  # sliding window 4
    assert switch_route(model, 3) == "config" and switch_route(model, 4) == "mask"
    ids = torch.randint(3, 300, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 300 + 3
    with torch.no_grad():
        first = [hidden_states(model, x, torch.ones_like(x), "bidirectional")[0, 0] for x in (ids, changed)]
    assert not torch.allclose(*first), "the last of 8 tokens must reach the first through a window of 4"



def attention_ops(model, ids: torch.Tensor, grad: bool) -> tuple[set[str], torch.Tensor | None]:
    """The SDPA ops a forward (and, with `grad`, backward) pass ran, and the embeddings' gradient."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile() as profile, torch.set_grad_enabled(grad):
        states = hidden_states(model, ids, torch.ones_like(ids), "bidirectional")
        if grad:
            states.square().sum().backward()
    ops = {e.name for e in profile.events() if "scaled_dot_product" in e.name}
    return ops, model.get_input_embeddings().weight.grad.clone() if grad else None


def test_a_short_cpu_training_pass_takes_the_math_attention_route():
    """`attention_kernel`: on CPU, a differentiated pass over rows of ≤ 128 tokens runs SDPA's math route
    (CPU flash attention's backward is the slow part of a short training step); inference, longer rows and
    gradient checkpointing keep SDPA's own choice. The gradients agree either way."""
    from ullme_cli.models.bidirectional import MATH_ATTENTION_MAX_TOKENS

    math, flash_backward = "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    model = tiny_model("llama")
    short, long = (torch.randint(3, 300, (2, n)) for n in (16, MATH_ATTENTION_MAX_TOKENS + 1))
    ops, grad = attention_ops(model, short, grad=True)
    assert math in ops and flash_backward not in ops, ops
    assert math not in attention_ops(model, short, grad=False)[0]
    ops = attention_ops(model, long, grad=True)[0]
    assert math not in ops and flash_backward in ops, ops
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ops, checkpointed = attention_ops(model, short, grad=True)
    assert math not in ops and flash_backward in ops, ops
    # float32 rounding of two kernels through two layers: 7e-5 at most, on gradients up to 2.5 here
    torch.testing.assert_close(checkpointed, grad, atol=1e-4 * grad.abs().max().item(), rtol=1e-4)
