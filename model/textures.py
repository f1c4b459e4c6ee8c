"""Natural-image cines: photographs and textures that scikit-image ships, moved periodically.

A prior learned only from heart phantoms is a cartoon of them; these give the model edges, fine
texture and clutter it must neither erase nor invent. The images are read from scikit-image's own
data folder (files in its wheel), never downloaded. Each cine is a random crop, scale, flip and
contrast of one image, deformed periodically over the cycle (`cinesr.model.motion`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .motion import periodic_warp

# Greyscale-able photographs and textures in skimage/data (shipped in the wheel, no fetching).
IMAGES = ("camera.png", "astronaut.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png",
          "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg", "cell.png", "hubble_deep_field.jpg",
          "microaneurysms.png", "ihc.png", "motorcycle_left.png", "page.png", "text.png")


def _data_dir() -> Path:
    try:
        import skimage.data
    except ImportError as exc:  # the training extra brings it
        raise ImportError("texture cines need scikit-image (pip install scikit-image)") from exc
    return Path(skimage.data.__file__).resolve().parent


@lru_cache(maxsize=len(IMAGES))
def load_image(name: str) -> np.ndarray:
    """One shipped image as float32 greyscale in [0, 1]."""
    path = _data_dir() / name
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f"{path}: not readable (is scikit-image installed whole?)")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    img = img.astype(np.float32)
    return (img - img.min()) / max(float(img.max() - img.min()), 1e-6)


def available_images() -> tuple[str, ...]:
    return tuple(n for n in IMAGES if (_data_dir() / n).is_file())


def texture_cine(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1] from one randomly chosen, cropped and moved image."""
    names = available_images()
    if not names:
        raise FileNotFoundError("no scikit-image data images found")
    img = load_image(names[int(rng.integers(len(names)))])
    margin = size // 8
    want = size + 2 * margin
    # scale so that the crop is mostly downsampled (sharp, alias-free truth), rarely upsampled a little
    scale = rng.uniform(0.45, 1.15) * want / min(img.shape)
    scale = max(scale, want / min(img.shape))
    resized = cv2.resize(img, (max(want, round(img.shape[1] * scale)), max(want, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    top = int(rng.integers(0, resized.shape[0] - want + 1))
    left = int(rng.integers(0, resized.shape[1] - want + 1))
    crop = resized[top : top + want, left : left + want]
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    lo, hi = np.percentile(crop, [1, 99.5])
    crop = np.clip((crop - lo) / max(hi - lo, 1e-3), 0, 1) ** rng.uniform(0.7, 1.5)
    crop = crop * rng.uniform(0.6, 1.0) + rng.uniform(0, 0.1)
    return periodic_warp(np.ascontiguousarray(crop, np.float32), rng, frames, size,
                         elastic_px=rng.uniform(0.5, 5.0), affine=rng.uniform(0.0, 0.05))
