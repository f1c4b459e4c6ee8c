"""`auto` consistency reads the acquisition from the acquired frames: a k-space truncation rings beside bright
edges on a dark background, an area average does not; content without dark regions counts as area-averaged."""

from __future__ import annotations

import numpy as np
import pytest
from cinesr.model import consistency, ringing
from cinesr.model.datasets import open_source
from cinesr.model.degrade import area_down, kspace_down


def _truth(generator: str, seed: int) -> np.ndarray:
    source = open_source(f"phantom:{seed}:{generator}", slices=1, frames=8, size=128)
    return source.load(source.patients[0])[0].astype(np.float64)


# the heart phantoms (ours) and MRPhantom (a package's, whose ringing is faint: the 1% rule)
@pytest.mark.parametrize(("generator", "seed"), [("sax", 2000), ("lax", 2001), ("mrphantom", 2000)])
def test_a_kspace_acquisition_rings_and_an_area_one_does_not(generator: str, seed: int) -> None:
    truth = _truth(generator, seed)
    assert consistency.detect([kspace_down(truth)]) == "kspace"
    assert consistency.detect([area_down(truth)]) == "area"
    # the measure behind it: bumps beside bright edges in the dark, far more for the k-space acquisition
    near_k, _, count, _ = ringing.bump_rates([kspace_down(truth)], 0.01)
    near_a, _, _, _ = ringing.bump_rates([area_down(truth)], 0.01)
    assert count >= ringing.MIN_PIXELS and near_k > 2 * near_a + 0.03, (near_k, near_a)


def test_content_without_dark_regions_counts_as_area_averaged() -> None:
    truth = _truth("motioncloud", 2000)
    assert ringing.bump_rates([kspace_down(truth)], 0.01)[2] < ringing.MIN_PIXELS
    assert consistency.detect([kspace_down(truth)]) == "area"



@pytest.mark.parametrize("seed", [1, 4, 6])
def test_the_demo_acquisition_reads_as_area_averaged(seed: int) -> None:
    """The demo's study (`sax` at 256, area-averaged to 64) has fine structure of its own in dark regions that
    recurs from frame to frame; a cue that tells structure from noise (bumps that persist) read these seeds as
    k-space, and the k-space projection cost them SSIM. Ringing needs more than persistence."""
    from cinesr.model.phantom import degrade_acquisition, make_study

    acquired = degrade_acquisition(make_study(seed, slices=2, frames=32, size=256, generator="sax"))
    assert consistency.detect([np.asarray(f, np.float32) for f in acquired.frames]) == "area"
