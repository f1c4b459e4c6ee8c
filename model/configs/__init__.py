"""Model configurations in ResShift's key format (unet_config, autoencoder_config, diffusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
NAMES = ("tiny", "base")


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """A bundled config by name ('tiny', 'base') or a YAML file path."""
    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in NAMES else Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown model config {name_or_path!r} (bundled: {', '.join(NAMES)}, or a .yaml path)"
        )
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    missing = [k for k in ("unet_config", "autoencoder_config") if k not in (cfg or {})]
    if missing:
        raise ValueError(f"{path}: model config lacks {', '.join(missing)}")
    cfg.setdefault("diffusion", {})
    return cfg
