"""Swin-UNet denoiser, layer-for-layer equivalent to ResShift's `UNetModelSwin`.

Module names follow ResShift's state dict (input_blocks.i.j..., middle_block, output_blocks, out,
time_embed) so released checkpoints load with strict=True.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .layers import SinusoidalTimestep, Upsample, normalization
from .swin import SwinStage


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep injected as FiLM (scale-shift) or as an added bias."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool, dropout: float
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # residual branch starts as identity
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the ResBlocks in it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class SwinUNet(nn.Module):
    """UNet with ResBlocks and Swin stages, conditioned on timestep and on the low-resolution input.

    forward(x_t, t, lq): x_t (B, C, H, W) scaled latent, t (B,) integer step indices, lq (B, 3, H, W)
    the low-resolution frames in [-1, 1] (same size as the latent: lq_size == image_size). Returns
    the network output (x0 prediction for ResShift) with `out_channels` channels.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        swin_depth: int = 2,
        swin_embed_dim: int = 96,
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        cond_lq: bool = True,
        lq_size: int | None = None,
        lq_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        if lq_size is not None and lq_size != image_size:
            # ResShift's strided feature extractor (lq larger than the latent) is not needed here
            raise ValueError("only lq_size == image_size is supported (lq concatenated at the latent size)")
        self.image_size, self.model_channels = image_size, model_channels
        self.cond_lq = cond_lq
        heads = num_heads if num_head_channels == -1 else swin_embed_dim // num_head_channels
        emb_dim = model_channels * 4

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, use_scale_shift_norm, dropout)

        def swin(ch: int, ds: int) -> SwinStage:
            return SwinStage(ch, swin_embed_dim, heads, window_size, swin_depth, ds, mlp_ratio)

        self.timestep = SinusoidalTimestep(model_channels)
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        ch = input_ch = int(channel_mult[0] * model_channels)
        first_in = in_channels + (lq_channels if cond_lq else 0)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(first_in, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = image_size  # ResShift names levels by their spatial size
        for level, mult in enumerate(channel_mult):
            for j in range(num_res_blocks[level]):
                out = int(mult * model_channels)
                layers: list[nn.Module] = [res(ch, out)]
                ch = out
                if ds in attention_resolutions and j == 0:
                    layers.append(swin(ch, ds))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds //= 2

        self.middle_block = TimestepSequential(res(ch, ch), swin(ch, ds), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                out = int(model_channels * mult)
                layers = [res(ch + skip_chans.pop(), out)]
                ch = out
                if ds in attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds *= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1)
        )

    @classmethod
    def from_resshift_config(cls, cfg: Mapping[str, Any]) -> SwinUNet:
        """Build from a ResShift `unet_config` (its `params` dict, or the dict holding `params`)."""
        params = dict(cfg.get("params", cfg))
        for unused in ("dims", "use_fp16", "conv_resample", "resblock_updown", "patch_norm", "cond_mask"):
            value = params.pop(unused, None)
            if unused in ("resblock_updown", "patch_norm", "cond_mask") and value:
                raise ValueError(f"unet_config: {unused}=true is not supported")
            if unused == "dims" and value not in (None, 2):
                raise ValueError("unet_config: only dims=2 is supported")
            if unused == "conv_resample" and value is False:
                raise ValueError("unet_config: only conv_resample=true is supported")
        return cls(**params)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.time_embed(self.timestep(timesteps))
        if lq is not None:
            if not self.cond_lq:
                raise ValueError("this UNet was built without lq conditioning")
            x = torch.cat([x, lq.type(x.dtype)], dim=1)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
