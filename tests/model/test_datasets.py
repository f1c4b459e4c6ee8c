"""Datasets: patient splits, phantom and DICOM sources, seeded sample streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cinesr.model.acquisition import write_phantom
from cinesr.model.datasets import (
    SPLITS,
    DicomSource,
    PhantomSource,
    SampleDataset,
    normalise_intensity,
    open_source,
    parse_seeds,
    resize_square,
    split_of,
    split_patients,
)
from cinesr.model.degrade import DegradationConfig
from cinesr.model.errors import InputError
from cinesr.model.intensity import CLIP
from cinesr.model.phantom import make_study


def test_split_is_stable_disjoint_and_roughly_proportional() -> None:
    ids = [str(i) for i in range(2000)]
    splits = {s: {p for p in ids if split_of(p) == s} for s in SPLITS}
    assert sum(len(v) for v in splits.values()) == len(ids)
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    assert 0.75 < len(splits["train"]) / len(ids) < 0.85
    assert 0.07 < len(splits["test"]) / len(ids) < 0.13
    # a patient's split does not depend on which other patients exist
    assert [split_of(p) for p in ids[:50]] == [split_of(p) for p in ids[:50]]
    with pytest.raises(ValueError):
        split_of("1", (0.5, 0.5, 0.5))


def test_phantom_source_splits_by_patient() -> None:
    source = PhantomSource(range(40), slices=1, frames=9, size=32)
    train, val, test = (set(split_patients(source, s)) for s in SPLITS)
    assert train and val | test
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert train | val | test == set(source.patients)
    assert split_patients(source, "all") == source.patients


def test_sample_dataset_draws_only_its_split_and_is_seeded() -> None:
    source = PhantomSource(range(12), slices=1, frames=9, size=64)
    ds = SampleDataset(source, "train", DegradationConfig(kind="bicubic"), seed=3, length=4)
    allowed = set(split_patients(source, "train"))
    items = [ds[i] for i in range(4)]
    assert all(it["patient"] in allowed for it in items)
    assert items[0]["lq"].shape == (3, 16, 16) and items[0]["gt"].shape == (3, 64, 64)
    # the pipeline's intensity map: fitted on the low-resolution frames, clipped to the working range
    assert CLIP[0] <= float(items[0]["gt"].min()) and float(items[0]["gt"].max()) <= CLIP[1]
    assert float(items[0]["lq"].min()) == pytest.approx(-1.0, abs=0.05)
    again = SampleDataset(source, "train", DegradationConfig(kind="bicubic"), seed=3, length=4)[2]
    assert again["patient"] == items[2]["patient"]
    np.testing.assert_array_equal(again["gt"].numpy(), items[2]["gt"].numpy())
    batch = next(ds.batches(2))
    assert batch["lq"].shape == (2, 3, 16, 16)


def test_open_source_specs() -> None:
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    src = open_source("phantom:5,9:sax-fourier")
    assert isinstance(src, PhantomSource) and src.patients == ["5", "9"] and src.generator == "sax-fourier"
    with pytest.raises(InputError):
        open_source("phantom:x-y")
    with pytest.raises(InputError):
        open_source("/no/such/folder")


def test_resize_square_and_normalise() -> None:
    frames = np.random.default_rng(0).random((2, 120, 160)).astype(np.float32) * 300
    out = resize_square(frames, 256)
    assert out.shape == (2, 256, 256)
    norm = normalise_intensity(frames)
    assert norm.min() >= 0 and norm.max() == pytest.approx(1.0)


def test_dicom_source_reads_a_dsb_style_folder(tmp_path: Path) -> None:
    # <patient>/study/sax_<n>/*.dcm as in the Data Science Bowl: one folder per slice
    for seed in (1, 2):
        study = make_study(seed, slices=1, frames=10, size=64)
        written = write_phantom(study, tmp_path / "staging", seed=seed)
        sax = tmp_path / "data" / f"patient{seed}" / "study" / "sax_5"
        sax.parent.mkdir(parents=True)
        written[0].folder.rename(sax)
    source = DicomSource(tmp_path / "data")
    assert source.patients == ["patient1", "patient2"]
    slices = source.load("patient1")
    assert len(slices) == 1 and slices[0].shape == (10, 256, 256)
    assert 0.0 <= slices[0].min() and slices[0].max() <= 1.0
    # same anatomy as the phantom (upsampled 4x): strongly correlated with it
    truth = resize_square(make_study(1, slices=1, frames=10, size=64).frames[0], 256)
    assert np.corrcoef(slices[0].ravel(), truth.ravel())[0, 1] > 0.95
