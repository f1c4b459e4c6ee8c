"""The series pipeline: a cine series in, super-resolved frames per slice out, through one SR method.

A method turns one slice's low-resolution cine (T, h, w), in the series' own intensity units, into
(temporal*T, spatial*h, spatial*w). The baseline lives here; the learned model plugs in the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from cinesr.model.baseline import baseline_superresolve
from cinesr.model.cine import CineSeries

# progress(done, total): fractions of the whole series, called from the processing thread.
Progress = Callable[[int, int], None]

TEMPORAL_FACTOR = 8
SPATIAL_FACTOR = 4


class Method(Protocol):
    name: str
    version: str

    def parameters(self) -> dict[str, object]:
        """What changes the output (enters the derived UIDs and DerivationDescription)."""
        ...

    def units(self, series: CineSeries) -> int:
        """How many progress units the series takes."""
        ...

    def superresolve_slice(self, frames: np.ndarray, step: Callable[[int], None]) -> np.ndarray:
        """(T, h, w) -> (8T, 4h, 4w); calls step(n) as n progress units complete."""
        ...


@dataclass
class BaselineMethod:
    """Optical-flow interpolation in time, then bicubic in space (the paper's baseline)."""

    name: str = "baseline"
    version: str = "1"
    temporal: int = TEMPORAL_FACTOR
    spatial: int = SPATIAL_FACTOR

    def parameters(self) -> dict[str, object]:
        return {"temporal": self.temporal, "spatial": self.spatial}

    def units(self, series: CineSeries) -> int:
        return len(series.slices)

    def superresolve_slice(self, frames: np.ndarray, step: Callable[[int], None]) -> np.ndarray:
        out = baseline_superresolve(frames, self.temporal, self.spatial)
        step(1)
        return out


@dataclass
class SeriesResult:
    frames: list[np.ndarray]  # per slice (8T, 4h, 4w), series intensity units
    timings: dict[str, float] = field(default_factory=dict)
    # the model's agreement with the acquisition (cinesr.model.pipeline.Result); None for the baseline
    fidelity_db: float | None = None
    consistency: str | None = None
    # per slice (8T, 4h, 4w): per-pixel standard deviation over `draws` draws of the model (series units)
    uncertainty: list[np.ndarray] | None = None
    draws: int = 1


def supports_draws(method: Method) -> bool:
    """Whether the method samples (the model), so that several draws give an uncertainty; the baseline does not."""
    return callable(getattr(method, "superresolve_series", None))


def superresolve_series(series: CineSeries, method: Method, progress: Progress | None = None,
                        draws: int = 1) -> SeriesResult:
    """Run the method over every slice of the series, reporting progress in method units. With draws > 1 (a
    sampling method only) the result carries the uncertainty over that many draws."""

    if draws > 1 and not supports_draws(method):
        raise ValueError(f"the {method.name} method is deterministic: it has no uncertainty series")
    total = method.units(series, draws) if draws > 1 else method.units(series)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(min(done, total), total)

    start = time.perf_counter()
    whole = getattr(method, "superresolve_series", None)
    if callable(whole):  # methods that batch across slices (the model) take the whole series at once
        frames = whole(series, step, draws) if draws > 1 else whole(series, step)
    else:
        frames = [method.superresolve_slice(s.frames, step) for s in series.slices]
    timings = {"compute": time.perf_counter() - start}
    # the model's cinesr.model.pipeline.Result of this series (its fidelity figure)
    quality = getattr(method, "last", None) if callable(whole) else None
    if quality is None:
        return SeriesResult(frames=frames, timings=timings)
    return SeriesResult(frames=frames, timings={**timings, **{k: round(v, 3) for k, v in quality.timings.items()}},
                        fidelity_db=quality.fidelity_db, consistency=quality.consistency,
                        uncertainty=quality.uncertainty, draws=quality.draws)


def fidelity_warning(result: SeriesResult, floor_db: float) -> str | None:
    """The flag of a series whose output does not reproduce its acquisition well enough (None if it does,
    or if the method makes no fidelity figure). Goes into the job record and the output's ImageComments."""
    if result.fidelity_db is None or result.fidelity_db >= floor_db:
        return None
    return (f"CineSR: low fidelity to the acquisition ({result.fidelity_db:.1f} dB, floor {floor_db:g} dB; "
            f"data consistency {result.consistency}): the output re-acquired differs from the acquired frames; "
            "read with care")
