"""VQ-f4 autoencoder, equivalent to LDM's Encoder/Decoder + VectorQuantizer2 as ResShift's VQModelTorch.

encode() returns the continuous latent (after quant_conv, before quantisation); decode() snaps it to
the nearest codebook entry, then decodes. Module names match LDM's state dict.

Three options beyond LDM's, for small models trained on crops (the bundled `tiny`), none of which adds
a parameter: `n_embed: 0` drops the codebook (a continuous latent: quantisation is a ceiling on fidelity
that a small codebook makes low); `ddconfig.norm: none` drops the GroupNorms (a fully convolutional
network behaves the same on a crop as on a whole frame; GroupNorm statistics of a crop differ from those
of the frame); `ddconfig.skip: true` makes the first 3 latent channels a low-resolution image: the encoder
adds the f x f block means of its input to them and the decoder adds their bicubic enlargement to its
output, so the networks learn only the detail around an image they get for free (from the first step
on, reconstruction is as good as bicubic upsampling; a small network trained on a CPU would take long to
learn that map by itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Upsample

NORMS = ("group", "none")


def _norm(channels: int, kind: str = "group") -> nn.Module:
    return nn.GroupNorm(32, channels, eps=1e-6) if kind == "group" else nn.Identity()


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head full self-attention over all positions (LDM's 'vanilla' attention)."""

    def __init__(self, channels: int, norm: str = "group") -> None:
        super().__init__()
        self.norm = _norm(channels, norm)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        c = self.channels
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2)  # (B, C, HW)
        v = self.v(h).flatten(2)  # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(x.shape)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv with LDM's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _mid(channels: int, dropout: float, attention: bool, norm: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, norm)
    mid.attn_1 = AttnBlock(channels, norm) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout, norm)
    return mid


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, dropout, norm))
                block_in = ch * mult
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, norm))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, dropout, mid_attention, norm)
        self.norm_out = _norm(block_in, norm)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm: str = "group",
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout, mid_attention, norm)
        ups: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout, norm))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, norm))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)  # stored lowest level first, as LDM does
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in, norm)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser with a straight-through gradient."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, H, W) index of the nearest code for each latent vector of z (B, D, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, the same expression as LDM so ties resolve identically
        dist = (flat**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zq = self.embedding(self.indices(z)).permute(0, 3, 1, 2)
        return z + (zq - z).detach()


class NoQuantizer(nn.Module):
    """The continuous-latent choice (`n_embed: 0`): decode() passes latents through unchanged."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class VQGAN(nn.Module):
    """VQ-f4 autoencoder: 3-channel image in [-1, 1] <-> `embed_dim`-channel latent at 1/4 the size."""

    def __init__(self, ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int) -> None:
        super().__init__()
        dd = dict(ddconfig)
        if dd.get("double_z", False):
            raise ValueError("ddconfig.double_z must be false for a VQ autoencoder")
        attn_type = dd.get("attn_type", "vanilla")
        if attn_type not in ("vanilla", "none"):
            raise ValueError(f"ddconfig.attn_type {attn_type!r} is not supported (vanilla or none)")
        norm = dd.get("norm", "group")
        self.skip = bool(dd.get("skip", False))
        if self.skip and (n_embed > 0 or embed_dim < dd["in_channels"]):
            raise ValueError("ddconfig.skip needs a continuous latent (n_embed 0) with embed_dim >= in_channels")
        if norm not in NORMS:
            raise ValueError(f"ddconfig.norm {norm!r} is not supported ({' or '.join(NORMS)})")
        common = {
            "ch": dd["ch"],
            "ch_mult": list(dd["ch_mult"]),
            "num_res_blocks": int(dd["num_res_blocks"]),
            "attn_resolutions": list(dd.get("attn_resolutions", [])),
            "resolution": dd["resolution"],
            "z_channels": dd["z_channels"],
            "dropout": float(dd.get("dropout", 0.0)),
            "mid_attention": attn_type == "vanilla",
            "norm": norm,
        }
        self.encoder = Encoder(in_channels=dd["in_channels"], **common)
        self.decoder = Decoder(out_ch=dd["out_ch"], **common)
        self.quantize: nn.Module = VectorQuantizer(n_embed, embed_dim) if n_embed > 0 else NoQuantizer()
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)
        self.downsample_factor = 2 ** (len(common["ch_mult"]) - 1)

    @classmethod
    def from_resshift_config(cls, cfg: Mapping[str, Any]) -> VQGAN:
        """Build from a ResShift `autoencoder_config` (its `params` dict, or the dict holding `params`)."""
        params = cfg.get("params", cfg)
        return cls(params["ddconfig"], int(params["n_embed"]), int(params["embed_dim"]))

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Latent before quantisation, (B, embed_dim, H/f, W/f)."""
        z = self.quant_conv(self.encoder(img))
        if self.skip:
            c, f = img.shape[1], self.downsample_factor
            z = torch.cat([z[:, :c] + F.avg_pool2d(img, f), z[:, c:]], dim=1)
        return z

    @property
    def quantized(self) -> bool:
        return isinstance(self.quantize, VectorQuantizer)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Quantise z to the nearest codes (unless quantize=False or there is no codebook), then decode."""
        if quantize:
            z = self.quantize(z)
        out = self.decoder(self.post_quant_conv(z))
        if self.skip:
            c = out.shape[1]
            out = out + F.interpolate(z[:, :c], scale_factor=self.downsample_factor, mode="bicubic",
                                      align_corners=False)
        return out

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(img))


class _Bound(nn.Module):
    """A VQGAN method as a module of its own, for tracing/exporting encode and decode separately."""

    def __init__(self, vqgan: VQGAN, method: str) -> None:
        super().__init__()
        self.vqgan, self.method = vqgan, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.vqgan, self.method)(x)


def encoder_graph(vqgan: VQGAN) -> nn.Module:
    """Module computing vqgan.encode (image -> unquantised latent), e.g. for torch.onnx.export."""
    return _Bound(vqgan, "encode")


def decoder_graph(vqgan: VQGAN) -> nn.Module:
    """Module computing vqgan.decode (latent -> quantise -> image), e.g. for torch.onnx.export."""
    return _Bound(vqgan, "decode")
