"""Engines: the shared sampling loop, backend selection, torch/onnxruntime parity, GPU and TensorRT paths."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cinesr.model.diffusion import sample, unet_denoiser
from cinesr.worker.inference.engines import (
    AUTO_ORDER,
    EngineUnavailable,
    SamplerPlan,
    candidates,
    create_engine,
    draw_noise,
    load_model,
)
from cinesr.worker.inference.engines.onnx_engine import OnnxEngine
from cinesr.worker.inference.engines.parity import TOLERANCES, compare_engines
from cinesr.worker.inference.engines.tensorrt_engine import plan_key
from cinesr.worker.inference.engines.torch_engine import TorchEngine

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def torch_cpu(tiny):
    return TorchEngine(tiny, "cpu", threads=1)  # one OpenMP thread: robust on a shared 2-core box


@pytest.fixture(scope="module")
def onnx_cpu(tiny, tmp_path_factory):
    return OnnxEngine(tiny, "cpu", onnx_dir=tmp_path_factory.mktemp("onnx"))


def test_load_model_is_seeded_and_hashed():
    a, b, c = load_model("tiny", seed=0), load_model("tiny", seed=0), load_model("tiny", seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert a.geometry.lq_size == 64 and a.geometry.image_size == 256 and a.geometry.latent_size == 64
    assert a.schedule.steps == 15


def test_engine_loop_equals_reference_sampler(tiny, torch_cpu):
    """The engines' loop (pre-drawn noise) is diffusion.sample with the same generator."""
    g = torch.Generator().manual_seed(3)
    c = tiny.geometry.latent_channels
    y, lq = torch.randn(2, c, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ref = sample(unet_denoiser(tiny.unet), y, lq, tiny.schedule, generator=torch.Generator().manual_seed(7))
    noise = draw_noise(tuple(y.shape), 15, torch.Generator().manual_seed(7))
    got = torch_cpu.sample(y, lq, noise)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())


def test_sampler_plan_full_and_respaced(tiny):
    full = SamplerPlan.from_schedule(tiny.schedule)
    assert full.timesteps == tuple(range(14, -1, -1)) and full.sigma[-1] == 0.0
    assert all(s > 0 for s in full.sigma[:-1])
    # b = 1 - a at every step (the mean is a convex combination of x_t and x0)
    assert all(abs(a + b - 1) < 1e-12 for a, b in zip(full.a, full.b, strict=True))
    few = SamplerPlan.from_schedule(tiny.schedule, 5)
    assert few.steps == 5 and few.timesteps[0] == 14 and few.timesteps[-1] == 0
    assert few.start_scale == pytest.approx(full.start_scale)
    with pytest.raises(ValueError, match="steps must be"):
        SamplerPlan.from_schedule(tiny.schedule, 16)


def test_candidates_follow_auto_order():
    assert candidates("auto", "auto") == list(AUTO_ORDER)
    assert candidates("auto", "cpu") == [("onnx", "cpu"), ("torch", "cpu")]
    assert candidates("torch", "auto") == [("torch", "cuda"), ("torch", "cpu")]
    with pytest.raises(ValueError, match="unknown backend"):
        candidates("jax")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only fallback")
def test_auto_falls_back_to_onnx_cpu_and_logs_why(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="cinesr.worker.inference.engines.select"):
        engine = create_engine("auto", "auto", tiny)
    assert (engine.name, engine.device.type) == ("onnx", "cpu")
    text = caplog.text
    assert "tensorrt" in text and "skipped" in text and "onnx(cpu) selected" in text


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="TensorRT is usable here")
def test_tensorrt_unavailable_is_one_clear_error(tiny):
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        create_engine("tensorrt", "auto", tiny)


def test_plan_key_names_what_a_plan_depends_on():
    k = plan_key("NVIDIA H100 80GB HBM3", "10.3.0", "ab" * 32, "unet", 8, True)
    assert k.startswith("NVIDIA-H100-80GB-HBM3_trt10.3.0_unet_b8_fp16_") and k.endswith(".plan")
    assert k != plan_key("NVIDIA H100 80GB HBM3", "10.4.0", "ab" * 32, "unet", 8, True)
    assert k != plan_key("NVIDIA H100 80GB HBM3", "10.3.0", "cd" * 32, "unet", 8, True)
    assert k != plan_key("NVIDIA A10", "10.3.0", "ab" * 32, "unet", 8, True)


def test_onnx_cpu_matches_torch_on_graphs_and_window(onnx_cpu, torch_cpu):
    """Parity (CPU): per graph and over a whole 15-step window (encode, sampler, decode)."""
    d = compare_engines(onnx_cpu, torch_cpu, batch=2, seed=0)
    tol = TOLERANCES["fp32"]
    assert d["encoder_max_abs"] < tol["encoder_max_abs"]
    assert d["unet_max_abs"] < tol["unet_max_abs"]
    assert d["decoder_max_abs"] < tol["decoder_max_abs"]
    assert d["window_psnr_db"] > tol["window_psnr_db"]
    assert d["window_mean_abs"] < 1e-4


def test_onnx_engine_runs_any_batch(onnx_cpu, torch_cpu):
    z = torch.randn(3, onnx_cpu.geometry.latent_channels, 64, 64)
    assert onnx_cpu.decode(z).shape == (3, 3, 256, 256)
    assert torch.allclose(onnx_cpu.decode(z[:1]), torch_cpu.decode(z[:1]), atol=1e-3)


def test_superresolve_progress_and_shape(onnx_cpu):
    lq = torch.rand(1, 3, 64, 64) * 2 - 1
    calls: list[tuple[int, int]] = []
    noise = draw_noise((1, onnx_cpu.geometry.latent_channels, 64, 64), 15, torch.Generator().manual_seed(0))
    out = onnx_cpu.superresolve(lq, noise,
                                lambda k, n: calls.append((k, n)))
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32
    assert calls == [(k, 15) for k in range(1, 16)]


def test_torch_engine_thread_setting_is_scoped(tiny):
    engine = TorchEngine(tiny, "cpu", threads=1)
    before = torch.get_num_threads()
    c = tiny.geometry.latent_channels
    out = engine.denoise(torch.zeros(1, c, 64, 64), torch.tensor([3]), torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, c, 64, 64) and torch.get_num_threads() == before
    assert engine.describe()["threads"] == 1


@pytest.mark.slow
def test_bench_reports_stages_series_and_ratios(tiny):
    from cinesr.bench.engines import BenchConfig, run_bench, summary

    configs = [BenchConfig("onnx", "onnx", "cpu", {"onnx": {"threads": 1}}),
               BenchConfig("torch", "torch", "cpu", {"torch": {"threads": 1}}),
               BenchConfig("trt", "tensorrt", "cpu")]
    report = run_bench(tiny, configs=configs, slices=1, frames=2, size=32, steps=(2, 1), repeats=1,
                       stage_repeats=1, log=lambda s: None)
    assert set(report["results"]) == {"onnx", "torch"} and "trt" in report["skipped"]
    by_steps = report["results"]["onnx"]["by_steps"]
    series = report["results"]["onnx"]["series"]
    assert set(by_steps) == {1, 2} and series is by_steps[2] and report["series"]["step_counts"] == [2, 1]
    assert by_steps[1]["unet"] == "teacher"  # random tiny weights: no student
    assert report["steps_speedup"]["onnx 1-step vs 2-step"] == pytest.approx(
        by_steps[2]["median_s"] / by_steps[1]["median_s"])
    from cinesr.model.pipeline import Options
    from cinesr.model.windows import window_starts

    assert series["windows"] == len(window_starts(16, Options().stride)) and series["frames_out"] == 16
    assert series["median_s"] > 0 and series["gflops_per_s"] > 0
    assert report["speedup"]["onnx vs torch"] == pytest.approx(
        report["results"]["torch"]["series"]["median_s"] / series["median_s"])
    assert report["versions"]["onnxruntime"] and report["machine"]["cpus"]
    assert "onnx 1-step" in summary(report) and "steps speed-up onnx 1-step vs 2-step" in summary(report)


# ---- GPU / TensorRT (skipped where absent) ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_torch_fp16_cuda_graphs_match_fp32(tiny, torch_cpu):
    engine = TorchEngine(tiny, "cuda", precision="fp16", cuda_graphs=True)
    d = compare_engines(engine, torch_cpu, batch=2)
    assert d["unet_max_abs"] < TOLERANCES["fp16"]["unet_max_abs"]
    assert d["window_psnr_db"] > TOLERANCES["fp16"]["window_psnr_db"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_onnx_cuda_io_binding_matches_cpu(tiny, onnx_cpu):
    try:
        engine = OnnxEngine(tiny, "cuda", onnx_dir=onnx_cpu.onnx_dir)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    d = compare_engines(engine, onnx_cpu, batch=2)
    assert d["unet_max_abs"] < 1e-2 and d["window_psnr_db"] > 35


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_selftest_passes(tiny, tmp_path, monkeypatch):
    from cinesr.worker.inference.engines.parity import selftest

    monkeypatch.setenv("CINESR_CACHE_DIR", str(tmp_path))
    report = selftest("tensorrt", "cuda", model="tiny")
    assert report["ok"], report


def test_engines_run_the_student_for_its_step_counts(tmp_path):
    """A bundle with a distilled student: torch and onnxruntime both run the student for 1 step (and agree),
    the teacher for 15; the student's graph is exported beside the others."""
    from cinesr.model.bundle import build_networks, load_bundle, save_bundle
    from cinesr.model.configs import load_config
    from cinesr.worker.inference.modelsr import ModelMethod

    from tests.models import MICRO_UNET, moving_disc

    torch.manual_seed(5)
    cfg = {**load_config("tiny"), "name": "micro"}
    cfg["unet_config"] = {**cfg["unet_config"], **MICRO_UNET}
    unet, ae = build_networks(cfg)
    student = build_networks(cfg)[0]
    path = save_bundle(tmp_path / "b", unet, ae, cfg, {"distilled": {"steps": [1, 2, 4]},
                                                        "inference": {"steps": 1, "overlap": 4}}, student=student)
    assert load_bundle(path).student is not None
    model = load_model(path)
    outs = {}
    onnx = OnnxEngine(model, "cpu")
    for engine in (TorchEngine(model, "cpu"), onnx):
        method = ModelMethod(engine)
        assert method.options.sampler == "ddim" and engine.plan.timesteps == (14,)
        outs[engine.name] = method.superresolve_slice(moving_disc(2, 16, 16), lambda n: None)
        engine.set_steps(15)
        assert (getattr(engine, "network", None) or "unet") in ("unet", "teacher")
    assert (onnx.onnx_dir / "student.onnx").is_file()
    a, b = outs["torch"], outs["onnx"]
    assert np.abs(a - b).max() < 1e-3 * float(a.max() - a.min())
    teacher_one_step = ModelMethod.configured(TorchEngine(load_model(str(path)), "cpu"), steps=1)
    assert teacher_one_step.engine.network == "student"


def test_the_worker_gives_tensorrt_the_engine_cache_setting(tmp_path: Path) -> None:
    # CINESR_ENGINE_CACHE (a volume in the chart and the worker image) is where TensorRT plans must go; without
    # it a restarted worker rebuilds them in a temp folder for minutes
    from cinesr.worker.queue.process import engine_options
    from cinesr.worker.settings import WorkerSettings

    assert engine_options(WorkerSettings(engine_cache=tmp_path / "plans")) == {
        "tensorrt": {"cache_dir": tmp_path / "plans"}}
    assert engine_options(WorkerSettings()) == {}
