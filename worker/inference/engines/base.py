"""The inference-engine interface shared by the torch, onnxruntime and TensorRT backends.

An engine runs the three graphs of the model at the pipeline's fixed shapes:

    encode(images (B, 3, 256, 256) in [-1, 1])  -> latents (B, 3, 64, 64)
    denoise(x_scaled, t (B,) int64, lq (B, 3, 64, 64)) -> x0 prediction (B, 3, 64, 64)
    decode(latents) -> images (B, 3, 256, 256)

and the whole residual-shifting sampling loop on top of them (`sample`, `superresolve`). Tensors cross
the interface as torch tensors (CPU or the engine's CUDA device); the start and per-step noise is drawn
by the caller and handed in, so every backend computes the same chain for the same seed, whatever the
batch composition.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cinesr.model.bundle import DEFAULT_BUNDLE, load_bundle, served_steps
from cinesr.model.bundle import state_digest as state_hash
from cinesr.model.configs import load_config
from cinesr.model.diffusion import SamplerPlan, Schedule, draw_noise, run_plan, upsample_lq
from cinesr.model.nets import VQGAN, SwinUNet
from cinesr.model.windows import Geometry

__all__ = ["Engine", "EngineUnavailable", "Geometry", "LoadedModel", "SamplerPlan", "draw_noise", "load_model"]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass
class LoadedModel:
    """Networks + schedule of one model, and where they came from (for cache keys and model.json)."""

    config: dict[str, Any]
    unet: SwinUNet
    vqgan: VQGAN
    schedule: Schedule
    geometry: Geometry
    source: dict[str, Any]  # {"kind": "bundle"|"config", "path"/"name", "sha256", "version"}
    bundle_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the bundle's model.json, if any
    student: SwinUNet | None = None  # a distilled few-step UNet, when the bundle has one

    @property
    def student_steps(self) -> tuple[int, ...]:
        """Sampler step counts the student serves (empty without one)."""
        return served_steps(self.student, self.meta)

    @property
    def weights_hash(self) -> str:
        return str(self.source["sha256"])


def _from_config(cfg: dict[str, Any], seed: int, source: dict[str, Any]) -> LoadedModel:
    # seeded initialisation without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = SwinUNet.from_resshift_config(cfg["unet_config"]).eval()
        vqgan = VQGAN.from_resshift_config(cfg["autoencoder_config"]).eval()
    for p in [*unet.parameters(), *vqgan.parameters()]:
        p.requires_grad_(False)
    source = {**source, "sha256": state_hash(unet, vqgan)}
    geometry = Geometry.from_config(cfg, vqgan.downsample_factor)
    return LoadedModel(cfg, unet, vqgan, Schedule.from_config(cfg["diffusion"]), geometry, source)


def _from_bundle(path: Path) -> LoadedModel:
    """The one place that knows the bundle format (cinesr.model.bundle)."""
    b = load_bundle(path)
    unet, vqgan, cfg = b.unet.eval(), b.autoencoder.eval(), dict(b.config)
    cfg.setdefault("diffusion", {})
    nets = (unet, vqgan) if b.student is None else (unet, vqgan, b.student)
    source = {"kind": "bundle", "path": str(path), "name": b.name, "version": b.version,
              "sha256": state_hash(*nets)}
    return LoadedModel(
        cfg, unet, vqgan, Schedule.from_config(cfg["diffusion"]), Geometry.from_config(cfg, vqgan.downsample_factor),
        source, path, dict(b.meta), b.student
    )


def default_model() -> str | Path:
    """The bundled trained tiny model where it exists, else the tiny config (random, seeded weights)."""
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "model.json").is_file() else "tiny"


def load_model(model: str | Path | Mapping[str, Any] | LoadedModel | None = None, seed: int = 0) -> LoadedModel:
    """A model bundle folder (with model.json), a config name ('tiny', 'base'), a config YAML path or a
    config dict (random weights seeded with `seed`), or None for `default_model()`."""
    if isinstance(model, LoadedModel):
        return model
    if model is None:
        model = default_model()
    if isinstance(model, Mapping):
        return _from_config(dict(model), seed, {"kind": "config", "name": str(model.get("name", "custom"))})
    path = Path(model)
    if path.is_dir():
        if not (path / "model.json").is_file():
            raise ValueError(f"{path}: not a model bundle (no model.json)")
        return _from_bundle(path)
    cfg = load_config(model)
    return _from_config(cfg, seed, {"kind": "config", "name": str(cfg.get("name", model)), "seed": seed})


class EngineUnavailable(RuntimeError):
    """A backend cannot run here (library missing, no GPU, ...); the message says why."""


class Engine(ABC):
    """One backend running one model on one device. Subclasses implement encode/denoise/decode; the
    sampling loop here works for all of them, and backends may replace it with a faster one."""

    name: str = "engine"

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.geometry = model.geometry
        self.plan = SamplerPlan.from_schedule(model.schedule)

    @property
    def preferred_batch(self) -> int:
        """Windows per call that run fastest: 1 on CPU (a 256x256 window's activations already
        overflow the caches; measured slower per window at 2 and 4), 8 on a GPU."""
        return 8 if self.device.type == "cuda" else 1

    def set_steps(self, steps: int | None, sampler: str = "ancestral", temperature: float = 1.0) -> None:
        """Sample with `steps` of the model's T steps (None: all of them), with that sampler and noise
        temperature (see cinesr.model.diffusion.SamplerPlan)."""
        plan = SamplerPlan.from_schedule(self.model.schedule, steps, sampler, temperature)
        if plan != self.plan:
            self.plan = plan
            self._plan_changed()

    @property
    def runs_student(self) -> bool:
        """Whether the current plan runs the distilled student (a step count it serves), not the teacher."""
        return self.plan.steps in self.model.student_steps

    def _plan_changed(self) -> None:  # noqa: B027 - optional hook
        """Drop anything captured for the previous plan (CUDA graphs)."""

    # -- the three graphs -------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [-1, 1] -> (B, 3, S/4, S/4) unquantised latents."""

    @abstractmethod
    def denoise(self, x_scaled: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """One UNet evaluation: scaled latent, (B,) int64 step, lq frames -> x0 prediction."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> quantise -> (B, 3, S, S) images."""

    # -- the loop -----------------------------------------------------------------------------
    def sample(
        self, y: torch.Tensor, lq: torch.Tensor, noise: torch.Tensor, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """The whole sampling loop from the shift target y (latent of the upsampled lq); noise is
        (steps, B, C, h, w) as from draw_noise. Returns the final latent on the engine's device."""
        y, lq, noise = (v.to(self.device) for v in (y, lq, noise))
        return run_plan(self.denoise, y, lq, self.plan, noise, on_step)

    def superresolve(
        self, lq: torch.Tensor, noise: torch.Tensor, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """(B, 3, 64, 64) lq windows in [-1, 1] -> (B, 3, 256, 256) on the CPU, float32."""
        lq = lq.to(self.device, torch.float32)
        y = self.encode(upsample_lq(lq, self.geometry.sf))
        z = self.sample(y, lq, noise, on_step)
        return self.decode(z).float().cpu()

    # -- housekeeping ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What runs where (for logs, bench JSON and the job record)."""
        return {"backend": self.name, "device": str(self.device), "model": self.model.source}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory / sessions."""
