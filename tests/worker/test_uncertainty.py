"""The uncertainty series: N draws of the model's one inference path, their per-pixel standard deviation written
as a second derived series (same geometry, its own description, image type and UIDs), and where it is high."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.model.cine import read_series
from cinesr.model.pipeline import Options, superresolve_slices, units
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.inference.engines import load_model
from cinesr.worker.inference.engines.torch_engine import TorchEngine
from cinesr.worker.inference.pipeline import BaselineMethod, superresolve_series

from .. import models
from ..dicomcheck import new_errors

OPTIONS = Options(steps=2, stride=3, overlap=4)


@pytest.fixture(scope="module")
def micro_engine(tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    return TorchEngine(load_model(models.micro_bundle(tmp_path_factory.mktemp("m") / "micro", 4)), "cpu")


def test_draws_are_the_output_plus_its_spread(micro_engine: TorchEngine) -> None:
    """The first draw is the output itself; the uncertainty is the sample standard deviation of the draws with
    seeds seed..seed+N-1, each a run of the same path."""
    frames = models.moving_disc(2, 16, 20, seed=1)
    micro_engine.set_steps(OPTIONS.steps)
    counted = []
    three = superresolve_slices([frames], micro_engine, OPTIONS.with_(seed=5), draws=3, step=counted.append)
    singles = [superresolve_slices([frames], micro_engine, OPTIONS.with_(seed=5 + k, consistency=three.consistency))
               for k in range(3)]
    np.testing.assert_array_equal(three.frames[0], singles[0].frames[0])
    expected = np.std(np.stack([s.frames[0] for s in singles]).astype(np.float64), axis=0, ddof=1)
    assert three.draws == 3 and three.uncertainty[0].shape == three.frames[0].shape == (16, 64, 80)
    np.testing.assert_allclose(three.uncertainty[0], expected, rtol=1e-4, atol=1e-3 * float(expected.max()))
    assert float(expected.max()) > 0  # the draws do differ
    # progress counts every draw
    assert sum(counted) == units([frames.shape], micro_engine, OPTIONS, 3) == 3 * units([frames.shape],
                                                                                          micro_engine, OPTIONS)
    assert superresolve_slices([frames], micro_engine, OPTIONS).uncertainty is None
    with pytest.raises(ValueError, match="draws"):
        superresolve_slices([frames], micro_engine, OPTIONS, draws=0)


def test_baseline_has_no_draws(lowres_study: Path) -> None:
    [series] = read_series(lowres_study / "lowres")
    with pytest.raises(ValueError, match="deterministic"):
        superresolve_series(series, BaselineMethod(), draws=4)


def test_uncertainty_series_geometry_description_and_uids(lowres_study: Path, tmp_path: Path) -> None:
    """Same geometry and timing as the SR series, instance for instance; its own description, image type,
    window and UIDs (deterministic, disjoint from the SR series'); no dciodvfy error the input lacks."""
    [series] = read_series(lowres_study / "lowres")
    sr = superresolve_series(series, BaselineMethod()).frames
    spread = [np.abs(f - f.mean(axis=0)) / 7.0 for f in sr]  # any non-negative map in series units
    derivation = Derivation("model", "t", {"steps": 1, "seed": 0})
    out = write_derived_series(series, sr, tmp_path / "a", derivation)
    unc = write_derived_series(series, spread, tmp_path / "a", derivation.uncertainty_of(4))
    again = write_derived_series(series, spread, tmp_path / "b", derivation.uncertainty_of(4))
    other = write_derived_series(series, spread, tmp_path / "c", derivation.uncertainty_of(3))
    assert unc.series_uid == again.series_uid and unc.sop_instance_uids == again.sop_instance_uids
    assert len({out.series_uid, unc.series_uid, other.series_uid}) == 3
    assert not set(unc.sop_instance_uids) & set(out.sop_instance_uids)
    assert not set(unc.sop_instance_uids) & set(other.sop_instance_uids)
    assert len(unc.files) == len(out.files) == 64
    same = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "TriggerTime",
            "InstanceNumber", "StudyInstanceUID", "FrameOfReferenceUID", "SliceLocation", "PatientID",
            "CardiacNumberOfImages", "SeriesDate")
    for a, b in zip(out.files, unc.files, strict=True):
        x, y = pydicom.dcmread(a), pydicom.dcmread(b)
        for keyword in same:
            assert x.get(keyword) == y.get(keyword), keyword
        assert x.SeriesNumber != y.SeriesNumber
    first = pydicom.dcmread(unc.files[0])
    assert first.SeriesDescription.endswith("CineSR uncertainty")
    assert pydicom.dcmread(out.files[0]).SeriesDescription.endswith(" CineSR")
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert "standard deviation over 4 draws" in first.DerivationDescription
    assert "uncertainty" in first.ImageComments
    # the pixels are the map, in the series' units (stored as integers)
    [back] = read_series(unc.folder)
    assert np.abs(back.slices[0].frames - np.rint(spread[0])).max() <= 0.51
    assert 0 < float(first.WindowWidth) < float(pydicom.dcmread(out.files[0]).WindowWidth)
    for path in unc.files[:2] + unc.files[-1:]:
        assert new_errors(path, series.files[0]) == set(), path


@pytest.mark.slow  # the shipped tiny model with its default steps, 3 draws of one 3-frame window
def test_deviation_is_high_where_the_truth_has_detail_the_input_lacks() -> None:
    """A held-out phantom: where the truth has fine detail that the 4x coarser acquisition averages away, the
    draws disagree more than where the truth is flat. Spatial only (temporal=1: the acquired frames, one window),
    so that the truth of every output frame is known and the test stays short."""
    from cinesr.model.baseline import bicubic_up
    from cinesr.model.bundle import load_bundle
    from cinesr.model.inference import TorchRunner
    from cinesr.model.phantom import degrade_acquisition, make_study

    seed = 2101  # not a training seed (0-59)
    truth = make_study(seed, slices=1, frames=24, size=256, noise=False).frames[0][::8]  # the acquired phases
    acquired = degrade_acquisition(make_study(seed, slices=1, frames=24, size=256)).frames[0]
    scale = 1000.0  # scanner-like units; the map comes back in the same units
    bundle = load_bundle()
    options = Options.from_mapping(bundle.meta.get("inference"), stride=3, temporal=1)
    result = superresolve_slices([acquired * scale], TorchRunner.for_options(bundle, options), options, draws=3)
    sd = result.uncertainty[0] / scale  # (3, 256, 256)
    assert sd.shape == truth.shape == (3, 256, 256)
    # detail the input lacks: what the truth holds beyond the bicubic upsampling of its own 4x4 block average
    blocks = truth.reshape(3, 64, 4, 64, 4).mean(axis=(2, 4))
    lost = np.abs(truth - np.stack([bicubic_up(b) for b in blocks]))

    def pool(a: np.ndarray) -> np.ndarray:  # 8x8 neighbourhoods: the map is smooth over a few pixels
        return a.reshape(3, 32, 8, 32, 8).mean(axis=(2, 4)).ravel()

    lost_b, sd_b = pool(lost), pool(sd)
    detailed = lost_b >= np.quantile(lost_b, 0.9)
    flat = lost_b <= np.quantile(lost_b, 0.25)
    ratio = float(sd_b[detailed].mean() / sd_b[flat].mean())
    correlation = float(np.corrcoef(lost_b, sd_b)[0, 1])
    print(f"uncertainty: detailed/flat mean deviation {ratio:.2f}, correlation with lost detail {correlation:.2f}")
    assert ratio > 2.0
    assert correlation > 0.3
