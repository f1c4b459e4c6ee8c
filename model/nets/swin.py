"""Swin transformer stage as ResShift uses it inside the UNet (channels-first, GroupNorm, 1x1-conv MLP).

Shapes are fixed when the module is built (latent resolution), so the attention mask and the
relative-position index are buffers and the forward pass has no shape-dependent Python logic;
that keeps the graph exportable to ONNX/TensorRT.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import normalization

MASK_VALUE = -100.0  # the large negative bias ResShift/Swin use for cross-region pairs


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for tokens p, q of one window (row-major tokens)."""
    rows = torch.arange(window).repeat_interleave(window)
    cols = torch.arange(window).repeat(window)
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    return d_row * (2 * window - 1) + d_col


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask for the shifted windows, exactly as ResShift's released models hold it.

    ResShift's `calculate_mask` indexes a (1, 1, H, W) tensor as if it were (1, H, W, 1) and then
    flattens the window transposed. The net effect: only the row thresholds count (H - w, H - shift),
    and a token at local (i, j) in window row `wr` is labelled by global row `wr * w + j`. The
    released checkpoints carry this mask as a buffer, so a freshly built network must compute the
    same one to behave like them.
    """
    row_label = torch.zeros(height, dtype=torch.float32)
    row_label[height - window : height - shift] = 1.0
    row_label[height - shift :] = 2.0
    n_wr, n_wc = height // window, width // window
    local_col = torch.arange(window).repeat(window)  # j of token p = i * w + j
    masks = []
    for wr in range(n_wr):
        labels = row_label[wr * window + local_col]  # (N,)
        diff = labels[:, None] - labels[None, :]
        m = torch.where(diff != 0, torch.tensor(MASK_VALUE), torch.tensor(0.0))
        masks.extend([m] * n_wc)
    return torch.stack(masks)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B * nW, N, C)
        n = self.window * self.window
        heads, hd = self.num_heads, self.dim // self.num_heads
        qkv = self.qkv(x).reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B*nW, heads, N, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_win = mask.shape[0]
            attn = attn.reshape(-1, n_win, heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, heads, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, self.dim)
        return self.proj(out)


class ConvMlp(nn.Module):
    """Two 1x1 convolutions with GELU (the Swin MLP, channels-first)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-normed with GroupNorm, on (B, C, H, W) maps."""

    def __init__(
        self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        if resolution <= window:  # one window covers the map: no partition, no shift
            window, shift = resolution, 0
        self.dim, self.resolution, self.window, self.shift = dim, resolution, window, shift
        self.norm1 = normalization(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = normalization(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        c, w, nw = self.dim, self.window, x.shape[-1] // self.window
        x = x.reshape(-1, c, x.shape[-2] // w, w, nw, w).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, w * w, c)

    def _merge(self, windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
        c, w = self.dim, self.window
        x = windows.reshape(-1, height // w, width // w, w, w, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        h = self.norm1(x)
        if self.shift > 0:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(2, 3))
        mask = self.attn_mask
        if mask is not None and not torch.jit.is_tracing() and (height, width) != (self.resolution,) * 2:
            # eager-only path for other map sizes; exported graphs always use the buffer
            mask = shifted_window_mask(int(height), int(width), self.window, self.shift).to(x)
        h = self._merge(self.attn(self._partition(h), mask), height, width)
        if self.shift > 0:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """1x1 embed -> `depth` Swin blocks (alternately shifted) -> 1x1 unembed (ResShift's BasicLayer)."""

    def __init__(
        self,
        channels: int,
        embed_dim: int,
        num_heads: int,
        window: int,
        depth: int,
        resolution: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, embed_dim, 1)
        self.patch_unembed = nn.Module()
        self.patch_unembed.proj = nn.Conv2d(embed_dim, channels, 1)
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed.proj(x)
