# Over 500 lines: every acquisition kind shares one config and one call path; split, they would drift.
"""Synthetic degradation of cine frames: the one code path used by training and by evaluation.

Spatial x4, five kinds (``DegradationConfig.kind``):

* ``"realesrgan"``: the Real-ESRGAN pipeline (Wang et al., ICCVW 2021) with ResShift's ranges.
  First order: blur (isotropic / anisotropic Gaussian, generalised Gaussian, plateau kernels of odd
  size 3-19, sigma 0.2-3, or with probability 0.1 a 2-D sinc) -> random resize (up/down/keep with
  probabilities 0.2/0.7/0.1, scale in [0.15, 1.5], area/bilinear/bicubic) -> Gaussian noise (sigma
  1-30 on the 0-255 scale) or Poisson noise (scale 0.05-3), 40% of it grey -> JPEG (quality 30-95)
  -> final resize to H/4 x W/4 -> 8-bit rounding.
  Optional second order (``second_order_prob``, 0 by default; ResShift trains with 0.5): blur (p 0.8,
  size 3-13, sigma 0.2-1.5) -> resize relative to the target (0.3/0.4/0.3, [0.3, 1.2]) -> noise
  (sigma 1-25 / scale 0.05-2.5) -> then Real-ESRGAN's final stage instead of the plain final resize:
  [resize to target + sinc (p 0.8)] and JPEG in random order.
* ``"bicubic"``: antialiased bicubic downsampling, ``torch.nn.functional.interpolate(mode="bicubic",
  antialias=True, align_corners=False)``, i.e. PIL's bicubic (a = -0.5) with the kernel stretched by
  the scale factor.
* ``"area"``: the mean of each 4x4 block, what a coarser pixel integrates.
* ``"kspace"``: what an MR scanner measures at lower resolution: the central quarter of k-space in
  each direction, sampled at the 4x4 block centres as the area acquisition is (Gibbs ringing
  included), optionally apodised by a Hann-tapered (Tukey) window as
  scanners' reconstruction filters do, back to the image domain as a magnitude image.
* ``"mix"``: per call, one of the kinds above drawn with the weights in ``mix`` (training on varied
  acquisitions).

``bicubic``, ``area`` and ``kspace`` add noise with probability ``noise_prob``: Gaussian with a
standard deviation drawn from ``noise_sigma`` (0-1 scale), in the complex image domain for
``kspace`` (so the magnitude is Rician, as MR noise is), in the image domain otherwise. With the
default ``noise_prob`` 0 they are deterministic.

Frames are float arrays in [0, 1], shaped (C, H, W) -- three consecutive cine frames as channels --
or (H, W). The three frames of a window are one image: one set of parameters (kernel, scale,
interpolation, noise level, grey/colour noise, JPEG quality) applies to all of them. Grey noise is one
noise field shared by the frames (Real-ESRGAN's grey noise); colour noise is independent per frame.
JPEG compresses each frame as a greyscale JPEG with the same quality (MR frames are greyscale; a
colour JPEG would mix frames through YCbCr and chroma subsampling).

All randomness comes from a ``numpy.random.Generator``: ``sample_params`` draws a
``DegradationParams`` record (which includes a seed for the noise fields) and ``apply_degradation``
is a deterministic function of frames and parameters. Temporal decimation is ``decimate_time``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import j1

from .kspace import band
from .phantom_common import area_downsample

__all__ = [
    "KERNEL_TYPES",
    "DegradationConfig",
    "DegradationParams",
    "KernelParams",
    "StageConfig",
    "StageParams",
    "apply_degradation",
    "area_down",
    "bicubic_down",
    "decimate_time",
    "degrade",
    "kspace_down",
    "make_kernel",
    "sample_kernel",
    "sample_params",
]

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")
KINDS = ("realesrgan", "bicubic", "area", "kspace", "mix")


@dataclass(frozen=True)
class StageConfig:
    """Ranges of one degradation order. Defaults: ResShift's first order (realsr_swinunet_realesrgan256)."""

    blur_prob: float = 1.0
    kernel_sizes: tuple[int, ...] = tuple(range(3, 20, 2))  # ResShift: range(3, blur_kernel_size=21, 2)
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on the 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)


SECOND_ORDER = StageConfig(
    blur_prob=0.8,
    kernel_sizes=tuple(range(3, 14, 2)),  # ResShift: range(3, blur_kernel_size2=15, 2)
    blur_sigma=(0.2, 1.5),
    resize_probs=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)


@dataclass(frozen=True)
class DegradationConfig:
    """What ``degrade`` does. ``kind`` selects the acquisition (one of KINDS, see the module docstring)."""

    kind: Literal["realesrgan", "bicubic", "area", "kspace", "mix"] = "realesrgan"
    scale: int = 4
    first: StageConfig = field(default_factory=StageConfig)
    second_order_prob: float = 0.0
    second: StageConfig = SECOND_ORDER
    final_sinc_prob: float = 0.8  # final stage of the second order only
    noise_prob: float = 0.0  # bicubic / area / kspace
    noise_sigma: tuple[float, float] = (0.003, 0.04)
    apodize_prob: float = 0.0  # kspace: Tukey window over the measured band
    mix: dict[str, float] | None = None  # kind "mix": weights of the kinds to draw from

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        """Build from a plain mapping (e.g. a YAML section); nested stages may be partial dicts."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown degradation setting(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = dict(data)
        for stage, base in (("first", StageConfig()), ("second", SECOND_ORDER)):
            if isinstance(kwargs.get(stage), dict):
                kwargs[stage] = _stage_from_dict(base, kwargs[stage])
        if "noise_sigma" in kwargs:
            kwargs["noise_sigma"] = tuple(kwargs["noise_sigma"])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown degradation kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "mix":
            weights = self.mix or {}
            if not weights or any(k not in KINDS or k == "mix" for k in weights) or min(weights.values()) < 0 \
                    or sum(weights.values()) <= 0:
                raise ValueError(f"kind 'mix' needs positive weights of kinds among {', '.join(KINDS[:-1])}")
        if self.scale < 1:
            raise ValueError("scale must be >= 1")
        for stage in (self.first, self.second):
            if any(k % 2 == 0 or k < 1 for k in stage.kernel_sizes):
                raise ValueError("kernel sizes must be odd and positive")
            if not math.isclose(sum(stage.kernel_probs), 1.0, abs_tol=1e-6):
                raise ValueError("kernel_probs must sum to 1")
            if len(stage.kernel_probs) != len(stage.kernel_types):
                raise ValueError("kernel_probs and kernel_types differ in length")
            if not math.isclose(sum(stage.resize_probs), 1.0, abs_tol=1e-6):
                raise ValueError("resize_probs must sum to 1")


def _stage_from_dict(base: StageConfig, data: dict[str, Any]) -> StageConfig:
    values = asdict(base)
    for key, value in data.items():
        if key not in values:
            raise ValueError(f"unknown stage setting {key!r}")
        values[key] = tuple(value) if isinstance(value, list) else value
    return StageConfig(**values)


# ------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class KernelParams:
    """One blur kernel. ``kind`` is one of KERNEL_TYPES or ``"sinc"``."""

    kind: str
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0  # shape of generalised Gaussian / plateau kernels
    omega_c: float = 0.0  # cut-off of the sinc kernel


@dataclass(frozen=True)
class StageParams:
    kernel: KernelParams | None  # None: no blur in this stage
    resize: Literal["up", "down", "keep"]
    resize_scale: float
    resize_mode: str
    noise: Literal["gaussian", "poisson"]
    noise_level: float  # Gaussian sigma (0-255 scale) or Poisson scale
    gray_noise: bool
    jpeg_quality: int | None  # None: no JPEG in this stage (the second order's JPEG is in the final stage)


@dataclass(frozen=True)
class DegradationParams:
    """Everything random about one Real-ESRGAN degradation; ``apply_degradation`` is deterministic in it."""

    first: StageParams
    second: StageParams | None
    final_mode: str
    final_sinc: KernelParams | None = None
    final_jpeg_quality: int | None = None
    sinc_before_jpeg: bool = True
    noise_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # Real-ESRGAN draws the shape below or above 1 with equal probability
    if rng.uniform() < 0.5:
        return float(rng.uniform(bounds[0], 1.0))
    return float(rng.uniform(1.0, bounds[1]))


def sample_kernel(rng: np.random.Generator, stage: StageConfig) -> KernelParams:
    """Draw one blur kernel as Real-ESRGAN's dataset does (size first, then sinc or a mixed kernel)."""
    size = int(rng.choice(stage.kernel_sizes))
    if rng.uniform() < stage.sinc_prob:
        # wider cut-off range for big kernels, as in Real-ESRGAN
        low = math.pi / 3 if size < 13 else math.pi / 5
        return KernelParams("sinc", size, omega_c=_uniform(rng, (low, math.pi)))
    kind = str(rng.choice(stage.kernel_types, p=stage.kernel_probs))
    sigma_x = _uniform(rng, stage.blur_sigma)
    if kind.endswith("_iso") or kind == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = _uniform(rng, stage.blur_sigma)
        theta = _uniform(rng, (-math.pi, math.pi))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _beta(rng, stage.betag_range)
    elif kind.startswith("plateau"):
        beta = _beta(rng, stage.betap_range)
    return KernelParams(kind, size, sigma_x, sigma_y, theta, beta)


def _sample_resize(
    rng: np.random.Generator, stage: StageConfig
) -> tuple[Literal["up", "down", "keep"], float, str]:
    updown = str(rng.choice(("up", "down", "keep"), p=stage.resize_probs))
    if updown == "up":
        scale = _uniform(rng, (1.0, stage.resize_range[1]))
    elif updown == "down":
        scale = _uniform(rng, (stage.resize_range[0], 1.0))
    else:
        scale = 1.0
    mode = str(rng.choice(RESIZE_MODES))
    return updown, scale, mode  # type: ignore[return-value]


def _sample_stage(rng: np.random.Generator, stage: StageConfig, with_jpeg: bool) -> StageParams:
    kernel = sample_kernel(rng, stage) if rng.uniform() < stage.blur_prob else None
    updown, scale, mode = _sample_resize(rng, stage)
    if rng.uniform() < stage.gaussian_noise_prob:
        noise, level = "gaussian", _uniform(rng, stage.noise_range)
    else:
        noise, level = "poisson", _uniform(rng, stage.poisson_scale_range)
    gray = bool(rng.uniform() < stage.gray_noise_prob)
    quality = int(round(_uniform(rng, stage.jpeg_range))) if with_jpeg else None
    return StageParams(kernel, updown, scale, mode, noise, level, gray, quality)  # type: ignore[arg-type]


def sample_params(rng: np.random.Generator, cfg: DegradationConfig | None = None) -> DegradationParams:
    """Draw the parameters of one Real-ESRGAN degradation from ``cfg``'s ranges."""
    cfg = cfg or DegradationConfig()
    first = _sample_stage(rng, cfg.first, with_jpeg=True)
    if rng.uniform() >= cfg.second_order_prob:
        return DegradationParams(
            first, None, final_mode=str(rng.choice(RESIZE_MODES)), noise_seed=int(rng.integers(2**63))
        )
    second = _sample_stage(rng, cfg.second, with_jpeg=False)
    final_sinc = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(cfg.second.kernel_sizes))
        final_sinc = KernelParams("sinc", size, omega_c=_uniform(rng, (math.pi / 3, math.pi)))
    return DegradationParams(
        first,
        second,
        final_mode=str(rng.choice(RESIZE_MODES)),
        final_sinc=final_sinc,
        final_jpeg_quality=int(round(_uniform(rng, cfg.second.jpeg_range))),
        sinc_before_jpeg=bool(rng.uniform() < 0.5),
        noise_seed=int(rng.integers(2**63)),
    )


# ---------------------------------------------------------------------------------------- kernels


def make_kernel(params: KernelParams) -> np.ndarray:
    """The (size, size) float64 kernel described by ``params``, normalised to sum 1."""
    k = params.size
    ax = np.arange(k, dtype=np.float64) - (k - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    if params.kind == "sinc":
        r = np.hypot(xx, yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            kernel = params.omega_c * j1(params.omega_c * r) / (2 * np.pi * r)
        kernel[r == 0] = params.omega_c**2 / (4 * np.pi)  # limit of the expression at the centre
        return kernel / kernel.sum()
    # quadratic form d^T Sigma^-1 d with Sigma = R diag(sx^2, sy^2) R^T
    c, s = math.cos(params.theta), math.sin(params.theta)
    rot = np.array([[c, -s], [s, c]])
    sigma = rot @ np.diag([params.sigma_x**2, params.sigma_y**2]) @ rot.T
    inv = np.linalg.inv(sigma)
    q = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    if params.kind.startswith("plateau"):
        kernel = 1.0 / (np.power(q, params.beta) + 1.0)
    elif params.kind in KERNEL_TYPES:
        # plain Gaussians have beta = 1, generalised ones their drawn shape
        kernel = np.exp(-0.5 * np.power(q, params.beta))
    else:
        raise ValueError(f"unknown kernel kind {params.kind!r}")
    return kernel / kernel.sum()


# ------------------------------------------------------------------------------------- operations


def _filter(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Per-frame 2-D filtering with reflect padding (Real-ESRGAN's filter2D); x is (1, C, H, W)."""
    k = kernel.shape[-1]
    pad = k // 2
    channels = x.shape[1]
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    weight = torch.from_numpy(kernel.astype(np.float32)).expand(channels, 1, k, k)
    return F.conv2d(xp, weight, groups=channels)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _add_noise(x: torch.Tensor, stage: StageParams, rng: np.random.Generator) -> torch.Tensor:
    _, c, h, w = x.shape
    img = x[0].numpy().astype(np.float64)
    if stage.noise == "gaussian":
        shape = (1, h, w) if stage.gray_noise else (c, h, w)
        noise = rng.standard_normal(shape) * (stage.noise_level / 255.0)
    else:
        # Poisson noise as in Real-ESRGAN: counts on the 8-bit image, the number of grey levels rounded up
        # to a power of two; grey noise uses the mean of the frames (there are no colours to weight).
        base = img.mean(axis=0, keepdims=True) if stage.gray_noise else img
        base = np.clip(np.round(base * 255.0), 0, 255) / 255.0
        vals = 2 ** math.ceil(math.log2(max(len(np.unique(base)), 1)))
        noise = (rng.poisson(base * vals) / vals - base) * stage.noise_level
    out = np.clip(img + noise, 0.0, 1.0)
    return torch.from_numpy(out.astype(np.float32))[None]


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Greyscale JPEG round trip of every frame with the same quality."""
    frames = np.clip(np.round(x[0].numpy() * 255.0), 0, 255).astype(np.uint8)
    out = np.empty(frames.shape, dtype=np.float32)
    for i, frame in enumerate(frames):
        ok, buf = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    return torch.from_numpy(out)[None]


def _run_stage(
    x: torch.Tensor, stage: StageParams, size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    if stage.kernel is not None:
        x = _filter(x, make_kernel(stage.kernel))
    x = _resize(x, size, stage.resize_mode)
    x = _add_noise(x, stage, rng)
    if stage.jpeg_quality is not None:
        x = _jpeg(x.clamp(0, 1), stage.jpeg_quality)
    return x


def _as_frames(frames: np.ndarray) -> tuple[torch.Tensor, bool]:
    arr = np.asarray(frames)
    if arr.ndim not in (2, 3):
        raise ValueError(f"frames must be (C, H, W) or (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"frames must be floats in [0, 1], got dtype {arr.dtype}")
    single = arr.ndim == 2
    arr = arr[None] if single else arr
    x = torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))[None]
    return x, single


def _target_size(h: int, w: int, scale: int) -> tuple[int, int]:
    if h < scale or w < scale:
        raise ValueError(f"frames of {h}x{w} are smaller than the scale factor {scale}")
    return h // scale, w // scale


def apply_degradation(frames: np.ndarray, params: DegradationParams, scale: int = 4) -> np.ndarray:
    """Apply one Real-ESRGAN degradation to (C, H, W) or (H, W) frames in [0, 1] -> (C, H/s, W/s) float32."""
    x, single = _as_frames(frames)
    h, w = x.shape[-2:]
    target = _target_size(h, w, scale)
    rng = np.random.default_rng(params.noise_seed)

    first = params.first
    x = _run_stage(x, first, (int(h * first.resize_scale), int(w * first.resize_scale)), rng)
    if params.second is None:
        x = _resize(x, target, params.final_mode)
    else:
        second = params.second
        # the second order resizes relative to the target size, as in Real-ESRGAN
        size2 = (int(target[0] * second.resize_scale), int(target[1] * second.resize_scale))
        x = _run_stage(x, second, size2, rng)

        def resize_and_sinc(t: torch.Tensor) -> torch.Tensor:
            t = _resize(t, target, params.final_mode)
            return _filter(t, make_kernel(params.final_sinc)) if params.final_sinc else t

        quality = params.final_jpeg_quality if params.final_jpeg_quality is not None else 95
        if params.sinc_before_jpeg:
            x = _jpeg(resize_and_sinc(x).clamp(0, 1), quality)
        else:
            x = resize_and_sinc(_jpeg(x.clamp(0, 1), quality))
    # quantise to 8 bits like a stored acquisition (Real-ESRGAN's final clamp and round)
    # (+ 0.0 turns -0.0 into 0.0)
    out = (torch.clamp(torch.round(x * 255.0), 0, 255) / 255.0 + 0.0)[0].numpy().astype(np.float32)
    return out[0] if single else out


def bicubic_down(frames: np.ndarray, factor: int = 4) -> np.ndarray:
    """Antialiased bicubic downsampling by ``factor`` of (C, H, W) or (H, W) frames; float32 in [0, 1].

    Uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True, align_corners=False)``.
    """
    x, single = _as_frames(frames)
    target = _target_size(x.shape[-2], x.shape[-1], factor)
    y = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    out = y.clamp(0, 1)[0].numpy().astype(np.float32)
    return out[0] if single else out


def area_down(frames: np.ndarray, factor: int = 4) -> np.ndarray:
    """Mean of each factor x factor block of (C, H, W) or (H, W) frames (H, W divisible by factor)."""
    return area_downsample(np.asarray(frames, dtype=np.float64), factor).astype(np.float32)


def kspace_down(frames: np.ndarray, factor: int = 4, taper: float = 0.0, sigma: float = 0.0,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """The central 1/factor of k-space per direction of (C, H, W) or (H, W) frames, as a magnitude image.

    Block-centred like the area acquisition (cinesr.model.kspace); intensities keep their scale. `taper`
    > 0 apodises the kept band; `sigma` adds complex Gaussian noise of that standard deviation per
    pixel of the result (Rician magnitude)."""
    image = band(np.asarray(frames, dtype=np.float64), factor, taper)
    if sigma > 0:
        gen = rng or np.random.default_rng(0)
        image = image + sigma * (gen.standard_normal(image.shape) + 1j * gen.standard_normal(image.shape))
    return np.abs(image).astype(np.float32)


def degrade(frames: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig | None = None) -> np.ndarray:
    """Degrade (C, H, W) or (H, W) frames in [0, 1] to (C, H/4, W/4) as ``cfg`` says (seeded by ``rng``)."""
    cfg = cfg or DegradationConfig()
    kind = cfg.kind
    if kind == "mix":
        names = list(cfg.mix or {})
        weights = np.asarray([cfg.mix[k] for k in names], dtype=np.float64)  # type: ignore[index]
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if kind == "realesrgan":
        return apply_degradation(frames, sample_params(rng, cfg), cfg.scale)
    sigma = float(rng.uniform(*cfg.noise_sigma)) if cfg.noise_prob and rng.uniform() < cfg.noise_prob else 0.0
    if kind == "kspace":
        taper = float(rng.uniform(0.1, 0.5)) if cfg.apodize_prob and rng.uniform() < cfg.apodize_prob else 0.0
        return np.clip(kspace_down(frames, cfg.scale, taper, sigma, rng), 0, 1)
    if kind == "area":
        out = area_down(frames, cfg.scale)
    elif kind == "bicubic":
        out = bicubic_down(frames, cfg.scale)
    else:
        raise ValueError(f"unknown degradation kind {kind!r}")
    if sigma > 0:
        out = out + sigma * rng.standard_normal(out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


T = TypeVar("T", np.ndarray, torch.Tensor)


def decimate_time(frames: T, factor: int = 8, offset: int = 0) -> T:
    """Keep every ``factor``-th frame of a (T, H, W) cine from ``offset`` on (low temporal resolution)."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    if not 0 <= offset < factor:
        raise ValueError("offset must be in [0, factor)")
    if frames.ndim < 1 or frames.shape[0] <= offset:
        raise ValueError(
            f"cine with {frames.shape[0] if frames.ndim else 0} frames has none at offset {offset}"
        )
    return frames[offset::factor]
