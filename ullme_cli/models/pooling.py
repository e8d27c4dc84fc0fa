"""Pooling: token states (batch, L, d) -> one vector per text.

Two masks come in. `attention_mask` marks real tokens (any padding side). `content_mask` marks the real
tokens that are not part of the instruction: mean, weighted-mean and latent-attention average over it,
so the instruction steers the states without being averaged into the vector (GritLM, ULLME).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ullme_cli.constants import POOLINGS
from ullme_cli.errors import UllmeError

LATENT_WEIGHTS = "latent_attention.safetensors"
LATENT_CONFIG = "latent_attention.json"


def check_pooling(name: str) -> str:
    if name not in POOLINGS:
        raise UllmeError(f"unknown pooling '{name}' (choose from {', '.join(POOLINGS)})")
    return name


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left and right padding alike."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(-1).int().argmax(-1)


def first_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.int().argmax(-1)


def masked_mean(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def position_weights(content_mask: torch.Tensor) -> torch.Tensor:
    """SGPT weighted mean: the i-th content token weighs i, so later tokens (which saw more) count more."""
    return content_mask.long().cumsum(-1) * content_mask.long()


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * nn.functional.gelu(gates)


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention (Lee et al., 2024): token states query a trainable latent array (r × d).

    form "released" (default; NV-Embed's published model code), pre-norm with residuals:
        X = H + Attn(LN(H), LN_c(latents))      Y = X + FF(LN(X)),  FF = Linear(d, 8d) · GEGLU · Linear(4d, d)
    form "paper" (the paper's formula):
        O = Attn(H, latents)                    Y = O + MLP(O),     MLP = Linear(d, 4d) · GELU · Linear(4d, d)
    Attn has `num_heads` heads, queries from the tokens, keys and values from the latents. The vector is the
    mean of Y over content tokens. In the released form the attention output and the FF's last layer start
    at zero, so an untrained head gives exactly mean pooling, and training moves it from there.
    """

    FORMS = ("released", "paper")

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, form: str = "released"):
        super().__init__()
        if hidden_size % num_heads:
            raise UllmeError(f"latent attention: hidden size {hidden_size} is not divisible by {num_heads} heads")
        if form not in self.FORMS:
            raise UllmeError(f"latent attention: unknown form '{form}' (choose from {', '.join(self.FORMS)})")
        self.form = form
        self.config = {"hidden_size": hidden_size, "num_latents": num_latents, "num_heads": num_heads, "form": form}
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        if form == "paper":
            self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size))
            return
        self.norm = nn.LayerNorm(hidden_size)
        self.norm_latents = nn.LayerNorm(hidden_size)
        self.norm_ff = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(nn.Linear(hidden_size, 8 * hidden_size), GEGLU(), nn.Linear(4 * hidden_size, hidden_size))
        for zero in (self.attention.out_proj, self.ff[-1]):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, states: torch.Tensor, content_mask: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(states.dtype).unsqueeze(0).expand(states.shape[0], -1, -1)
        if self.form == "paper":
            attended, _ = self.attention(states, latents, latents, need_weights=False)
            return masked_mean(attended + self.mlp(attended), content_mask)
        context = self.norm_latents(latents)
        attended, _ = self.attention(self.norm(states), context, context, need_weights=False)
        x = states + attended
        return masked_mean(x + self.ff(self.norm_ff(x)), content_mask)

    def save(self, folder: Path) -> None:
        save_file({k: v.detach().contiguous().float().cpu() for k, v in self.state_dict().items()}, folder / LATENT_WEIGHTS)
        (folder / LATENT_CONFIG).write_text(json.dumps(self.config))

    @classmethod
    def load(cls, folder: Path) -> "LatentAttentionPooling":
        config = json.loads((folder / LATENT_CONFIG).read_text())
        head = cls(**{"form": "paper", **config})  # heads saved before the released form existed are the paper's
        head.load_state_dict(load_file(folder / LATENT_WEIGHTS))
        return head


class Pooler(nn.Module):
    def __init__(self, name: str, hidden_size: int, latent: LatentAttentionPooling | None = None):
        super().__init__()
        self.name = check_pooling(name)
        if name.startswith("latent-attention"):
            self.latent = latent or LatentAttentionPooling(hidden_size, form="paper" if name.endswith("-paper") else "released")

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor, content_mask: torch.Tensor) -> torch.Tensor:
        # A text truncated inside its instruction has no content tokens: pool its real tokens instead.
        empty = content_mask.sum(-1, keepdim=True) == 0
        content_mask = torch.where(empty, attention_mask, content_mask)
        rows = torch.arange(states.shape[0], device=states.device)
        if self.name == "mean":
            return masked_mean(states, content_mask)
        if self.name == "weighted-mean":
            return masked_mean(states, position_weights(content_mask))
        if self.name == "last-token":
            return states[rows, last_token_index(attention_mask)]
        if self.name == "cls":
            return states[rows, first_token_index(attention_mask)]
        return self.latent(states, content_mask)
