"""Export a model's three graphs to ONNX, and check an engine's parity against onnxruntime.

`export_bundle` writes encoder.onnx, unet.onnx and decoder.onnx (batch dimension dynamic, every other
dimension fixed at the pipeline's window shapes) and records in the folder's model.json, under "onnx",
the opset, the shapes, the torch version and the sha256 of the weights they were traced from, so engines
can tell a stale export from a current one. `selftest(backend)` runs a backend and onnxruntime (CPU) on
the same inputs and reports the largest differences per graph and over a whole window.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from cinesr.model.folders import atomic_write
from cinesr.worker.inference.engines.base import Engine, LoadedModel, draw_noise, load_model

OPSET = 17
GRAPHS = ("encoder", "unet", "decoder")
STUDENT = "student"  # the distilled few-step UNet: the unet graph's inputs and outputs, its own weights


def graphs_of(model: LoadedModel) -> tuple[str, ...]:
    """The graphs a model has: the three, and the student's where the bundle has one."""
    return (*GRAPHS, STUDENT) if model.student is not None else GRAPHS
DEFAULT_BATCH_SIZES = (1, 4, 8)


class _UNetCall(torch.nn.Module):
    """forward(x, t, lq) with lq positional, as the ONNX exporter needs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, lq=lq)


class _Encode(torch.nn.Module):
    def __init__(self, vqgan: torch.nn.Module) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(images)


class _Decode(torch.nn.Module):
    def __init__(self, vqgan: torch.nn.Module) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(latents)


def graph_io(model: LoadedModel) -> dict[str, dict[str, Any]]:
    """Input/output names and shapes ('B' = dynamic batch) of the three graphs."""
    s = model.geometry.shapes("B")
    unet = {"inputs": {"x": s["unet.x"], "t": s["unet.t"], "lq": s["unet.lq"]}, "outputs": {"x0": s["unet.x0"]}}
    io = {
        "encoder": {"inputs": {"images": s["encoder.images"]}, "outputs": {"latents": s["encoder.latents"]}},
        "unet": unet,
        "decoder": {"inputs": {"latents": s["decoder.latents"]}, "outputs": {"images": s["decoder.images"]}},
    }
    if model.student is not None:
        io[STUDENT] = unet
    return io


def _example(model: LoadedModel, graph: str, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    out = []
    for name, shape in graph_io(model)[graph]["inputs"].items():
        dims = [batch if d == "B" else int(d) for d in shape]
        if name == "t":
            out.append(torch.full(dims, model.schedule.steps - 1, dtype=torch.long))
        else:
            out.append(torch.randn(dims, generator=g))
    return tuple(out)


def _module(model: LoadedModel, graph: str) -> torch.nn.Module:
    if graph in ("unet", STUDENT):
        return _UNetCall(model.unet if graph == "unet" else model.student).eval()
    return {"encoder": _Encode, "decoder": _Decode}[graph](model.vqgan).eval()


def export_graph(model: LoadedModel, graph: str, path: Path, opset: int = OPSET) -> None:
    """Trace one graph (CPU, fp32) to `path` with a dynamic batch axis."""
    io = graph_io(model)[graph]
    names_in, names_out = list(io["inputs"]), list(io["outputs"])
    dynamic = {n: {0: "batch"} for n in names_in + names_out}
    # trace at batch 2 so no batch-1 specialisation gets baked in
    args = _example(model, graph, 2)
    # a reader never sees a half-written graph
    with atomic_write(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _module(model, graph),
            args,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def onnx_record(directory: str | Path) -> dict[str, Any] | None:
    """The "onnx" entry of a folder's model.json, if all its graphs are there."""
    directory = Path(directory)
    rec = _read_json(directory / "model.json").get("onnx")
    if not rec or not all((directory / f).is_file() for f in (rec.get("graphs") or {g: f"{g}.onnx" for g in GRAPHS})
                          .values()):
        return None
    return rec


def export_bundle(
    source: str | Path | Mapping[str, Any] | LoadedModel | None,
    out_dir: str | Path | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    opset: int = OPSET,
    seed: int = 0,
) -> Path:
    """Write encoder.onnx, unet.onnx, decoder.onnx for a model into out_dir (default: the bundle
    folder itself) and record opset, shapes and source weights under "onnx" in out_dir/model.json.

    source: a bundle folder, a config name/path/dict (random weights seeded by `seed`) or a LoadedModel.
    The batch axis is dynamic; `batch_sizes` are the sizes the export was checked at and the ones
    TensorRT builds optimisation profiles for. Returns out_dir.
    """
    model = load_model(source, seed=seed)
    if out_dir is None:
        if model.bundle_dir is None:
            raise ValueError("out_dir is required when exporting from a config")
        out_dir = model.bundle_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for graph in graphs_of(model):
        export_graph(model, graph, out / f"{graph}.onnx", opset)
    meta = _read_json(out / "model.json")
    if not meta:  # a folder of graphs only: keep what is needed to run them (config, schedule)
        meta = {"name": model.config.get("name", "custom"), "config": model.config, "source": model.source}
    meta["onnx"] = {
        "opset": opset,
        "graphs": {g: f"{g}.onnx" for g in graphs_of(model)},
        "io": graph_io(model),
        "batch": "dynamic",
        "batch_sizes": [int(b) for b in batch_sizes],
        "geometry": {"lq_size": model.geometry.lq_size, "sf": model.geometry.sf,
                     "image_size": model.geometry.image_size, "latent_size": model.geometry.latent_size},
        "source_weights_sha256": model.weights_hash,
        "source": model.source,
        "torch": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json(out / "model.json", meta)
    return out


def onnx_cache_dir(model: LoadedModel) -> Path:
    """Per-user cache of graphs keyed by the weights' hash (CINESR_CACHE_DIR overrides the root)."""
    root = Path(os.environ.get("CINESR_CACHE_DIR") or Path(tempfile.gettempdir()) / "cinesr-cache")
    return root / "onnx" / model.weights_hash[:16]


def _current(directory: Path, model: LoadedModel) -> bool:
    rec = onnx_record(directory)
    return rec is not None and rec.get("source_weights_sha256") == model.weights_hash


def ensure_onnx(model: LoadedModel, directory: str | Path | None = None) -> Path:
    """A folder holding current ONNX graphs of `model`: `directory` (exported there if absent or
    stale), else the bundle folder when `cinesr export` already wrote them there, else the cache
    (exported on first use; a bundle inside the installed package is never written to at run time)."""
    if directory is None and model.bundle_dir is not None and _current(model.bundle_dir, model):
        return model.bundle_dir
    d = Path(directory) if directory is not None else onnx_cache_dir(model)
    if not _current(d, model):
        export_bundle(model, d)
    return d


def export_tensorrt(
    source: str | Path | Mapping[str, Any] | LoadedModel | None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build (or find cached) TensorRT plans for every graph and batch size on this GPU.

    Returns {"built": True, "plans": [...], ...} or {"built": False, "reason": "..."} where TensorRT or a
    GPU is missing (`cinesr export` prints the reason and still succeeds with the ONNX graphs)."""
    from cinesr.worker.inference.engines.base import EngineUnavailable

    model = load_model(source)
    try:
        from cinesr.worker.inference.engines.tensorrt_engine import TensorRTEngine

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


# ---- parity self-test ----------------------------------------------------------------------------------


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
    from cinesr.worker.inference.engines.onnx_engine import OnnxEngine
    from cinesr.worker.inference.engines.select import create_engine

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
