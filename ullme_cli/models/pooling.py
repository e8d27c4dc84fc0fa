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


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention (Lee et al., 2024): token states query a trainable latent array.

    O = softmax(Q Kᵀ/√d_h) V with Q = H W_q and K = V-source = latents (r × d), per head;
    Y = O W_o + MLP(O W_o); the vector is the mean of Y over content tokens.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8):
        super().__init__()
        if hidden_size % num_heads:
            raise UllmeError(f"latent attention: hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.config = {"hidden_size": hidden_size, "num_latents": num_latents, "num_heads": num_heads}
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size))

    def forward(self, states: torch.Tensor, content_mask: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(states.dtype).unsqueeze(0).expand(states.shape[0], -1, -1)
        attended, _ = self.attention(states, latents, latents, need_weights=False)
        return masked_mean(attended + self.mlp(attended), content_mask)

    def save(self, folder: Path) -> None:
        save_file({k: v.detach().contiguous().float().cpu() for k, v in self.state_dict().items()}, folder / LATENT_WEIGHTS)
        (folder / LATENT_CONFIG).write_text(json.dumps(self.config))

    @classmethod
    def load(cls, folder: Path) -> "LatentAttentionPooling":
        head = cls(**json.loads((folder / LATENT_CONFIG).read_text()))
        head.load_state_dict(load_file(folder / LATENT_WEIGHTS))
        return head


class Pooler(nn.Module):
    def __init__(self, name: str, hidden_size: int, latent: LatentAttentionPooling | None = None):
        super().__init__()
        self.name = check_pooling(name)
        if name == "latent-attention":
            self.latent = latent or LatentAttentionPooling(hidden_size)

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
