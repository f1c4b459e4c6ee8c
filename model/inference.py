"""A bundle's networks in memory as a WindowRunner: what evaluation, validation and the card run.

The same arithmetic as the worker's torch engine (encode the bicubic-upsampled window, run the
sampler plan, decode), so `cinesr evaluate` and the model card measure what `cinesr superresolve`
and the service produce (a test holds the two to the bit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .bundle import ModelBundle
from .diffusion import SamplerPlan, run_plan, upsample_lq
from .windows import Geometry


class TorchRunner:
    """Runs windows through a bundle's VQGAN and UNet on the bundle's device, in float32."""

    def __init__(self, bundle: ModelBundle, steps: int | None = None, sampler: str = "ancestral",
                 temperature: float = 1.0) -> None:
        self.bundle = bundle
        self.geometry = Geometry.from_config(bundle.config, bundle.autoencoder.downsample_factor)
        self.plan = SamplerPlan.from_schedule(bundle.schedule, steps, sampler, temperature)
        self.unet = bundle.unet_for(self.plan.steps)  # the distilled student for its step counts

    @classmethod
    def for_options(cls, bundle: ModelBundle, options: Any) -> TorchRunner:
        """A runner with the sampler of pipeline Options (steps, sampler, temperature), as they run on this
        bundle (Options.for_model)."""
        o = options.for_model(bundle.student_steps)
        return cls(bundle, o.steps, o.sampler, o.temperature)

    @torch.inference_mode()
    def latents(self, lq: torch.Tensor, noise: torch.Tensor,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(B, 3, s, s) lq windows in [-1, 1]-ish model units -> the sampler's final latents."""
        device = self.bundle.device
        lq = lq.to(device, torch.float32)
        y = self.bundle.autoencoder.encode(upsample_lq(lq, self.geometry.sf))
        unet = self.unet

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return unet(x, t, lq=cond).float()

        return run_plan(denoise, y, lq, self.plan, noise.to(device), on_step)

    @torch.inference_mode()
    def superresolve(self, lq: torch.Tensor, noise: torch.Tensor,
                     on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(B, 3, s, s) lq windows -> (B, 3, 4s, 4s) on the CPU, float32."""
        z = self.latents(lq, noise, on_step)
        return self.bundle.autoencoder.decode(z.float()).float().cpu()
