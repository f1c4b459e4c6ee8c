"""The one inference path: a low-resolution cine series in, its super-resolution out.

    slices (T, h, w) in series units
    --(one intensity map for the whole series, cinesr.model.intensity)--> model units
    --(cyclic optical flow, x8 in time)--> 8T frames at h x w
    --(windows x tiles through a WindowRunner, blended; cinesr.model.windows)--> 8T x 4h x 4w
    --(detail gate, then data consistency with the acquisition; cinesr.model.detail, .consistency)--> 8T x 4h x 4w
    --(inverse intensity map)--> series units, and a fidelity figure per series

With draws=N > 1 the same path runs N times with the noise seeds seed, seed+1, ..., seed+N-1; the first draw is
the output, and the per-pixel standard deviation over all N is the uncertainty (series units): where the model
invents detail the acquisition does not pin down, its draws disagree.

`cinesr superresolve`, the service's workers, `cinesr evaluate`, training validation and the model
card all run `superresolve_slices`; only the runner differs (an inference engine of the worker, or
`cinesr.model.inference.TorchRunner` for a bundle in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from . import consistency, detail
from .flow import Flows, cine_flows, interpolate_cine, scale_flows
from .intensity import CLIP, PERCENTILES, Normalisation, clip
from .windows import WINDOW, WindowRunner, progress_units, superresolve_stacks

TEMPORAL_FACTOR = 8
CONSISTENT_FRAMES = ("all", "acquired")


@dataclass(frozen=True)
class Options:
    """Everything that changes the output (and so enters the derived UIDs), with the defaults that ship.

    steps: sampler steps (<= the model's T; fewer are respaced); sampler / temperature: see
    cinesr.model.diffusion.SamplerPlan; seed: noise seed; stride: frames between window starts (1..3:
    1 blends three windows per frame, 3 takes each frame from one); overlap: lq pixels shared by
    neighbouring tiles; channel_weights: how much each frame of a window counts in the blend;
    consistency: data-consistency mode (both, auto, area, kspace, off); tolerance: residuals up to this many times
    the acquisition's estimated noise level are left alone (noise is no structure); detail_gate: part of the
    consistency step (off with it): where the acquisition's local contrast is below this share of the
    intensity map's range, the output keeps the acquisition's interpolation (cinesr.model.detail);
    kspace_gate: the detail gate's threshold where the acquisition is read as k-space-truncated (its Gibbs
    rings give regions the truth shows flat a local contrast of their own); kspace_taper: the k-space
    model's band is exact below this outer share of it and tapers to the network's own band across it
    (cinesr.model.consistency.enforce); temporal: frames out per frame in; shared_noise: every window of a
    tile starts from the same sampler noise (cinesr.model.windows); consistent_frames: which output frames the
    consistency step holds to the acquisition: `acquired` (the frames at acquired trigger times; the frames
    between take their corrections carried along the acquisition's motion) or `all` (every frame, against the
    flow interpolation of the acquisition at its time, which is no measurement).
    """

    steps: int = 15
    sampler: str = "ancestral"
    temperature: float = 1.0
    seed: int = 0
    stride: int = 1
    overlap: int = 16
    percentiles: tuple[float, float] = PERCENTILES
    channel_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)
    consistency: str = "auto"  # kspace where the acquisition rings, else area; measured: see the bundled model.json
    tolerance: float = 0.0  # >0: residuals up to this many times the estimated noise level are left (noisy input)
    detail_gate: float = 0.03  # network detail only where the acquisition's local contrast tops this share of the range
    kspace_gate: float = 0.065  # the same for a k-space acquisition, whose rings are contrast the truth lacks
    kspace_taper: float = 0.4  # the k-space band's outer 40% blends in the network's own: an exact edge rings
    temporal: int = TEMPORAL_FACTOR
    shared_noise: bool = False  # one noise draw per tile for all its windows (else one per window)
    consistent_frames: str = "acquired"  # `all` projects onto interpolated frames too: flicker (see model.json)

    def __post_init__(self) -> None:
        # a mapping or `bench/options.py --vary shared_noise=0,1` gives 0/1; records and UIDs want a bool
        object.__setattr__(self, "shared_noise", bool(self.shared_noise))
        if not 1 <= self.stride <= WINDOW:
            raise ValueError(f"stride must be 1..{WINDOW} (larger strides leave frames uncovered)")
        if self.consistency not in consistency.MODES:
            raise ValueError(f"consistency must be one of {', '.join(consistency.MODES)}")
        if self.overlap < 0:
            raise ValueError("overlap must be >= 0")
        if self.tolerance < 0:
            raise ValueError("tolerance must be >= 0")
        if not 0 <= self.detail_gate < 1:
            raise ValueError("detail_gate must be in [0, 1)")
        if not 0 <= self.kspace_gate < 1:
            raise ValueError("kspace_gate must be in [0, 1)")
        if not 0 <= self.kspace_taper < 1:
            raise ValueError("kspace_taper must be in [0, 1)")
        if self.consistent_frames not in CONSISTENT_FRAMES:
            raise ValueError(f"consistent_frames must be one of {', '.join(CONSISTENT_FRAMES)}")

    def parameters(self) -> dict[str, Any]:
        """The options as plain values (for model.json, job records and DerivationDescription)."""
        d = asdict(self)
        d["percentiles"], d["channel_weights"] = list(self.percentiles), list(self.channel_weights)
        return d

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, **overrides: Any) -> Options:
        """Options from a mapping (a bundle's model.json `inference`), unknown keys ignored, then overrides."""
        known = {f for f in cls.__dataclass_fields__}
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (values or {}).items() if k in known}
        return cls(**{**given, **{k: v for k, v in overrides.items() if v is not None}})

    def with_(self, **changes: Any) -> Options:
        return replace(self, **changes)

    def for_model(self, student_steps: tuple[int, ...]) -> Options:
        """The options as they run on a model: a distilled student serves its step counts with the
        deterministic sampler it learned (whatever sampler the options name for the teacher)."""
        return self.with_(sampler="ddim") if self.steps in student_steps else self


@dataclass
class Result:
    """Per slice (temporal*T, 4h, 4w) in series units; the fitted intensity map; the data-consistency
    model applied (or 'off'); the fidelity figure of the whole series (dB, see consistency.fidelity_db) and the
    model it was measured with; the acquisition's estimated noise level (series units)."""

    frames: list[np.ndarray]
    normalisation: Normalisation
    consistency: str
    fidelity_db: float
    fidelity_model: str = "area"
    noise_sigma: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # per slice (temporal*T, 4h, 4w): the per-pixel standard deviation over `draws` draws (series units);
    # None for one draw
    uncertainty: list[np.ndarray] | None = None
    draws: int = 1


def units(shapes: list[tuple[int, int, int]], runner: WindowRunner, options: Options, draws: int = 1) -> int:
    """Progress units of superresolve_slices over slices of these (T, h, w) shapes (and `draws` draws)."""
    stacked = [(t * options.temporal, h, w) for t, h, w in shapes]
    return progress_units(stacked, runner, options.stride, options.overlap) * max(draws, 1)


def upsample_time(frames: np.ndarray, factor: int, flows: Flows | None = None) -> np.ndarray:
    """(T, h, w) -> (factor*T, h, w) by cyclic optical flow (unchanged when factor is 1); flows: the
    frames' cine_flows when already known."""
    return np.asarray(frames, np.float32) if factor == 1 else interpolate_cine(frames, factor, flows=flows)


def superresolve_slices(
    slices: list[np.ndarray],
    runner: WindowRunner,
    options: Options = Options(),
    *,
    batch_size: int = 1,
    step: Callable[[int], None] | None = None,
    draws: int = 1,
) -> Result:
    """The super-resolution of one series given as its slices' (T, h, w) frames in series units; with
    draws > 1 also its uncertainty (see the module docstring)."""
    if draws < 1:
        raise ValueError("draws must be >= 1")
    first = _one_draw(slices, runner, options, batch_size, step)
    if draws == 1:
        return first
    # Later draws differ in their noise alone: the data-consistency model the first draw chose is kept, so
    # the spread measures the sampler, not a switch between consistency models.
    same = options.with_(consistency=first.consistency)
    # float32 running sums: a clinical series' output is already hundreds of MB per copy; N <= 32 draws of
    # values far above their spread lose nothing that matters in single precision
    mean = [np.array(f, dtype=np.float32) for f in first.frames]
    m2 = [np.zeros_like(m) for m in mean]
    for k in range(1, draws):
        other = _one_draw(slices, runner, same.with_(seed=options.seed + k), batch_size, step)
        for i, frames in enumerate(other.frames):  # Welford: one pass, two arrays per slice whatever N
            delta = frames - mean[i]
            mean[i] += delta / (k + 1)
            m2[i] += delta * (frames - mean[i])
        for name, seconds in other.timings.items():
            first.timings[name] = first.timings.get(name, 0.0) + seconds
    first.uncertainty = [np.sqrt(np.maximum(m, 0) / (draws - 1)) for m in m2]
    first.draws = draws
    return first


def _consistent_at_acquired(frames: np.ndarray, lq: np.ndarray, flows: Flows, kind: str, sf: int,
                            tolerance: float, options: Options) -> np.ndarray:
    """Data consistency where something was measured: frames temporal*i are projected onto acquired frame i;
    the frames between take those corrections carried along the acquisition's motion (the flows the
    interpolation followed, on the output grid), so nothing jumps at an acquired frame."""
    t = options.temporal
    at = np.asarray(frames[::t], np.float32)
    fixed = consistency.enforce(at, lq[::t], kind, sf, tolerance=tolerance, taper=options.kspace_taper)
    return frames + interpolate_cine(fixed - at, t, flows=scale_flows(flows, sf))


def _one_draw(slices: list[np.ndarray], runner: WindowRunner, options: Options, batch_size: int,
              step: Callable[[int], None] | None) -> Result:
    import time

    if not slices:
        raise ValueError("no slices")
    size = runner.geometry.lq_size
    if any(max(np.asarray(s).shape[1:]) > size for s in slices) and not options.overlap < size // 2:
        raise ValueError(f"overlap must be in [0, {size // 2}) for this model's {size}-pixel tiles")
    for s in slices:
        if np.asarray(s).ndim != 3 or np.asarray(s).shape[0] < (1 if options.temporal == 1 else 2):
            raise ValueError(f"need (T>=2, h, w) frames per slice, got {np.asarray(s).shape}")
    started = time.perf_counter()
    norm = Normalisation.fit([np.asarray(s) for s in slices], *options.percentiles)
    acquired = [norm.forward(s) for s in slices]
    # the interpolation reproduces acquired frames exactly (frame temporal*i is frame i)
    flows = [cine_flows(a) if options.temporal > 1 else None for a in acquired]
    lq = [upsample_time(a, options.temporal, f) for a, f in zip(acquired, flows, strict=True)]
    timings = {"interpolate": time.perf_counter() - started}
    t0 = time.perf_counter()
    out = superresolve_stacks([clip(x) for x in lq], runner, seed=options.seed, stride=options.stride,
                              overlap=options.overlap, channel_weights=options.channel_weights,
                              batch_size=batch_size, step=step, shared_noise=options.shared_noise)
    timings["network"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # consistency in series units: the k-space model is of a magnitude image, whose zero means no signal
    sf = runner.geometry.sf
    out = [norm.inverse(o) for o in out]
    lq = [norm.inverse(x) for x in lq]
    mode = options.consistency
    kind = consistency.detect(slices) if mode == "auto" else mode
    sigma = consistency.noise_sigma([np.asarray(s, np.float32) for s in slices])
    tolerance = options.tolerance * sigma
    if kind != "off":
        threshold = (options.kspace_gate if kind == "kspace" else options.detail_gate) * (norm.hi - norm.lo)
        out = [detail.gate(o, x, threshold, sf) for o, x in zip(out, lq, strict=True)]
        if options.consistent_frames == "acquired" and options.temporal > 1:
            out = [_consistent_at_acquired(o, x, f, kind, sf, tolerance, options)
                   for o, x, f in zip(out, lq, flows, strict=True)]
        else:
            out = [consistency.enforce(o, x, kind, sf, tolerance=tolerance, taper=options.kspace_taper)
                   for o, x in zip(out, lq, strict=True)]
    low, high = norm.inverse(np.asarray(CLIP, np.float32))
    out = [np.clip(o, low, high) for o in out]
    measure = kind if kind in consistency.KINDS else consistency.choose(out, lq, sf)
    fidelity = consistency.fidelity_db(np.concatenate([o[:: options.temporal] for o in out]),
                                       np.concatenate([np.asarray(s, np.float32) for s in slices]), measure, sf,
                                       data_range=norm.hi - norm.lo, tolerance=tolerance)
    timings["consistency"] = time.perf_counter() - t0
    return Result(out, norm, kind, fidelity, measure, sigma, timings)
