"""Networks of the CineSR latent diffusion model (ResShift-compatible state dicts)."""

from .stats import model_stats
from .unet import SwinUNet
from .vqgan import VQGAN

__all__ = ["SwinUNet", "VQGAN", "model_stats"]
