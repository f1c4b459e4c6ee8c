"""ModelMethod (the model's inference path through an engine): parameters, series-wide normalisation,
any matrix size, batching, backends agree on a whole series, the bundle's shipped options, and the
2-slice 4-frame 64x64 study within the time budget. The path's own bookkeeping: tests/model/test_pipeline.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from cinesr.model.baseline import bicubic_up
from cinesr.model.cine import read_series
from cinesr.model.flow import interpolate_cine
from cinesr.model.intensity import Normalisation
from cinesr.model.metrics import psnr
from cinesr.model.pipeline import Options
from cinesr.model.windows import window_starts
from cinesr.worker.inference.engines import Engine, create_engine, load_model
from cinesr.worker.inference.engines.onnx_engine import OnnxEngine
from cinesr.worker.inference.engines.torch_engine import TorchEngine
from cinesr.worker.inference.modelsr import ModelMethod
from cinesr.worker.inference.pipeline import superresolve_series

from tests.models import moving_disc


class NearestEngine(Engine):
    """A model-free engine: each window's output is its lq frames upsampled by pixel replication.

    With it the method's bookkeeping (padding, tiles, windows, blending, crop, inverse map) must give
    back exactly the nearest-neighbour upsampling of the temporally interpolated input."""

    name = "nearest"

    def __init__(self, model) -> None:
        super().__init__(model, torch.device("cpu"))
        self.batches: list[int] = []

    def encode(self, images):
        return images[:, :, ::4, ::4]

    def denoise(self, x_scaled, t, lq):
        return lq

    def decode(self, latents):
        return latents.repeat_interleave(4, -2).repeat_interleave(4, -1)

    def superresolve(self, lq, noise, on_step=None):
        self.batches.append(int(lq.shape[0]))
        assert noise.shape == (self.plan.steps, lq.shape[0], self.geometry.latent_channels, 64, 64)
        for k in range(self.plan.steps):
            if on_step:
                on_step(k + 1, self.plan.steps)
        return lq.repeat_interleave(4, -2).repeat_interleave(4, -1)


def test_parameters_and_respaced_steps(tiny):
    method = ModelMethod(NearestEngine(tiny), Options(steps=5, stride=2))
    p = method.parameters()
    assert p["steps"] == 5 and p["stride"] == 2 and p["seed"] == 0 and p["consistency"] == "auto"
    assert p["weights"] == tiny.weights_hash[:16] and "backend" not in p
    assert method.engine.plan.timesteps[0] == 14 and len(method.engine.plan.timesteps) == 5
    with pytest.raises(ValueError, match="stride"):
        ModelMethod.configured(NearestEngine(tiny), stride=4)


def test_series_normalisation_spans_all_slices(tiny):
    from cinesr.model.cine import CineSeries, CineSlice
    from pydicom.dataset import Dataset

    def slice_(frames):
        return CineSlice(frames, np.arange(len(frames)) * 40.0, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]),
                         np.ones(2), [])

    dim, bright = moving_disc(2, 32, 32), moving_disc(2, 32, 32, seed=1) * 3
    series = CineSeries("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.4", [slice_(dim), slice_(bright)], Dataset())
    method = ModelMethod(NearestEngine(tiny), Options(steps=2, stride=3))
    units = method.units(series)
    assert units == 2 * len(window_starts(16, 3)) * 2
    result = superresolve_series(series, method)
    assert method.last.normalisation == Normalisation.fit([dim, bright])
    assert [f.shape for f in result.frames] == [(16, 128, 128), (16, 128, 128)]
    assert result.fidelity_db == method.last.fidelity_db and result.consistency in ("both", "area", "kspace")


@pytest.mark.parametrize("shape", [(48, 48), (96, 80), pytest.param((192, 192), marks=pytest.mark.slow)])
def test_model_any_matrix_size_gives_4x(tiny, shape):
    engine = OnnxEngine(tiny, "cpu")
    method = ModelMethod(engine, Options(steps=2, stride=3))
    out = method.superresolve_slice(moving_disc(2, *shape), lambda n: None)
    assert out.shape == (16, 4 * shape[0], 4 * shape[1])
    assert np.isfinite(out).all()


def test_output_does_not_depend_on_batch_size(tiny):
    engine = OnnxEngine(tiny, "cpu")
    frames = moving_disc(2, 40, 40)
    a = ModelMethod(engine, Options(steps=3), batch_size=1).superresolve_slice(frames, lambda n: None)
    b = ModelMethod(engine, Options(steps=3), batch_size=4).superresolve_slice(frames, lambda n: None)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * (a.max() - a.min()) / 100)
    c = ModelMethod(engine, Options(steps=3, seed=1)).superresolve_slice(frames, lambda n: None)
    assert np.abs(a - c).mean() > 1e-4 * (a.max() - a.min())  # the seed matters



def test_methods_sharing_an_engine_each_run_their_own_steps(tiny):
    """A worker or benchmark may keep one engine for several step counts: each method's run uses its own
    plan, whichever method was made (or ran) last."""
    engine = TorchEngine(tiny, "cpu", threads=1)
    frames = moving_disc(2, 32, 32)
    two = ModelMethod(engine, Options(steps=2, stride=3))
    one = ModelMethod(engine, Options(steps=1, stride=3))  # the engine is now on the 1-step plan
    shared = two.superresolve_slice(frames, lambda n: None)
    alone = ModelMethod(TorchEngine(tiny, "cpu", threads=1), Options(steps=2, stride=3)).superresolve_slice(
        frames, lambda n: None)
    np.testing.assert_array_equal(shared, alone)
    assert engine.plan.steps == 2 and one.units(_series(frames)) == len(window_starts(16, 3))
    assert engine.plan.steps == 1


def _series(frames):
    from cinesr.model.cine import CineSeries, CineSlice
    from pydicom.dataset import Dataset

    s = CineSlice(frames, np.arange(len(frames)) * 40.0, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), np.ones(2), [])
    return CineSeries("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.4", [s], Dataset())

@pytest.mark.slow
def test_backends_agree_on_a_whole_series(tiny):
    """Same seed, whole-slice output (15 steps): onnxruntime vs torch eager."""
    frames = moving_disc(2, 40, 40)
    outs = {}
    for engine in (OnnxEngine(tiny, "cpu"), TorchEngine(tiny, "cpu", threads=1)):
        outs[engine.name] = ModelMethod(engine, Options(seed=0)).superresolve_slice(frames, lambda n: None)
    a, b = outs["onnx"], outs["torch"]
    rng = float(b.max() - b.min())
    assert psnr(a, b, data_range=rng) > 60.0
    assert np.abs(a - b).max() < 1e-2 * rng


@pytest.mark.slow
def test_lowres_study_superresolves_in_time(lowres_study):
    """Acceptance: a 2-slice, 4-frame 64x64 study -> 2 x 32 frames of 256x256 in well under 2 min on CPU."""
    (series,) = read_series(lowres_study / "lowres")
    assert series.shape[0] == 2 and series.shape[1] == 4 and series.shape[2:] == (64, 64)
    engine = create_engine("auto", "cpu", None)
    method = ModelMethod(engine)
    seen = []
    start = time.perf_counter()
    result = superresolve_series(series, method, lambda d, t: seen.append((d, t)))
    elapsed = time.perf_counter() - start
    assert [f.shape for f in result.frames] == [(32, 256, 256)] * 2
    assert seen[-1][0] == seen[-1][1] and elapsed < 120, elapsed
    if engine.model.source["kind"] == "bundle":
        # a trained model stays close to the baseline's intensities (random weights would not)
        base = bicubic_up(interpolate_cine(series.slices[0].frames, 8), 4)
        assert abs(float(result.frames[0].mean()) - float(base.mean())) < 0.25 * float(base.std())


def test_default_options_come_from_the_bundle(tmp_path):
    from cinesr.model.bundle import save_bundle, write_meta

    net = load_model("tiny", seed=4)
    bundle = save_bundle(tmp_path / "b", net.unet, net.vqgan, net.config, meta={"name": "s"})
    assert ModelMethod(NearestEngine(load_model(bundle))).options == Options()
    write_meta(bundle, {"inference": {"stride": 2, "sampler": "ddim", "temperature": 0.5}})
    shipped = ModelMethod(NearestEngine(load_model(bundle)))
    assert shipped.options.stride == 2 and shipped.options.sampler == "ddim"
    assert shipped.engine.plan.sampler == "ddim" and shipped.engine.plan.temperature == 0.5
    assert ModelMethod.configured(NearestEngine(load_model(bundle)), stride=1, seed=None).options.stride == 1


def test_batches_across_slices_give_the_same_series(tiny):
    from cinesr.model.cine import CineSeries, CineSlice
    from pydicom.dataset import Dataset

    def slice_(frames):
        return CineSlice(frames, np.arange(len(frames)) * 40.0, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]),
                         np.ones(2), [])

    series = CineSeries("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.4",
                        [slice_(moving_disc(2, 32, 32)), slice_(moving_disc(2, 32, 32, seed=2) * 2)], Dataset())
    engine = OnnxEngine(tiny, "cpu")
    method = ModelMethod(engine, Options(steps=2), batch_size=4)
    per_slice = superresolve_series(series, method).frames
    done: list[int] = []
    together = method.superresolve_series(series, done.append)
    assert sum(done) == method.units(series)
    for a, b in zip(per_slice, together, strict=True):
        assert a.shape == b.shape == (16, 128, 128)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(a.max() - a.min()))
