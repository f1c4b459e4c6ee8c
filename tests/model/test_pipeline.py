"""The one inference path: bookkeeping (padding, tiles, windows, blending, crop, intensity map) checked
with a model-free runner, data consistency and the fidelity figure, seeds and batches with real networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cinesr.model import consistency
from cinesr.model.bundle import load_bundle
from cinesr.model.diffusion import SamplerPlan, Schedule
from cinesr.model.flow import interpolate_cine
from cinesr.model.inference import TorchRunner
from cinesr.model.intensity import Normalisation
from cinesr.model.pipeline import Options, superresolve_slices, units
from cinesr.model.windows import Geometry, pad_to, tile_starts, window_starts

from tests.models import moving_disc


class NearestRunner:
    """Each window's output is its lq frames enlarged by pixel replication (no network), times `gain`."""

    def __init__(self, steps: int = 3, gain: float = 1.0) -> None:
        self.geometry = Geometry()
        self.plan = SamplerPlan.from_schedule(Schedule.from_config({}), steps)
        self.batches: list[int] = []
        self.gain = gain

    def superresolve(self, lq, noise, on_step=None):
        self.batches.append(int(lq.shape[0]))
        assert noise.shape == (self.plan.steps, lq.shape[0], 3, 64, 64)
        for k in range(self.plan.steps):
            if on_step:
                on_step(k + 1, self.plan.steps)
        return self.gain * lq.repeat_interleave(4, -2).repeat_interleave(4, -1)


def test_normalisation_is_robust_and_exactly_invertible() -> None:
    x = moving_disc(4, 32, 32)
    x[0, 0, 0] = 1e6  # one hot pixel must not set the range
    n = Normalisation.fit([x])
    assert n.hi < 2000
    y = n.forward(x)
    assert np.percentile(y, 0.5) == pytest.approx(-1, abs=1e-3)
    assert np.percentile(y, 99.5) == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(n.inverse(y), x, rtol=1e-6, atol=1e-3)
    flat = Normalisation.fit([np.full((2, 4, 4), 7.0)])
    assert flat.hi > flat.lo


def test_tiles_and_windows_cover_everything() -> None:
    for size in (64, 65, 100, 192, 300):
        starts = tile_starts(size, 64, 16)
        assert starts[0] == 0 and starts[-1] == size - 64
        assert all(b - a <= 48 for a, b in zip(starts, starts[1:], strict=False))
    for stride in (1, 2, 3):
        covered = {(s + c) % 32 for s in window_starts(32, stride) for c in range(3)}
        assert covered == set(range(32))
    assert len(window_starts(32, 3)) == 11 and len(window_starts(32, 1)) == 32


def test_small_frames_are_centred_in_their_mirror_image_not_flat_streaks() -> None:
    # a 32-pixel acquisition in a 64-pixel tile (and smaller): the frame sits in the middle, the pad continues
    # it as its mirror on every side
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (20, 45), (9, 64)):
        frames = rng.random((2, h, w)).astype(np.float32)
        padded, top, left = pad_to(frames, 64, 64)
        assert padded.shape == (2, 64, 64)
        assert (top, left) == ((64 - h) // 2, (64 - w) // 2)
        assert np.array_equal(padded[:, top : top + h, left : left + w], frames)
        below = padded[:, top + h : top + 2 * h, left : left + w]
        assert np.array_equal(below, frames[:, ::-1][:, : below.shape[1]])
        above = padded[:, max(top - h, 0) : top, left : left + w]
        assert np.array_equal(above[:, ::-1], frames[:, : above.shape[1]])
        # no row of the pad repeats one value (edge replication did: flat streaks)
        assert padded.std(axis=1).min() > 0
    assert pad_to(frames, 8, 8)[0] is frames


@pytest.mark.parametrize("shape", [(48, 48), (96, 80), (150, 100)])
@pytest.mark.parametrize("stride", [1, 3])
def test_bookkeeping_reproduces_nearest_upsampling(shape: tuple[int, int], stride: int) -> None:
    runner = NearestRunner()
    frames = moving_disc(3, *shape)
    done: list[int] = []
    options = Options(stride=stride, consistency="off")
    result = superresolve_slices([frames], runner, options, batch_size=5, step=done.append)
    out = result.frames[0]
    h, w = shape
    assert out.shape == (24, 4 * h, 4 * w)
    norm = Normalisation.fit([frames])
    lq = interpolate_cine(norm.forward(frames), 8)
    expected = norm.inverse(lq.repeat(4, -2).repeat(4, -1))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-2)
    # frames come back in time order: output frame 8i is input frame i
    np.testing.assert_allclose(out[8][::4, ::4], frames[1], rtol=1e-5, atol=1e-2)
    # progress: every job reports every step; batches never exceed the batch size
    assert max(runner.batches) <= 5
    assert sum(done) == sum(runner.batches) * 3 == units([frames.shape], runner, options)


@pytest.mark.parametrize("mode", ["area", "kspace", "auto", "both"])
def test_consistency_makes_the_output_reproduce_the_acquisition(mode: str) -> None:
    """Whatever the network returns (here a blocky enlargement with the wrong contrast), the shipped output
    re-acquired gives back the acquired frames (`both`, the mean of the two projections: to within half
    their disagreement, measured with the model that explains it best); `off` leaves the network's output
    as is. The k-space model's default taper leaves the band's outer 40% partly to the network: there the
    agreement is the fidelity figure's, below it exact; with the taper off, exact throughout."""
    frames = moving_disc(2, 48, 48)
    off = superresolve_slices([frames], NearestRunner(gain=0.8), Options(consistency="off"))
    on = superresolve_slices([frames], NearestRunner(gain=0.8), Options(consistency=mode))
    assert off.consistency == "off" and on.fidelity_model in consistency.KINDS
    assert on.consistency == (on.fidelity_model if mode == "auto" else mode)
    # a network 20% off in contrast: tapered k-space 36.7 dB, the rest 46.7 dB (both) or exact (99)
    assert on.fidelity_db > off.fidelity_db + 10 and on.fidelity_db > 35, (on.fidelity_db, off.fidelity_db)
    assert on.noise_sigma == pytest.approx(15.0, rel=0.2)
    span = float(frames.max() - frames.min())
    slack = 0.03 * span if mode == "both" else 0.01 * span
    residual = consistency.acquire(on.frames[0][::8], on.fidelity_model) - frames
    if mode != "both":  # below the taper the re-acquired spectrum is the acquired one
        f = np.abs(np.fft.fftfreq(48))
        inner = np.abs(np.fft.fft2(residual))[:, f < 0.28][:, :, f < 0.28]
        assert inner.max() < 1e-3 * np.abs(np.fft.fft2(frames)).max(), inner.max()
    exact = superresolve_slices([frames], NearestRunner(gain=0.8), Options(consistency=mode, kspace_taper=0))
    reacquired = consistency.acquire(exact.frames[0][::8], exact.fidelity_model)
    assert np.abs(reacquired - frames).max() < slack, np.abs(reacquired - frames).max() / span


def test_a_kspace_acquisition_gets_its_own_detail_gate() -> None:
    """The detail gate's threshold is `kspace_gate` where the series is read as k-space-truncated (its rings
    are contrast the truth lacks) and `detail_gate` elsewhere; each setting changes only its own series."""
    frames = moving_disc(2, 48, 48)

    def run(**options: object) -> np.ndarray:
        return superresolve_slices([frames], NearestRunner(), Options(**options)).frames[0]

    for mode, own, other in (("kspace", "kspace_gate", "detail_gate"), ("area", "detail_gate", "kspace_gate")):
        first = run(consistency=mode, **{own: 0.03, other: 0.03})
        np.testing.assert_array_equal(first, run(consistency=mode, **{own: 0.03, other: 0.3}))
        changed = np.abs(first - run(consistency=mode, **{own: 0.3, other: 0.03})).max()
        assert changed > 0.01 * float(frames.max() - frames.min()), (mode, changed)


def test_acquired_frames_are_held_to_the_acquisition_and_their_corrections_follow_the_motion() -> None:
    """consistent_frames='acquired': the frames at acquired trigger times reproduce the acquisition; the frames
    between are not projected onto the interpolation (no measurement) but take the acquired frames' corrections
    carried along the motion, so a network 20% off in contrast is put right between them too, to within what
    a cross-fade of the corrections (no motion) leaves. 'all' projects every frame onto the interpolation."""
    frames = moving_disc(2, 48, 48)
    norm = Normalisation.fit([frames])
    lq = norm.inverse(interpolate_cine(norm.forward(frames), 8))
    span = float(frames.max() - frames.min())

    def residuals(mode: str) -> np.ndarray:
        out = superresolve_slices([frames], NearestRunner(gain=0.8),
                                  Options(consistency="area", consistent_frames=mode, detail_gate=0)).frames[0]
        return np.abs(consistency.acquire(out, "area") - lq).reshape(16, -1).max(axis=1) / span

    every, acquired = residuals("all"), residuals("acquired")
    assert every.max() < 1e-3
    assert acquired[::8].max() < 1e-3  # the acquired frames: exact
    between = np.delete(acquired, [0, 8])
    # carried along the motion: within 0.3% of the range (a cross-fade of the corrections leaves 0.8%, the
    # network alone 20%)
    assert 1e-3 < between.max() < 0.005, between


def test_shared_noise_gives_every_window_of_a_tile_the_same_start() -> None:
    """shared_noise: the windows of a tile (they overlap in time) start from one noise draw; by default each
    window draws its own. Tiles differ either way."""

    class Recording(NearestRunner):
        def __init__(self) -> None:
            super().__init__()
            self.noise: list[torch.Tensor] = []

        def superresolve(self, lq, noise, on_step=None):
            self.noise += list(noise.unbind(1))
            return super().superresolve(lq, noise, on_step)

    frames = moving_disc(2, 100, 24)  # two tiles across, one down: 16 windows of each
    for shared in (False, True):
        runner = Recording()
        superresolve_slices([frames], runner, Options(shared_noise=shared, overlap=16))
        per_tile = [runner.noise[k::2] for k in range(2)]  # jobs run window by window, tile by tile
        assert len(per_tile[0]) == 16
        same = [torch.equal(per_tile[0][0], n) for n in per_tile[0][1:]]
        assert all(same) if shared else not any(same)
        assert not torch.equal(per_tile[0][0], per_tile[1][0])


def test_runs_are_seeded_and_batch_invariant(micro_bundle: Path) -> None:
    bundle = load_bundle(micro_bundle)
    frames = moving_disc(2, 24, 24)
    runner = TorchRunner(bundle, steps=3)

    def run(seed: int, batch: int) -> np.ndarray:
        options = Options(steps=3, seed=seed, overlap=4)
        return superresolve_slices([frames], runner, options, batch_size=batch).frames[0]

    a, b, c = run(3, 1), run(3, 4), run(4, 1)
    assert a.shape == (16, 96, 96)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(a.max() - a.min()))
    assert np.abs(a - c).mean() > 1e-5 * float(a.max() - a.min())  # the seed drives the sampler's noise


def test_deterministic_sampler_needs_no_noise(micro_bundle: Path) -> None:
    bundle = load_bundle(micro_bundle)
    frames = moving_disc(2, 16, 16)
    outs = [superresolve_slices([frames], TorchRunner(bundle, 3, "ddim", 0.0),
                                Options(steps=3, sampler="ddim", temperature=0.0, seed=s, overlap=4)).frames[0]
            for s in (1, 2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert torch.isfinite(torch.from_numpy(outs[0])).all()


def test_options_reject_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="stride"):
        Options(stride=4)
    with pytest.raises(ValueError, match="consistency"):
        Options(consistency="maybe")
    with pytest.raises(ValueError, match="detail_gate"):
        Options(detail_gate=-0.1)
    with pytest.raises(ValueError, match="kspace_gate"):
        Options(kspace_gate=1.0)
    assert Options.from_mapping({"stride": 2, "unknown": 1}, seed=5) == Options(stride=2, seed=5)
