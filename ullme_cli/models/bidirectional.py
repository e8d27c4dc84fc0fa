"""The attention switch: run one loaded decoder causally or bidirectionally, chosen per call.

One mechanism where transformers has it (transformers 5.x, docs/design.md §2): every model forward takes
`is_causal`, which overrides `config.is_causal` for that call. `is_causal=False` builds a padding-only
mask (or none, so SDPA may take its fastest kernel) and clears the attention modules' causal flag; it is
the very flag a saved stock folder carries in config.json (st_export.py), so ullme and outside tools run
the same code. GRL's causal generation scoring passes `is_causal=True` with the same weights.

ullme's own 4-D mask stays for what the flag does not express, decided per model (`switch_route`):
- a family whose forward ignores the flag (stablelm on transformers 5.24), found by the probe below;
- a batch at least as long as a sliding window: transformers' bidirectional mask still clips at the
  window, and ullme's switch lets every token see every other. The 4-D additive mask hides only padding,
  and the attention modules' `is_causal` is cleared for the call, so SDPA cannot stay causal in silence;
- families outside the tested table.
Both routes give the same states (tests/unit/test_bidirectional.py, to 1e-6 in float32).

No modeling file is copied, which is what broke LLM2Vec and GritLM on each transformers release.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Iterator, Literal

import torch
from torch import nn

from ullme_cli.constants import ATTENTION_MODES
from ullme_cli.errors import UllmeError

AttentionMode = Literal["bidirectional", "causal"]

# Families whose bidirectional mode is proven by tests/unit/test_bidirectional.py on transformers 5.
TESTED_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "olmo", "olmo2", "olmo3", "granite", "stablelm", "starcoder2", "cohere",
    "cohere2", "glm", "glm4", "helium", "smollm3", "ministral", "exaone4", "arcee", "apertus",
)  # fmt: skip

# Attention kernels that honour an explicit 4-D mask. flash_attention_2/3 and flex take other mask forms.
MASKABLE_ATTENTION = ("sdpa", "eager")


class UnsupportedArchitectureError(UllmeError):
    pass


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, a peft-wrapped one included."""
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, so the body carries them
        model = model.get_base_model()
    body = getattr(model, "model", None)
    if isinstance(body, nn.Module) and hasattr(body, "embed_tokens"):
        return body
    if hasattr(model, "embed_tokens"):
        return model
    raise UnsupportedArchitectureError(
        f"cannot find the decoder body of {type(model).__name__}: expected a causal LM with a `.model` body"
    )


def check_supported(model: nn.Module) -> None:
    """Raise a clear error when this model cannot be switched to bidirectional attention."""
    body = decoder_of(model)
    config = body.config
    module = sys.modules.get(type(body).__module__)
    builds_masks = module is not None and any(
        hasattr(module, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask")
    )
    if not builds_masks:
        raise UnsupportedArchitectureError(
            f"architecture '{config.model_type}' does not build its attention masks through "
            "transformers.masking_utils, so bidirectional attention cannot be switched on; "
            "use --attention causal, or one of: " + ", ".join(TESTED_MODEL_TYPES)
        )
    implementation = getattr(config, "_attn_implementation", "sdpa")
    if implementation not in MASKABLE_ATTENTION:
        raise UnsupportedArchitectureError(
            f"attention implementation '{implementation}' ignores 4-D masks; load the model with "
            f"attn_implementation='sdpa' or 'eager' for bidirectional attention"
        )


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, 1, L, L) additive mask: every token sees every non-padding token."""
    keep = attention_mask.bool()[:, None, None, :]
    length = attention_mask.shape[-1]
    blocked = torch.zeros(keep.shape[0], 1, length, length, dtype=dtype, device=attention_mask.device)
    return blocked.masked_fill(~keep, torch.finfo(dtype).min)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left and right padding give the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def non_causal_modules(model: nn.Module) -> Iterator[None]:
    """Clear `is_causal` on every module that has it, and restore the old values afterwards."""
    saved = [(m, m.is_causal) for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    try:
        for m, _ in saved:
            m.is_causal = False
        yield
    finally:
        for m, value in saved:
            m.is_causal = value


def mask_dtype(model: nn.Module) -> torch.dtype:
    """The dtype attention computes in: the weights', or the gathered dtype of an FSDP-sharded model."""
    return getattr(model, "ullme_compute_dtype", None) or decoder_of(model).get_input_embeddings().weight.dtype


def _run_body(model: nn.Module, body: nn.Module, **inputs) -> torch.Tensor:
    """The body's last hidden states. An FSDP-sharded model gathers its root's weights (embeddings, norm)
    only in the root's forward, so it runs whole, with one kept logit, and a hook reads the body's output."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return body(**inputs).last_hidden_state
    captured = []
    handle = body.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def sliding_window(config) -> int | None:
    """The shortest attention window a config names, or None."""
    windows = [getattr(config, key, None) for key in ("sliding_window", "attention_chunk_size")]
    windows = [w for w in windows if isinstance(w, int) and w > 0]
    return min(windows) if windows else None  # not min(..., default=): torch.compile breaks its graph there


def config_switch_honoured(model: nn.Module) -> bool:
    """Does this model's forward honour `is_causal`? Decided once per model by the switch's own test (the
    last token must reach the first with `is_causal=False`, and must not with `is_causal=True`), on a tiny
    input that no window clips, and kept on the body."""
    body = decoder_of(model)
    known = getattr(body, "_ullme_config_switch", None)
    if known is None:
        known = False
        if body.config.model_type in TESTED_MODEL_TYPES and getattr(body.config, "_attn_implementation", "sdpa") in MASKABLE_ATTENTION:
            device = body.get_input_embeddings().weight.device
            a = torch.tensor([[1, 2, 3, 4]], device=device)
            b = a.clone()
            b[0, -1] = 1
            mask, positions = torch.ones_like(a), position_ids_for(torch.ones_like(a))
            try:
                with torch.no_grad():
                    first = {causal: [_run_body(model, body, input_ids=x, attention_mask=mask, position_ids=positions, is_causal=causal)[0, 0].float()
                                      for x in (a, b)] for causal in (False, True)}  # fmt: skip
                known = not torch.allclose(*first[False], atol=1e-6, rtol=0) and torch.allclose(*first[True], atol=1e-4, rtol=1e-3)
            except TypeError:  # a forward without **kwargs does not take the flag at all
                known = False
        body._ullme_config_switch = known
    return known


def switch_route(model: nn.Module, length: int) -> Literal["config", "mask"]:
    """How a bidirectional call of `length` tokens runs: transformers' `is_causal=False`, or ullme's 4-D mask
    where the flag is not honoured or a sliding window would clip (see the module docstring)."""
    window = sliding_window(decoder_of(model).config)
    if (window is not None and length >= window) or not config_switch_honoured(model):
        return "mask"
    return "config"


def _switched_inputs(model: nn.Module, attention_mask: torch.Tensor, mode: AttentionMode, route: str | None = None) -> tuple[dict, bool]:
    """The attention inputs for `mode`, and whether the attention modules' causal flags must be cleared.
    `route` forces the bidirectional route (the probes compare them); None lets `switch_route` decide."""
    if mode not in ATTENTION_MODES:
        raise UllmeError(f"unknown attention mode '{mode}' (choose from {', '.join(ATTENTION_MODES)})")
    if mode == "causal":  # a stock folder's config says is_causal: false; GRL scores causally all the same
        flag = route != "mask" and config_switch_honoured(model)
        return {"attention_mask": attention_mask, **({"is_causal": True} if flag else {})}, False
    if (route or switch_route(model, attention_mask.shape[-1])) == "config":
        return {"attention_mask": attention_mask, "is_causal": False}, False
    return {"attention_mask": bidirectional_mask(attention_mask, mask_dtype(model))}, True


# CPU flash attention's backward pass costs 3-5x its forward on short rows. The math route (matmul, softmax,
# matmul, differentiated op by op) made a bf16 training step 8% (contrastive) to 15% (GRL) faster at 64
# tokens; flash wins past about 192 tokens (docs/benchmarks.md, 2026-12-03, the EPYC with avx512_bf16).
MATH_ATTENTION_MAX_TOKENS = 128


def attention_kernel(model: nn.Module, input_ids: torch.Tensor):
    """The math SDPA route for a CPU pass that will be differentiated, on rows of at most
    MATH_ATTENTION_MAX_TOKENS tokens; else SDPA's own choice. The same attention either way (equal to
    float32 rounding). Not under gradient checkpointing: its recomputation in the backward pass runs outside
    this context, and a route that saves other tensors than the forward's fails its check."""
    if (
        input_ids.device.type == "cpu" and torch.is_grad_enabled() and input_ids.shape[-1] <= MATH_ATTENTION_MAX_TOKENS
        and not any(getattr(m, "gradient_checkpointing", False) for m in decoder_of(model).modules())
    ):  # fmt: skip
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: AttentionMode, route: str | None = None
) -> torch.Tensor:
    """Last-layer hidden states (batch, L, d) of the decoder body, in the requested attention mode."""
    body = decoder_of(model)
    inputs, clear_flags = _switched_inputs(model, attention_mask, mode, route)
    inputs.update(input_ids=input_ids, position_ids=position_ids_for(attention_mask))
    with non_causal_modules(body) if clear_flags else nullcontext(), attention_kernel(model, input_ids):
        return _run_body(model, body, **inputs)


def segment_mask(segments: torch.Tensor, dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """A (rows, 1, C, C) additive mask for packed rows (`segments`: 0 for padding, k > 0 for the row's k-th
    text): a token sees the tokens of its own text only (the earlier ones only, when `causal`). A padding
    position sees itself, so that no softmax row is empty."""
    same = segments[:, :, None] == segments[:, None, :]
    allowed = same & (segments[:, None, :] > 0)
    if causal:
        allowed &= torch.ones(segments.shape[-1], segments.shape[-1], dtype=torch.bool, device=segments.device).tril()
    allowed |= torch.eye(segments.shape[-1], dtype=torch.bool, device=segments.device)
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_hidden_states(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor, mode: AttentionMode) -> torch.Tensor:
    """Last-layer hidden states (rows, C, d) of packed rows: several texts end to end in each row, each text
    with its own positions from 0 and attention only within itself (`segment_mask`), so every text gets the
    states it gets alone in a padded batch. Always ullme's 4-D mask route: transformers' `is_causal` flag
    cannot express a block-diagonal mask, so the attention modules' causal flags are cleared for the call."""
    if mode not in ATTENTION_MODES:
        raise UllmeError(f"unknown attention mode '{mode}' (choose from {', '.join(ATTENTION_MODES)})")
    body = decoder_of(model)
    mask = segment_mask(segments, mask_dtype(model), causal=mode == "causal")
    with non_causal_modules(body), attention_kernel(model, input_ids):
        return _run_body(model, body, input_ids=input_ids, attention_mask=mask, position_ids=position_ids)


def lm_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: AttentionMode, keep: torch.Tensor | None = None,
    route: str | None = None,
) -> torch.Tensor:
    """Logits (batch, len(keep) or L, vocab) exactly as the model's own causal-LM head gives them.

    The model's forward applies whatever its family adds after the LM head (Gemma's softcapping, Granite's
    `logits_scaling`, Cohere's `logit_scale`, ...), so no family is special-cased here. `keep` lists the
    sequence positions whose logits are needed (transformers' `logits_to_keep`); None keeps all.
    """
    inputs, clear_flags = _switched_inputs(model, attention_mask, mode, route)
    kwargs = dict(input_ids=input_ids, position_ids=position_ids_for(attention_mask), logits_to_keep=keep if keep is not None else 0, use_cache=False)
    with non_causal_modules(decoder_of(model)) if clear_flags else nullcontext(), attention_kernel(model, input_ids):
        return model(**inputs, **kwargs).logits


@torch.inference_mode()
def verify_bidirectional(model: nn.Module, token_ids: tuple[int, int, int, int] = (1, 2, 3, 4)) -> None:
    """Prove on this very model that bidirectional mode reaches backwards, and causal mode does not.

    Changing the last token must move the first token's state in bidirectional mode only. A model for
    which this fails raises instead of silently embedding causally.
    """
    check_supported(model)
    device = decoder_of(model).get_input_embeddings().weight.device
    a = torch.tensor([list(token_ids)], device=device)
    b = a.clone()
    b[0, -1] = token_ids[0]
    mask = torch.ones_like(a)
    states = {m: [hidden_states(model, x, mask, m)[0, 0].float() for x in (a, b)] for m in ATTENTION_MODES}
    if torch.allclose(*states["bidirectional"], atol=1e-6, rtol=0):
        raise UnsupportedArchitectureError(
            f"bidirectional attention had no effect on architecture '{decoder_of(model).config.model_type}'"
        )
    if not torch.allclose(*states["causal"], atol=1e-4, rtol=1e-3):
        raise UnsupportedArchitectureError(
            f"causal attention leaked future tokens on architecture '{decoder_of(model).config.model_type}'"
        )
