"""Model bundles: one folder holding everything needed to run (and to describe) a trained model.

    <bundle>/model.json               format, name, version, network config, training record, metrics
    <bundle>/autoencoder.safetensors  VQGAN state dict (ResShift/LDM key names)
    <bundle>/unet.safetensors         Swin-UNet state dict (EMA weights when trained with EMA)
    <bundle>/student.safetensors      optional: a few-step student UNet distilled from it (`distilled` in
                                      model.json says which step counts it serves)
    <bundle>/*.onnx, TensorRT plans   optional, written by `cinesr export`

Tensors are stored as float16 where that is lossless enough (relative round-trip error of the
tensor below `FP16_TOLERANCE`), otherwise float32; they are loaded back as float32. Buffers that
are pure functions of the config (attention masks, position indices) are not stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# model.json's names and reader live in bundle_meta (no torch); they are re-exported here for callers that
# load bundles anyway
from .bundle_meta import BUNDLES_DIR, DEFAULT_BUNDLE, FORMAT, FORMAT_VERSION, MODEL_JSON, read_meta  # noqa: F401
from .checkpoint import load_into
from .diffusion import Schedule
from .errors import InputError
from .folders import atomic_write
from .nets import VQGAN, SwinUNet

WEIGHT_FILES = {"autoencoder": "autoencoder.safetensors", "unet": "unet.safetensors",
                "student": "student.safetensors"}
FP16_TOLERANCE = 1e-3


def served_steps(student: torch.nn.Module | None, meta: Mapping[str, Any]) -> tuple[int, ...]:
    """The sampler step counts a distilled student serves, from model.json's `distilled` (none without one)."""
    if student is None:
        return ()
    return tuple(int(s) for s in (meta.get("distilled") or {}).get("steps", ()))


@dataclass
class ModelBundle:
    """A loaded bundle: networks in eval mode on `device`, the diffusion schedule and the metadata."""

    path: Path | None
    config: dict[str, Any]
    unet: SwinUNet
    autoencoder: VQGAN
    meta: dict[str, Any] = field(default_factory=dict)
    student: SwinUNet | None = None  # the distilled few-step UNet, when the bundle has one

    @property
    def student_steps(self) -> tuple[int, ...]:
        """Sampler step counts the student serves (empty without a student)."""
        return served_steps(self.student, self.meta)

    def unet_for(self, steps: int) -> SwinUNet:
        """The network that runs `steps` sampler steps: the student for the step counts it was distilled
        for, the teacher otherwise."""
        return self.student if self.student is not None and steps in self.student_steps else self.unet

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_config(self.config.get("diffusion"))

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.config.get("name", "model")))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    @property
    def scale(self) -> int:
        return int((self.config.get("diffusion") or {}).get("sf", 4))

    @property
    def lq_size(self) -> int:
        return int(self.config["unet_config"].get("lq_size") or self.config["unet_config"]["image_size"])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> ModelBundle:
        self.unet.to(device)
        self.autoencoder.to(device)
        if self.student is not None:
            self.student.to(device)
        return self


def build_networks(config: Mapping[str, Any]) -> tuple[SwinUNet, VQGAN]:
    """Fresh (untrained) networks for a model config."""
    return (SwinUNet.from_resshift_config(config["unet_config"]),
            VQGAN.from_resshift_config(config["autoencoder_config"]))


def _persistent_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers except the ones derived from the config (masks, indices)."""
    params = {k for k, _ in module.named_parameters()}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
            if k in params or not (k.endswith("attn_mask") or k.endswith("relative_position_index"))}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 copy of a float tensor when it round-trips within FP16_TOLERANCE, else float32."""
    if not t.is_floating_point():
        return t
    t32 = t.float()
    half = t32.half()
    if not torch.isfinite(half).all():
        return t32
    scale = float(t32.abs().max()) or 1.0
    err = float((half.float() - t32).abs().max()) / scale
    return half if err <= FP16_TOLERANCE else t32


def state_digest(*modules: torch.nn.Module) -> str:
    """sha256 over the parameters and buffers of modules (names, shapes, bytes): identifies weights."""
    h = hashlib.sha256()
    for module in modules:
        for name, value in sorted(module.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(
    path: str | Path,
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module,
    config: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    fp16: bool = True,
    student: torch.nn.Module | None = None,
) -> Path:
    """Write a bundle folder (created if needed; weights and model.json replaced atomically per file).

    `meta` goes into model.json as is (name, training record, metrics); format, version, config and
    the weight files' dtypes and sha256 are added here. The version defaults to
    `<name>-<date>-<first 8 hex of the weights' hash>`, so different weights never share a version.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights: dict[str, Any] = {}
    digest = hashlib.sha256()
    modules = [("autoencoder", autoencoder), ("unet", unet)] + ([("student", student)] if student is not None else [])
    for key, module in modules:
        state = _persistent_state(module)
        if fp16:
            state = {k: _compact(v) for k, v in state.items()}
        file = path / WEIGHT_FILES[key]
        with atomic_write(file) as tmp:
            save_file(state, str(tmp))
        sha = _digest(file)
        digest.update(sha.encode())
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
        weights[key] = {"file": file.name, "sha256": sha, "bytes": file.stat().st_size, "dtypes": dtypes,
                        "parameters": int(sum(p.numel() for p in module.parameters()))}
    meta = dict(meta or {})
    name = str(meta.get("name", config.get("name", "model")))
    version = meta.get("version") or f"{name}-{time.strftime('%Y%m%d')}-{digest.hexdigest()[:8]}"
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "name": name, "version": version,
           "config": dict(config), "weights": weights}
    with atomic_write(path / MODEL_JSON) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_meta(path: str | Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `updates` into a bundle's model.json (e.g. an evaluation table) and return the document."""
    doc = read_meta(path)
    doc.update(updates)
    file = Path(path) / MODEL_JSON
    with atomic_write(file) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return doc


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu",
                verify: bool = False) -> ModelBundle:
    """Load a bundle folder (default: the bundled tiny model) with float32 networks in eval mode.

    verify=True also checks the weight files against the sha256 recorded in model.json.
    """
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    doc = read_meta(path)
    config = doc["config"]
    unet, autoencoder = build_networks(config)
    student = build_networks(config)[0] if "student" in (doc.get("weights") or {}) else None
    modules = [("autoencoder", autoencoder), ("unet", unet)] + ([("student", student)] if student is not None else [])
    for key, module in modules:
        entry = (doc.get("weights") or {}).get(key, {})
        file = path / entry.get("file", WEIGHT_FILES[key])
        if not file.is_file():
            raise InputError(f"bundle lacks {file.name}", path)
        if verify and entry.get("sha256") and _digest(file) != entry["sha256"]:
            raise InputError(f"{file.name} does not match the sha256 in {MODEL_JSON}", path)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        load_into(module, state, source=str(file))
    meta = {k: v for k, v in doc.items() if k not in ("config",)}
    bundle = ModelBundle(path=path, config=config, unet=unet.eval(), autoencoder=autoencoder.eval(), meta=meta,
                         student=student.eval() if student is not None else None)
    for module in (bundle.unet, bundle.autoencoder, bundle.student):
        if module is not None:
            module.requires_grad_(False)
    return bundle.to(device)
