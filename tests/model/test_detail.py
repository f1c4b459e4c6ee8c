"""The detail gate: the network's detail stays where the acquisition shows structure, goes where it is flat."""

from __future__ import annotations

import numpy as np
from cinesr.model.consistency import bicubic
from cinesr.model.detail import gate, local_contrast


def scene() -> np.ndarray:
    """(1, 32, 32) acquired: a flat left half (0.4), a bright 2-pixel dot in it, a checkerboard right half."""
    a = np.full((1, 32, 32), 0.4)
    a[0, 8:10, 6:8] = 0.9
    yy, xx = np.mgrid[:32, 16:32]
    a[0, :, 16:] = 0.2 + 0.6 * ((yy // 2 + xx // 2) % 2)
    return a


def test_flat_regions_lose_painted_texture_structure_keeps_it() -> None:
    acquired = scene()
    reference = bicubic(acquired, 4)
    painted = 0.05 * np.random.default_rng(0).standard_normal(reference.shape)
    out = gate(reference + painted, acquired, threshold=0.03)
    # flat, far from the dot and the textured half: the texture is gone, the acquisition's interpolation stays
    flat = (slice(None), slice(80, 120), slice(4, 44))
    assert np.abs(out[flat] - reference[flat]).max() < 1e-5
    # the checkerboard half and the dot keep the network's detail whole
    inner = (slice(None), slice(8, 120), slice(72, 112))
    assert np.allclose(out[inner], (reference + painted)[inner], atol=1e-5)
    dot = (slice(None), slice(32, 40), slice(24, 32))
    assert np.allclose(out[dot], (reference + painted)[dot], atol=1e-5)


def test_zero_threshold_changes_nothing_and_contrast_reads_the_acquisition() -> None:
    acquired = scene()
    frames = np.random.default_rng(1).random((1, 128, 128)).astype(np.float32)
    assert np.array_equal(gate(frames, acquired, threshold=0.0), frames)
    contrast = local_contrast(acquired)
    assert contrast.shape == (1, 128, 128)
    assert contrast[0, 100, 20] < 1e-6 and contrast[0, 60, 100] > 0.2
