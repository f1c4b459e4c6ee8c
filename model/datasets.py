"""Cine data for training and evaluation: synthetic phantoms and DICOM folders, split by patient.

A *source* lists patients and loads each one as cine slices `(T, 256, 256)` float32 in [0, 1].

* `PhantomSource`: synthetic patients made on the fly by `cinesr.model.phantom.make_study`; the
  patient is the seed, so a study is reproducible from its id alone.
* `DicomSource`: a folder in the Data Science Bowl layout, `<patient>/study/sax_*/*.dcm` (any
  folder of DICOM files below `<patient>` works; each patient folder is one patient). Slices are
  resized so the short side is 256 and centre-cropped to 256x256; intensities are scaled by the
  slice's 99.5th percentile and clipped to [0, 1].

`split_of(patient)` assigns a patient to train/val/test by a stable hash, so the splits are disjoint
by construction and do not change when patients are added. `SampleDataset` draws paper-style
samples (`cinesr.model.samples`) from one split; sample `i` is a pure function of (seed, i).

Data specs (for the command line): a folder path, or `phantom:<seeds>[:<generator>]` with seeds
as `0-99` or `3,5,8` (e.g. `phantom:1000-1019:sax-fourier`).
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from .degrade import DegradationConfig
from .errors import InputError
from .intensity import Normalisation, clip
from .samples import CLIP_LENGTH, Sample, sample_acquired, sample_from_slice

log = logging.getLogger(__name__)

SIZE = 256
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def split_of(patient: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = "cinesr") -> str:
    """'train', 'val' or 'test' for a patient id, from a stable hash of the id (not of its position)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    u = zlib.crc32(f"{salt}/{patient}".encode()) / 2**32
    edges = np.cumsum(fractions)
    return SPLITS[int(np.searchsorted(edges, u, side="right").clip(0, 2))]


def normalise_intensity(frames: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale a cine (T, H, W) to [0, 1] by its `percentile` (robust to a few bright pixels)."""
    frames = np.asarray(frames, dtype=np.float32)
    lo = float(min(frames.min(), 0.0))
    hi = float(np.percentile(frames, percentile))
    if hi <= lo:
        return np.zeros_like(frames)
    return np.clip((frames - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resize_square(frames: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(T, H, W) -> (T, size, size): scale the short side to `size` (area/cubic), centre-crop the long one."""
    t, h, w = frames.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    out = np.empty((t, size, size), dtype=np.float32)
    top, left = (nh - size) // 2, (nw - size) // 2
    for i in range(t):
        resized = cv2.resize(np.asarray(frames[i], dtype=np.float32), (nw, nh), interpolation=interp)
        out[i] = resized[top : top + size, left : left + size]
    return out


class Source:
    """A set of patients, each loadable as a list of (T, 256, 256) cine slices in [0, 1]."""

    name = "source"

    @property
    def patients(self) -> list[str]:
        raise NotImplementedError

    def load(self, patient: str) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.name, "patients": len(self.patients)}


@dataclass
class PhantomSource(Source):
    """Synthetic patients `seeds` of one phantom generator."""

    seeds: Sequence[int]
    generator: str = "sax"
    slices: int = 3
    frames: int = 32
    size: int = SIZE
    name = "phantom"

    @property
    def patients(self) -> list[str]:
        return [str(int(s)) for s in self.seeds]

    def load(self, patient: str) -> list[np.ndarray]:
        from .phantom import make_study

        study = make_study(int(patient), slices=self.slices, frames=self.frames, size=self.size,
                           generator=self.generator)
        return [np.asarray(s, dtype=np.float32) for s in study.frames]

    def describe(self) -> dict:
        seeds = [int(s) for s in self.seeds]
        return {"kind": "phantom", "generator": self.generator, "patients": len(seeds),
                "seeds": _compact(seeds), "slices": self.slices, "frames": self.frames, "size": self.size}


@dataclass
class DicomSource(Source):
    """Patients in a folder: every sub-folder of `root` is one patient (Data Science Bowl layout)."""

    root: Path
    size: int = SIZE
    min_frames: int = CLIP_LENGTH
    _patients: list[str] = field(default_factory=list, init=False, repr=False)
    name = "dicom"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError("no such data folder", self.root)
        self._patients = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self._patients:
            raise InputError("no patient folders (expected <patient>/study/sax_*/*.dcm)", self.root)

    @property
    def patients(self) -> list[str]:
        return list(self._patients)

    def _slice_folders(self, patient: str) -> list[Path]:
        base = self.root / patient
        sax = sorted(p for p in base.rglob("sax_*") if p.is_dir())
        return sax or [base]

    def load(self, patient: str) -> list[np.ndarray]:
        from .cine import read_series

        slices: list[np.ndarray] = []
        for folder in self._slice_folders(patient):
            try:
                series = read_series([folder])
            except InputError as exc:  # real archives hold odd series; skip them, say which
                log.warning("skipping %s: %s", folder.relative_to(self.root), exc.reason)
                continue
            for s in series:
                for cine in s.slices:
                    if cine.num_frames < self.min_frames:
                        continue
                    # cubic resizing overshoots at edges: clip back to [0, 1]
                    slices.append(np.clip(resize_square(normalise_intensity(cine.frames), self.size), 0.0, 1.0))
        return slices

    def describe(self) -> dict:
        return {"kind": "dicom", "root": str(self.root), "patients": len(self._patients), "size": self.size}


def _compact(seeds: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (for model.json)."""
    parts, i = [], 0
    seeds = sorted(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}-{seeds[j]}" if j > i else str(seeds[i]))
        i = j + 1
    return ",".join(parts)


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"bad seed range {part!r}")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def open_source(spec: str | Path, **phantom_options: int) -> Source:
    """A data spec -> Source: `phantom:<seeds>[:<generator>]` or a DICOM folder."""
    text = str(spec)
    if text.startswith("phantom:"):
        _, rest = text.split(":", 1)
        seeds_text, _, generator = rest.partition(":")
        try:
            seeds = parse_seeds(seeds_text)
        except ValueError as exc:
            raise InputError(
                f"bad phantom spec {text!r}: {exc} (e.g. phantom:0-99 or phantom:5,7:sax-fourier)") from None
        return PhantomSource(seeds, generator=generator or "sax", **phantom_options)
    return DicomSource(Path(text))


def split_patients(source: Source, split: str | None, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[str]:
    """The source's patients in `split` ('train'/'val'/'test'), or all of them for split None/'all'."""
    if split in (None, "all"):
        return source.patients
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)}, or all)")
    return [p for p in source.patients if split_of(p, fractions) == split]


class SliceCache:
    """Loaded patients kept in memory (LRU) as float16 to halve the footprint; phantoms cost ~1 s each."""

    def __init__(self, source: Source, max_patients: int = 64) -> None:
        self.source, self.max_patients = source, max_patients
        self._data: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def get(self, patient: str) -> list[np.ndarray]:
        if patient in self._data:
            self._data.move_to_end(patient)
            return self._data[patient]
        slices = [s.astype(np.float16) for s in self.source.load(patient)]
        self._data[patient] = slices
        while len(self._data) > self.max_patients:
            self._data.popitem(last=False)
        return slices


class SampleDataset(torch.utils.data.Dataset):
    """Samples from one split of one or several weighted sources; item i is a pure function of (seed, i).

    `mode` 'acquired' builds samples as the pipeline sees an acquisition (cinesr.model.samples.
    sample_acquired), 'paper' as the paper does. Returns dicts of tensors: `lq` (3, 64, 64) and `gt`
    (3, 256, 256) in the model's units (the pipeline's intensity map, fitted on the low-resolution
    frames, so training sees what inference sees), plus `patient` and `slice`.
    """

    def __init__(
        self,
        source: Source | Sequence[tuple[Source, float]],
        split: str | None = "train",
        degradation: DegradationConfig | None = None,
        seed: int = 0,
        length: int = 10_000,
        cache_patients: int = 64,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        mode: str = "paper",
    ) -> None:
        parts = [(source, 1.0)] if isinstance(source, Source) else [(s, float(w)) for s, w in source]
        self.parts = [(s, w, split_patients(s, split, fractions)) for s, w in parts if w > 0]
        if not self.parts or not all(p for _, _, p in self.parts):
            empty = [s.describe() for s, _, p in self.parts if not p] or [parts[0][0].describe()]
            raise InputError(f"no patients in split {split!r} of {empty[0]}")
        if mode not in ("paper", "acquired"):
            raise ValueError(f"unknown sample mode {mode!r} (paper or acquired)")
        self.source = self.parts[0][0]
        self.patients = [p for _, _, ps in self.parts for p in ps] if len(self.parts) == 1 else \
            [f"{i}/{p}" for i, (_, _, ps) in enumerate(self.parts) for p in ps]
        self.degradation = degradation or DegradationConfig()
        self.seed, self.length, self.mode = seed, length, mode
        self.caches = [SliceCache(s, max(4, cache_patients // len(self.parts))) for s, _, _ in self.parts]
        weights = np.asarray([w for _, w, _ in self.parts], dtype=np.float64)
        self.weights = weights / weights.sum()

    @property
    def cache(self) -> SliceCache:
        return self.caches[0]

    def describe(self) -> list[dict]:
        return [{**s.describe(), "weight": round(float(w), 4)} for (s, _, _), w in zip(self.parts, self.weights,
                                                                                      strict=True)]

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[Sample, str, int]:
        rng = np.random.default_rng([self.seed, index])
        part = int(rng.choice(len(self.parts), p=self.weights)) if len(self.parts) > 1 else 0
        _, _, patients = self.parts[part]
        for _ in range(8):  # a patient may have no usable slice (DICOM); draw another
            patient = patients[int(rng.integers(len(patients)))]
            slices = self.caches[part].get(patient)
            if slices:
                break
        else:
            raise InputError("no usable cine slices in the sampled patients")
        k = int(rng.integers(len(slices)))
        frames = slices[k].astype(np.float32)
        if self.mode == "acquired":
            return sample_acquired(frames, rng, self.degradation), patient, k
        return sample_from_slice(frames, rng, self.degradation), patient, k

    def __getitem__(self, index: int) -> dict:
        s, patient, k = self.sample(index)
        lq, gt = to_model_units(s.lq, s.gt)
        return {"lq": torch.from_numpy(lq), "gt": torch.from_numpy(gt), "patient": patient, "slice": k}

    def batches(self, batch_size: int, start: int = 0) -> Iterator[dict]:
        """Consecutive items start, start+1, ... collated into batches (no worker processes)."""
        i = start
        while True:
            items = [self[j] for j in range(i, i + batch_size)]
            i += batch_size
            yield {
                "lq": torch.stack([it["lq"] for it in items]),
                "gt": torch.stack([it["gt"] for it in items]),
                "index": torch.arange(i - batch_size, i),
            }


def to_model_units(lq: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (low-resolution, truth) pair in the model's units: the pipeline's intensity map fitted on the
    low-resolution frames, applied to both, clipped to the working range."""
    norm = Normalisation.fit([lq])
    return clip(norm.forward(lq)).astype(np.float32), clip(norm.forward(gt)).astype(np.float32)
