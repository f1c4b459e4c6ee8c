"""Size and cost of a model configuration (parameters, GFLOPs per UNet step and per 3-frame window)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .unet import SwinUNet
from .vqgan import VQGAN


def _gflops(fn: Any, *args: Any, **kwargs: Any) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 1e9


def model_stats(cfg: Mapping[str, Any], image_size: int = 256) -> dict[str, float]:
    """Parameter counts (millions) and GFLOPs (2 x multiply-adds, matmul/conv only, as counted by
    torch's FlopCounterMode) for one window: VQGAN encode at `image_size`^2 x 3, `steps` UNet
    evaluations on the latent, VQGAN decode."""
    # meta tensors: shapes only, so counting the base model costs no compute and no memory
    with torch.device("meta"):
        unet = SwinUNet.from_resshift_config(cfg["unet_config"]).eval()
        ae = VQGAN.from_resshift_config(cfg["autoencoder_config"]).eval()
    diffusion = cfg.get("diffusion") or {}
    steps = int(diffusion.get("params", diffusion).get("steps", 15))
    size = image_size // ae.downsample_factor
    img = torch.zeros(1, 3, image_size, image_size, device="meta")
    z = torch.zeros(1, ae.quant_conv.out_channels, size, size, device="meta")
    lq = torch.zeros(1, 3, size, size, device="meta")
    enc = _gflops(ae.encode, img)
    step = _gflops(unet, z, torch.zeros(1, dtype=torch.long, device="meta"), lq=lq)
    dec = _gflops(ae.decode, z)
    return {
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "vqgan_params_m": sum(p.numel() for p in ae.parameters()) / 1e6,
        "steps": steps,
        "gflops_encode": enc,
        "gflops_unet_step": step,
        "gflops_decode": dec,
        "gflops_window": enc + steps * step + dec,
    }
