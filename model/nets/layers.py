"""Small building blocks shared by the denoiser and the autoencoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as in guided-diffusion)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation: 32 groups, default eps (channels must be a multiple of 32)."""
    return GroupNorm32(32, channels)


class SinusoidalTimestep(nn.Module):
    """cos/sin embedding of (possibly fractional) timesteps, guided-diffusion convention.

    The frequencies live in a non-persistent buffer so the module has no state-dict entry
    (keeping key compatibility) and no arange in the traced graph.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.reshape(-1, 1).float() * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (the UNet and the VQGAN decoder; the state-dict key is `conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
