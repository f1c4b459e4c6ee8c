"""Results over REST: a job's derived series as a streamed zip, and a preview strip per derived series.

Derived series live in DATA_DIR/outputs/<job_id>/<derived SeriesInstanceUID>/IMsss_ffff.dcm (slice sss,
frame ffff in trigger-time order; cinesr.worker.inference.derived). The preview is the middle slice at PREVIEW_FRAMES
time points across the cardiac cycle, side by side, windowed by the series' own window centre/width, as one
PNG (people look before they download). It is made on first request and kept next to the series folder
(<uid>.preview.png), outside it, so the export and the zip see DICOM files only.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from cinesr.model.folders import atomic_write

PREVIEW_FRAMES = 8
PREVIEW_MAX_PANEL = 256  # pixels per panel side (a 1024 px output is shown downsampled)
_NAME = re.compile(r"^IM(\d+)_(\d+)\.dcm$")


class _Chunks:
    """A write-only file object that hands what was written to the zip writer back in chunks."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        return None

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def zip_stream(folder: Path, prefix: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The .dcm files of a folder as a zip, produced while it is sent (never whole in memory or on disk).
    Stored, not deflated: the instances are JPEG 2000 (or another lossless syntax) already."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:  # type: ignore[arg-type]
        for path in sorted(folder.glob("*.dcm")):
            with path.open("rb") as src, archive.open(f"{prefix}/{path.name}", "w", force_zip64=True) as dst:
                while block := src.read(chunk):
                    dst.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def preview_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.preview.png"


def _pick(files: list[Path]) -> list[Path]:
    """The middle slice's files at PREVIEW_FRAMES evenly spaced frames (all of one slice when fewer)."""
    by_slice: dict[int, list[tuple[int, Path]]] = {}
    for path in files:
        match = _NAME.match(path.name)
        key = (int(match.group(1)), int(match.group(2))) if match else (0, len(by_slice.get(0, [])))
        by_slice.setdefault(key[0], []).append((key[1], path))
    slices = sorted(by_slice)
    frames = [p for _, p in sorted(by_slice[slices[len(slices) // 2]])]
    n = len(frames)
    return [frames[int(k * n / PREVIEW_FRAMES)] for k in range(min(PREVIEW_FRAMES, n))]


def _display(path: Path) -> np.ndarray:
    """One instance as 8-bit grey through its window centre/width (min-max when it has none)."""
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    pixels = apply_rescale(ds.pixel_array.astype(np.float32), ds)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        centre = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        width = max(float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width), 1.0)
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def make_preview(folder: Path) -> Path:
    """The preview strip of a derived series folder (made once, then read from its cache file)."""
    from PIL import Image

    target = preview_path(folder)
    if target.is_file():
        return target
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no instances in {folder}")
    panels = [Image.fromarray(_display(p), mode="L") for p in _pick(files)]
    side = min(PREVIEW_MAX_PANEL, max(max(p.size) for p in panels))
    panels = [p if max(p.size) <= side else p.resize((side, round(side * p.size[1] / p.size[0])), Image.BILINEAR)
              for p in panels]
    gap = 2
    strip = Image.new("L", (sum(p.size[0] for p in panels) + gap * (len(panels) - 1),
                            max(p.size[1] for p in panels)), 0)
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.size[0] + gap
    with atomic_write(target) as tmp:  # concurrent first requests both write; either result is the same picture
        strip.save(tmp, format="PNG")
    return target
