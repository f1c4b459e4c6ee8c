"""Load network weights as users have them: ResShift/LDM releases, our own bundles.

Accepted layouts: a plain state dict, or one nested under `state_dict` / `model` (any depth),
keys with or without DDP's `module.` prefix, as `.pth`/`.pt`/`.ckpt` (read with
torch.load(weights_only=True), never unpickling code) or `.safetensors`. Anything else fails
with a ValueError that says what was found.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

NESTING_KEYS = ("state_dict", "model")
TRAINING_ONLY_PREFIXES = ("loss.",)  # LDM autoencoder checkpoints carry LPIPS/discriminator weights


def read_checkpoint(path: str | Path) -> Any:
    """The raw object stored in a checkpoint file (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; report them as one clear line
        raise ValueError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from exc


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap `state_dict`/`model` nesting and strip a `module.` prefix; tensors only."""
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            keys = ", ".join(list(map(str, obj.keys()))[:8])
            raise ValueError(
                f"{source}: no state dict found (top-level keys: {keys}); expected tensors, "
                f"or a dict nesting them under {' or '.join(NESTING_KEYS)!r}"
            )
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Sub-dict of the keys under `prefix` (e.g. 'unet.') with the prefix removed; all keys if none has it."""
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return picked or dict(state)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strict load, except that missing *buffers* (attention masks, position indices) are allowed:
    they are deterministic functions of the config and the module already holds them."""
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    expected = module.state_dict()
    buffers = {name for name, _ in module.named_buffers()}
    missing = [k for k in expected if k not in state and k not in buffers]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict({**expected, **state}, strict=True)
    return module


def load_weights(module: nn.Module, path: str | Path, prefix: str | None = None) -> nn.Module:
    """Read `path`, unwrap it, optionally keep only keys under `prefix`, and load into `module`."""
    state = extract_state_dict(read_checkpoint(path), source=str(path))
    if prefix:
        state = select_prefix(state, prefix)
    return load_into(module, state, source=str(path))
