"""What `cinesr export` and `cinesr selftest` check beyond the ONNX graphs: TensorRT plans built for this GPU, and
an engine's parity with onnxruntime on the CPU (the largest differences per graph and over a whole window)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from cinesr.worker.inference.engines.base import Engine, EngineUnavailable, LoadedModel, draw_noise, load_model
from cinesr.worker.inference.engines.onnx_engine import OnnxEngine
from cinesr.worker.inference.engines.select import create_engine
from cinesr.worker.inference.engines.tensorrt_engine import TensorRTEngine
from cinesr.worker.inference.graphs import DEFAULT_BATCH_SIZES, graphs_of


def export_tensorrt(
    source: str | Path | Mapping[str, Any] | LoadedModel | None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build (or find cached) TensorRT plans for every graph and batch size on this GPU.

    Returns {"built": True, "plans": [...], ...} or {"built": False, "reason": "..."} where TensorRT or a
    GPU is missing (`cinesr export` prints the reason and still succeeds with the ONNX graphs)."""
    model = load_model(source)
    try:
        engine = TensorRTEngine(model, batch_sizes=tuple(batch_sizes), cache_dir=cache_dir)
    except EngineUnavailable as exc:
        return {"built": False, "reason": str(exc)}
    t0 = time.perf_counter()
    for b in engine.batch_sizes:
        for g in graphs_of(model):
            engine.graph(b, g)
    plans = sorted(str(p) for p in engine.cache_dir.glob("*.plan"))
    return {"built": True, "plans": plans, "cache_dir": str(engine.cache_dir), "gpu": engine.gpu,
            "tensorrt": engine.trt.__version__, "seconds": round(time.perf_counter() - t0, 1)}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = float(((a.float().cpu() - b.float().cpu()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(torch.log10(torch.tensor(data_range**2 / mse)))


def compare_engines(engine: Engine, reference: Engine, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Largest absolute differences per graph and over a whole window (encode, sampler, decode), and
    the PSNR (images in [-1, 1]) between the two windows, on seeded random inputs."""
    g = engine.geometry
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, g.channels, g.image_size, g.image_size, generator=gen) * 2 - 1
    lq = torch.nn.functional.interpolate(images, size=(g.lq_size, g.lq_size), mode="area")
    x = torch.randn(batch, g.latent_channels, g.latent_size, g.latent_size, generator=gen)
    t = torch.full((batch,), engine.plan.timesteps[0], dtype=torch.long)
    noise = draw_noise(tuple(x.shape), engine.plan.steps, gen)
    z_a, z_b = engine.encode(images), reference.encode(images)
    result: dict[str, Any] = {
        "encoder_max_abs": _max_abs(z_a, z_b),
        "unet_max_abs": _max_abs(engine.denoise(x, t, lq), reference.denoise(x, t, lq)),
        # decode the same latent in both; the VQ argmin may pick another code at a near-tie
        "decoder_max_abs": _max_abs(engine.decode(z_b), reference.decode(z_b)),
    }
    w_a, w_b = engine.superresolve(lq, noise), reference.superresolve(lq, noise)
    result["window_max_abs"] = _max_abs(w_a, w_b)
    result["window_mean_abs"] = float((w_a - w_b).abs().mean())
    result["window_psnr_db"] = _psnr(w_a, w_b)
    return result


# Tolerances for fp32 backends vs onnxruntime CPU; fp16 backends (TensorRT, torch half) get the loose set.
TOLERANCES = {
    "fp32": {"encoder_max_abs": 1e-3, "unet_max_abs": 1e-3, "decoder_max_abs": 1e-3, "window_psnr_db": 40.0},
    "fp16": {"encoder_max_abs": 5e-2, "unet_max_abs": 5e-2, "decoder_max_abs": 5e-2, "window_psnr_db": 25.0},
}


def selftest(
    backend: str = "auto",
    device: str = "auto",
    model: str | Path | Mapping[str, Any] | None = None,
    batch: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Check a backend against onnxruntime on the CPU (the reference CI tests). Returns a report with
    the measured differences, the tolerances applied and "ok"; raises nothing for a failed check."""
    loaded = load_model(model)
    engine = create_engine(backend, device, loaded)
    reference = OnnxEngine(loaded, device="cpu")
    t0 = time.perf_counter()
    diffs = compare_engines(engine, reference, batch=batch, seed=seed)
    half = "fp16" in str(engine.describe().get("precision", "fp32")) or engine.name == "tensorrt"
    tol = TOLERANCES["fp16" if half else "fp32"]
    failures = [
        k for k, limit in tol.items() if (diffs[k] < limit if k.endswith("psnr_db") else diffs[k] > limit)
    ]
    return {
        "engine": engine.describe(),
        "reference": reference.describe(),
        "differences": diffs,
        "tolerances": tol,
        "failures": failures,
        "ok": not failures,
        "seconds": round(time.perf_counter() - t0, 2),
    }
