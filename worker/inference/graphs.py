"""Export a model's three graphs to ONNX (the ONNX Runtime and TensorRT engines run them).

`export_bundle` writes encoder.onnx, unet.onnx and decoder.onnx (batch dimension dynamic, every other
dimension fixed at the pipeline's window shapes) and records in the folder's model.json, under "onnx",
the opset, the shapes, the torch version and the sha256 of the weights they were traced from, so engines
can tell a stale export from a current one. `ensure_onnx` gives an engine a current export. Building TensorRT
plans and the parity self-test are in cinesr.worker.inference.engines.parity.
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
from cinesr.worker.inference.engines.base import LoadedModel, load_model

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
