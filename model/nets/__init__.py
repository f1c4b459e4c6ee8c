"""Networks of the CineSR latent diffusion model (ResShift-compatible state dicts)."""

from .stats import model_stats
from .unet import SwinUNet
from .vqgan import VQGAN, decoder_graph, encoder_graph

__all__ = ["SwinUNet", "VQGAN", "decoder_graph", "encoder_graph", "model_stats"]
