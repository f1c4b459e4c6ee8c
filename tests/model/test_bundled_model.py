"""The shipped model (model/bundles/tiny) through the path that ships, with its shipped options.

First, do no harm: the acquisition shows two small bright dots inside a ring, a uniform interior and a
black background; the output must keep the dots (they are in the acquisition), paint no texture into the
uniform interior, leave the background black and put no dark halo round the ring. Then the issue's bar
on a cine source the project did not write (MotionClouds textures, area-averaged acquisition).
"""

from __future__ import annotations

import numpy as np
import pytest
from cinesr.model.baseline import baseline_superresolve
from cinesr.model.bundle import load_bundle
from cinesr.model.datasets import open_source
from cinesr.model.degrade import DegradationConfig
from cinesr.model.evaluate import acquire_sequence, model_output, score_frames, temporal_error
from cinesr.model.inference import TorchRunner
from cinesr.model.pipeline import Options

pytestmark = pytest.mark.slow

FRAMES, SIZE = 16, 128


@pytest.fixture(scope="module")
def shipped():
    model = load_bundle(None)
    options = Options.from_mapping(model.meta.get("inference")).for_model(model.student_steps)
    return TorchRunner.for_options(model, options), options


def ring_with_dots(frames: int = FRAMES, size: int = SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(t, h, w) in [0, 1]: a bright ring (wall) round a uniform mid-grey interior holding two bright dots
    of 8 output pixels (2 acquired pixels), the whole breathing a little; plus the regions to measure."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    c = size / 2
    out, masks = [], {}
    for k in range(frames):
        r = 0.28 * size * (1 + 0.04 * np.sin(2 * np.pi * k / frames))
        d = np.hypot(yy - c, xx - c)
        f = np.where(d < r, 0.35, 0.0)
        f = np.where((d >= r) & (d < r + 6), 0.9, f)
        dots = [(c - 0.1 * size, c - 0.08 * size), (c + 0.06 * size, c + 0.1 * size)]
        dot = np.zeros_like(f, dtype=bool)
        for y, x in dots:
            dot |= np.hypot(yy - y, xx - x) < 4
        f = np.where(dot, 0.95, f)
        out.append(f)
        if k == 0:
            masks = {"dots": dot, "interior": (d < r - 8) & ~np.any([np.hypot(yy - y, xx - x) < 12 for y, x in dots],
                                                                     axis=0),
                     "background": d > r + 18, "halo": (d >= r + 6) & (d < r + 12)}
    return np.stack(out).astype(np.float32), masks


@pytest.fixture(scope="module")
def ring(shipped) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    runner, options = shipped
    truth, masks = ring_with_dots()
    low = acquire_sequence(truth, np.random.default_rng(0), DegradationConfig(kind="area"))
    return model_output([low], runner, options)[0], baseline_superresolve(low), masks


def test_small_structures_survive_and_nothing_is_invented(ring) -> None:
    out, base, masks = ring
    first_model, first_base = out[0], base[0]  # frame 0 is acquired: its masks are exact
    dots_model = first_model[masks["dots"]].mean() - first_model[masks["interior"]].mean()
    dots_base = first_base[masks["dots"]].mean() - first_base[masks["interior"]].mean()
    assert dots_model > 0.9 * dots_base, (dots_model, dots_base)  # the dots are kept
    # no texture painted into the uniform interior, no lifted background, no dark halo
    assert out[:, masks["interior"]].std() < max(1.5 * base[:, masks["interior"]].std(), 0.01)
    assert abs(out[:, masks["background"]].mean()) < 0.01


def test_no_dark_halo_round_a_bright_rim(ring) -> None:
    # it undershot to -0.155 (bicubic baseline: -0.067) until the area consistency step kept a nonnegative
    # acquisition's output nonnegative (cinesr.model.consistency.enforce); -0.04 since
    out, base, masks = ring
    assert out[:, masks["halo"]].min() > base[:, masks["halo"]].min() - 0.02


def test_beats_the_baseline_on_textures_it_never_saw(shipped) -> None:
    runner, options = shipped
    source = open_source("phantom:1000:motioncloud", slices=1, frames=FRAMES * 2, size=SIZE)
    truth = source.load(source.patients[0])[0]
    low = acquire_sequence(truth, np.random.default_rng(1), DegradationConfig(kind="area"))
    out = np.clip(model_output([low], runner, options)[0], 0, 1)
    base = np.clip(baseline_superresolve(low), 0, 1)
    m, b = score_frames(out, truth), score_frames(base, truth)
    assert m["lpips"] <= 0.8 * b["lpips"], (m, b)
    assert m["psnr"] >= b["psnr"] - 0.1, (m, b)
    assert m["ssim"] >= b["ssim"] - 0.005, (m, b)
    assert temporal_error(out, truth) <= 1.05 * temporal_error(base, truth)
