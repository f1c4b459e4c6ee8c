"""Pick and build an engine: `--backend auto|tensorrt|onnx|torch`, `--device auto|cpu|cuda`.

auto tries, in order, tensorrt(cuda) > onnx(cuda) > torch(cuda) > onnx(cpu) > torch(cpu) and returns
the first that loads, logging why each one before it was skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from cinesr.worker.inference.engines.base import Engine, EngineUnavailable, LoadedModel, load_model

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnx", "torch")
DEVICES = ("auto", "cpu", "cuda")
AUTO_ORDER = (("tensorrt", "cuda"), ("onnx", "cuda"), ("torch", "cuda"), ("onnx", "cpu"), ("torch", "cpu"))


def _build(backend: str, device: str, model: LoadedModel, options: Mapping[str, Any]) -> Engine:
    # each backend is imported when it is asked for: onnxruntime and TensorRT are heavy, and may be absent
    if backend == "torch":
        from cinesr.worker.inference.engines.torch_engine import TorchEngine

        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("torch: no CUDA device")
        opts = dict(options.get("torch", {}))
        if device == "cuda":  # on GPU the fast defaults: fp16 + a captured sampling loop
            opts.setdefault("precision", "fp16")
            opts.setdefault("cuda_graphs", True)
        return TorchEngine(model, device, **opts)
    if backend == "onnx":
        from cinesr.worker.inference.engines.onnx_engine import OnnxEngine

        return OnnxEngine(model, device, **dict(options.get("onnx", {})))
    if backend == "tensorrt":
        if device != "cuda":
            raise EngineUnavailable("tensorrt: runs on CUDA only")
        from cinesr.worker.inference.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(model, **dict(options.get("tensorrt", {})))
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def candidates(backend: str = "auto", device: str = "auto") -> list[tuple[str, str]]:
    """The (backend, device) pairs to try, in order."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    return [
        (b, d)
        for b, d in AUTO_ORDER
        if (backend == "auto" or b == backend) and (device == "auto" or d == device)
    ]


def create_engine(
    backend: str = "auto",
    device: str = "auto",
    model: str | Path | Mapping[str, Any] | LoadedModel | None = None,
    options: Mapping[str, Any] | None = None,
) -> Engine:
    """The first engine of the requested kind that loads.

    model: a bundle folder, config name/path/dict or LoadedModel (None: the bundled model).
    options: per-backend keyword arguments, e.g. {"torch": {"compile": True}, "onnx": {"threads": 2}}.
    Raises EngineUnavailable with every reason when none loads.
    """
    loaded = load_model(model)
    reasons = []
    for b, d in candidates(backend, device):
        try:
            engine = _build(b, d, loaded, options or {})
        except EngineUnavailable as exc:
            reasons.append(str(exc))
            log.info("engine %s(%s) skipped: %s", b, d, exc)
            continue
        except Exception as exc:  # a backend that is present but broken must not stop the others
            reasons.append(f"{b}({d}): failed to load: {type(exc).__name__}: {exc}")
            log.warning("engine %s(%s) failed to load: %s", b, d, exc)
            continue
        if reasons:
            log.info("engine %s(%s) selected; skipped: %s", b, d, "; ".join(reasons))
        else:
            log.info("engine %s(%s) selected", b, d)
        return engine
    raise EngineUnavailable(f"no engine for backend={backend} device={device}: " + "; ".join(reasons))
