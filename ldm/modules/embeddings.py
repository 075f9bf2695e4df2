"""Timestep embeddings: sinusoidal features of t followed by an MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (possibly fractional) timesteps ``t`` (B,) -> (B, dim).

    The [cos, sin] order and the frequencies exp(-ln(max_period)·i/half) are those of DDPM/LDM, so that
    imported Stable Diffusion weights see the features they were trained on.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Sequential):
    """sinusoid(t) -> Linear -> SiLU -> Linear, giving the vector every ResBlock is conditioned on."""

    def __init__(self, model_channels: int, embed_dim: int):
        super().__init__(nn.Linear(model_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.model_channels = model_channels

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.model_channels)
        return super().forward(features.to(self[0].weight.dtype))
