"""The learned super-resolution method as a pipeline Method: the model's one inference path
(cinesr.model.pipeline) run through an inference engine.

Only one batch of windows is in flight at a time, so engine memory depends on the batch size, not on
the series length. The noise of every window is drawn from a generator seeded by (seed, window, tile),
so the output does not depend on the backend, the batch size or the order the jobs run in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cinesr.model.cine import CineSeries
from cinesr.model.pipeline import Options, Result, superresolve_slices, units
from cinesr.worker.inference.engines.base import Engine


@dataclass
class ModelMethod:
    """The latent diffusion model as a pipeline `Method` (see cinesr.worker.inference.pipeline).

    engine: any Engine (create_engine(...)). options: what changes the output (cinesr.model.pipeline.Options);
    fields left unset come from the bundle's model.json `inference` section, then the Options defaults.
    batch_size: windows per engine call (None: the engine's preferred batch).
    """

    engine: Engine
    options: Options | None = None
    batch_size: int | None = None
    name: str = "model"
    version: str = ""
    last: Result | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = Options.from_mapping(self.engine.model.meta.get("inference"))
        self.options = self.options.for_model(self.engine.model.student_steps)
        if self.batch_size is None:
            self.batch_size = self.engine.preferred_batch
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        g = self.engine.geometry
        if not self.options.overlap < g.lq_size // 2:
            raise ValueError(f"overlap must be in [0, {g.lq_size // 2})")
        self.apply_plan()
        if not self.version:
            src = self.engine.model.source
            self.version = str(src.get("version") or f"{src.get('name', 'model')}-{str(src['sha256'])[:12]}")

    def apply_plan(self) -> None:
        """Put the engine on this method's sampler plan (it may serve other methods, other step counts,
        between this one's runs; each run calls this first)."""
        self.engine.set_steps(self.options.steps, self.options.sampler, self.options.temperature)

    @classmethod
    def configured(cls, engine: Engine, **overrides: Any) -> ModelMethod:
        """The bundle's shipped options with some of them overridden (None values are ignored)."""
        return cls(engine, Options.from_mapping(engine.model.meta.get("inference"), **overrides))

    # -- Method protocol ---------------------------------------------------------------------------
    def parameters(self) -> dict[str, object]:
        # no backend/device/batch size here: they do not change the output beyond rounding, and the
        # derived UIDs must not change with them
        o = self.options
        return {**o.parameters(), "steps": self.engine.plan.steps,
                "weights": str(self.engine.model.source["sha256"])[:16]}

    def units(self, series: CineSeries, draws: int = 1) -> int:
        """Progress units: sampler steps x windows x tiles over all slices (x draws)."""
        self.apply_plan()
        return units([s.frames.shape for s in series.slices], self.engine, self.options, draws)

    def superresolve_slice(self, frames: np.ndarray, step: Callable[[int], None]) -> np.ndarray:
        """(T, h, w) in series units -> (8T, 4h, 4w) in series units (the slice as a series of its own)."""
        self.apply_plan()
        self.last = superresolve_slices([np.asarray(frames)], self.engine, self.options,
                                        batch_size=self.batch_size, step=step)
        return self.last.frames[0]

    def superresolve_series(self, series: CineSeries, step: Callable[[int], None] | None = None,
                            draws: int = 1) -> list[np.ndarray]:
        """All slices of a series with one intensity map and batches across slices: per slice (8T, 4h, 4w)
        in series units; `step` counts the same units as units(series, draws). The result (with its fidelity,
        and with draws > 1 its uncertainty) is `last`."""
        self.apply_plan()
        self.last = superresolve_slices([s.frames for s in series.slices], self.engine, self.options,
                                        batch_size=self.batch_size, step=step, draws=draws)
        return self.last.frames

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "version": self.version, **self.parameters(),
                "batch_size": self.batch_size, "engine": self.engine.describe()}
