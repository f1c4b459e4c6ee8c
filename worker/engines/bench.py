"""Engine benchmark: per-stage and whole-series times per backend and device, side by side in one run.

For every configuration (backend, device, options) it measures
  - stages: encode, one UNet step, decode, at the batch size the series run uses (median of repeats);
  - a whole synthetic series through ModelMethod (flow, windows, sampler, blending), runs of the
    configurations interleaved so that load from elsewhere on the machine hits them alike;
  - windows/s, output frames/s, peak memory (CPU: resident set during the run; CUDA: torch's peak
    allocation) and achieved GFLOP/s against model_stats' FLOPs per window;
and the speed ratios between configurations. `run_bench` returns the report; `write_report` stores it
as JSON with machine, git commit and versions (bench/results/ in the repository).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cinesr.model.nets import model_stats
from cinesr.model.pipeline import Options
from cinesr.worker.engines.base import Engine, LoadedModel, load_model
from cinesr.worker.engines.select import create_engine


@dataclass
class BenchConfig:
    """One engine configuration to measure."""

    label: str
    backend: str
    device: str
    options: dict[str, Any] = field(default_factory=dict)


def default_configs(device: str = "auto", threads: int | None = None) -> list[BenchConfig]:
    """CPU: onnxruntime vs torch eager, each with all usable cores and with one thread (on a loaded
    machine torch's OpenMP pool can be slower with more threads; the best of each is compared).
    GPU (when present): torch fp32 eager, torch fp16 + CUDA graphs, onnxruntime CUDA, TensorRT (the
    ones that do not load are reported as skipped)."""
    from cinesr.worker.engines.onnx_engine import cpu_threads

    n = threads or cpu_threads()
    cpu = [
        BenchConfig(f"onnx-cpu-{n}t", "onnx", "cpu", {"onnx": {"threads": n}}),
        BenchConfig(f"torch-cpu-eager-{n}t", "torch", "cpu", {"torch": {"threads": n}}),
    ]
    if n > 1:
        cpu += [
            BenchConfig("onnx-cpu-1t", "onnx", "cpu", {"onnx": {"threads": 1}}),
            BenchConfig("torch-cpu-eager-1t", "torch", "cpu", {"torch": {"threads": 1}}),
        ]
    fp32 = {"torch": {"precision": "fp32", "cuda_graphs": False}}
    fp16 = {"torch": {"precision": "fp16", "cuda_graphs": True}}
    gpu = [
        BenchConfig("torch-cuda-fp32-eager", "torch", "cuda", fp32),
        BenchConfig("torch-cuda-fp16-cudagraphs", "torch", "cuda", fp16),
        BenchConfig("onnx-cuda", "onnx", "cuda"),
        BenchConfig("tensorrt-fp16", "tensorrt", "cuda"),
    ]
    if device == "cpu":
        return cpu
    if device == "cuda":
        return gpu
    return gpu + cpu if torch.cuda.is_available() else cpu


def synthetic_series(slices: int = 2, frames: int = 4, size: int = 64, seed: int = 0) -> Any:
    """A CineSeries of a moving disc with noise (the acceptance study's shape by default)."""
    from cinesr.model.cine import CineSeries, CineSlice
    from pydicom.dataset import Dataset

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for s in range(slices):
        f = []
        for k in range(frames):
            r = size * (0.2 + 0.05 * np.cos(2 * np.pi * k / frames) + 0.02 * s)
            disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r).astype(np.float32)
            f.append(100 + 700 * disc + 20 * rng.standard_normal((size, size)))
        out.append(CineSlice(np.stack(f).astype(np.float32), np.arange(frames) * 50.0, np.array([0.0, 0.0, s * 8.0]),
                             np.array([1.0, 0, 0, 0, 1, 0]), np.ones(2), []))
    return CineSeries("1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "1.2.840.10008.5.1.4.1.1.4", out,
                      Dataset())


class _PeakRSS:
    """Samples this process's resident set size every few ms; peak - baseline = the run's footprint."""

    def __init__(self) -> None:
        self.peak = self.base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _time(fn: Callable[[], Any], engine: Engine, repeats: int) -> list[float]:
    fn()  # warm-up (lazy init, kernel selection, graph capture)
    _sync(engine)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(engine)
        times.append(time.perf_counter() - t0)
    return times


def stage_times(engine: Engine, batch: int, repeats: int = 5) -> dict[str, Any]:
    """Median/min seconds of encode, one UNet step, decode and the 15-step loop at `batch` windows."""
    g = engine.geometry
    gen = torch.Generator().manual_seed(0)
    dev = engine.device
    images = (torch.rand(batch, g.channels, g.image_size, g.image_size, generator=gen) * 2 - 1).to(dev)
    lat = torch.randn(batch, g.latent_channels, g.latent_size, g.latent_size, generator=gen).to(dev)
    lq = (torch.rand(batch, g.channels, g.lq_size, g.lq_size, generator=gen) * 2 - 1).to(dev)
    t = torch.full((batch,), engine.plan.timesteps[0], dtype=torch.long, device=dev)
    noise = torch.randn(engine.plan.steps, *lat.shape, generator=gen).to(dev)
    runs = {
        "encode": lambda: engine.encode(images),
        "unet_step": lambda: engine.denoise(lat, t, lq),
        "decode": lambda: engine.decode(lat),
        "sampling_loop": lambda: engine.sample(lat, lq, noise),
    }
    out: dict[str, Any] = {"batch": batch}
    for name, fn in runs.items():
        ts = _time(fn, engine, repeats if name != "sampling_loop" else max(2, repeats // 2))
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "per_window_s": statistics.median(ts) / batch}
    return out


def ort_tuning(model: LoadedModel, threads: Sequence[int] = (1, 2), repeats: int = 5) -> dict[str, Any]:
    """Per-window encode / UNet step / decode times of onnxruntime CPU per graph-optimisation level and
    intra-op thread count (the settings OnnxEngine uses were chosen from this)."""
    from cinesr.worker.engines.onnx_engine import OnnxEngine

    out: dict[str, Any] = {}
    for level in ("basic", "extended", "all"):
        for n in threads:
            engine = OnnxEngine(model, "cpu", threads=n, optimization=level)
            st = stage_times(engine, 1, repeats)
            out[f"{level}-{n}t"] = {k: st[k]["median_s"] for k in ("encode", "unet_step", "decode")}
            engine.close()
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "hostname_hash": str(abs(hash(platform.node())) % 10**8),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "numpy": np.__version__}
    for mod in ("onnxruntime", "onnx", "tensorrt", "cv2"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "worker", "model"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(
    model: str | Path | LoadedModel | None = None,
    device: str = "auto",
    configs: Sequence[BenchConfig] | None = None,
    slices: int = 2,
    frames: int = 4,
    size: int = 64,
    steps: int | None = None,
    repeats: int = 3,
    stage_repeats: int = 5,
    batch_size: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    tune_ort: bool = False,
) -> dict[str, Any]:
    """Measure every loadable configuration; returns the report (see module doc).

    The whole-series runs are interleaved: repeat r runs config 1, 2, ... before repeat r+1."""
    from cinesr.worker.engines.onnx_engine import cpu_threads
    from cinesr.worker.modelsr import ModelMethod
    from cinesr.worker.pipeline import superresolve_series

    commit = _git_commit()  # the code as it was when measuring started
    threads = threads or cpu_threads()
    torch.set_num_threads(threads)  # torch eager gets the same cores as onnxruntime's intra-op pool
    loaded = load_model(model)
    stats = model_stats(loaded.config, image_size=loaded.geometry.image_size)
    series = synthetic_series(slices, frames, size)
    configs = list(configs or default_configs(device, threads))
    engines: dict[str, Engine] = {}
    skipped: dict[str, str] = {}
    for c in configs:
        try:
            engines[c.label] = create_engine(c.backend, c.device, loaded, c.options)
            log(f"[bench] {c.label}: loaded ({engines[c.label].describe().get('backend')})")
        except Exception as exc:
            skipped[c.label] = str(exc)
            log(f"[bench] {c.label}: skipped: {exc}")
    results: dict[str, Any] = {}
    methods = {}
    for label, engine in engines.items():
        m = ModelMethod(engine, Options.from_mapping(loaded.meta.get("inference"), steps=steps), batch_size)
        methods[label] = m
        log(f"[bench] {label}: stages at batch {m.batch_size} ...")
        results[label] = {"engine": engine.describe(), "stages": stage_times(engine, m.batch_size, stage_repeats),
                          "series": {"seconds": [], "peak_memory_mb": []}}
    first = next(iter(methods.values()), None)
    windows = first.units(series) // first.engine.plan.steps if first else 0
    out_frames = sum(8 * s.num_frames for s in series.slices)
    for m in methods.values():  # warm-up runs (also checks the output shape)
        res = superresolve_series(series, m)
        assert all(f.shape[0] == 8 * s.num_frames for f, s in zip(res.frames, series.slices, strict=True))
    for r in range(repeats):
        for label, m in methods.items():
            engine = m.engine
            if engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(engine.device)
            with _PeakRSS() as mem:
                t0 = time.perf_counter()
                superresolve_series(series, m)
                _sync(engine)
                dt = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda"
                    else mem.peak - mem.base)
            results[label]["series"]["seconds"].append(dt)
            results[label]["series"]["peak_memory_mb"].append(peak / 2**20)
            log(f"[bench] repeat {r + 1}/{repeats} {label}: {dt:.2f} s")
    for label, res in results.items():
        s = res["series"]
        med = statistics.median(s["seconds"])
        s.update({
            "median_s": med,
            "min_s": min(s["seconds"]),
            "windows": windows,
            "windows_per_s": windows / med,
            "frames_out": out_frames,
            "frames_per_s": out_frames / med,
            "gflops_per_s": stats["gflops_window"] * windows / med,
            "peak_memory_mb_max": max(s["peak_memory_mb"]),
            "memory_kind": "cuda max_memory_allocated (torch allocator only)"
            if engines[label].device.type == "cuda" else "process RSS growth during the run",
        })
        st = res["stages"]
        st["unet_gflops_per_s"] = stats["gflops_unet_step"] * st["batch"] / st["unet_step"]["median_s"]
    tuning = None
    if tune_ort:
        log("[bench] onnxruntime CPU settings ...")
        from cinesr.worker.engines.onnx_engine import cpu_threads

        tuning = ort_tuning(loaded, sorted({1, cpu_threads()}), stage_repeats)
    ratios = {}
    labels = list(results)
    for a in labels:
        for b in labels:
            if a != b and engines[a].device.type == engines[b].device.type:
                ratios[f"{a} vs {b}"] = results[b]["series"]["median_s"] / results[a]["series"]["median_s"]
    # headline per device: the fastest configuration of each backend against each other
    best: dict[tuple[str, str], str] = {}
    for label in labels:
        key = (engines[label].name, engines[label].device.type)
        if key not in best or results[label]["series"]["median_s"] < results[best[key]]["series"]["median_s"]:
            best[key] = label
    headline = {}
    for (name, dev), label in best.items():
        for (other, dev2), label2 in best.items():
            if dev == dev2 and name != other:
                headline[f"best {name} vs best {other} ({dev})"] = {
                    "ratio": results[label2]["series"]["median_s"] / results[label]["series"]["median_s"],
                    "configs": [label, label2],
                }
    return {
        "benchmark": "engines",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "machine": _machine(),
        "versions": _versions(),
        "model": {"source": loaded.source, "stats": stats},
        "series": {"slices": slices, "frames": frames, "size": size, "windows": windows, "frames_out": out_frames,
                   "steps": steps or loaded.schedule.steps, "repeats": repeats, "interleaved": True,
                   "threads": threads},
        "results": results,
        "skipped": skipped,
        "speedup": ratios,  # "A vs B": B's median series time / A's (> 1: A is faster)
        "headline": headline,
        "ort_tuning": tuning,
    }


def summary(report: dict[str, Any]) -> str:
    """A plain table of the report."""
    lines = [f"{'config':28s} {'series s':>9s} {'win/s':>7s} {'frames/s':>9s} {'GFLOP/s':>8s} {'peak MB':>8s} "
             f"{'enc ms':>7s} {'unet ms':>8s} {'dec ms':>7s}"]
    for label, r in report["results"].items():
        s, st = r["series"], r["stages"]
        lines.append(
            f"{label:28s} {s['median_s']:9.2f} {s['windows_per_s']:7.2f} {s['frames_per_s']:9.2f} "
            f"{s['gflops_per_s']:8.1f} {s['peak_memory_mb_max']:8.0f} {1e3 * st['encode']['per_window_s']:7.1f} "
            f"{1e3 * st['unet_step']['per_window_s']:8.1f} {1e3 * st['decode']['per_window_s']:7.1f}"
        )
    for k, v in report["speedup"].items():
        lines.append(f"speed-up {k}: {v:.2f}x")
    for k, v in report.get("headline", {}).items():
        lines.append(f"HEADLINE {k}: {v['ratio']:.2f}x  ({v['configs'][0]} vs {v['configs'][1]})")
    for k, v in report["skipped"].items():
        lines.append(f"skipped {k}: {v}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """bench/results/engines-<device>-<UTC time>.json; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if report["machine"].get("gpu") else "cpu"
    stamp = report["created"].replace(":", "").replace("-", "")
    path = out / f"engines-{kind}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def stride_study(
    model: str | Path | LoadedModel | None = None,
    strides: Sequence[int] = (1, 2, 3),
    seeds: Sequence[int] = (101, 102),
    slices: int = 1,
    backend: str = "auto",
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quality (PSNR/SSIM against the phantom's ground truth) and time of the window stride, with the
    baseline (flow + bicubic) for reference: the numbers behind ModelMethod's default stride."""
    from cinesr.model.baseline import baseline_superresolve
    from cinesr.model.metrics import psnr, ssim
    from cinesr.model.phantom import degrade_acquisition, make_study
    from cinesr.worker.modelsr import ModelMethod

    loaded = load_model(model)
    engine = create_engine(backend, device, loaded)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, sr: np.ndarray, gt: np.ndarray, seconds: float) -> None:
        r = rows.setdefault(name, {"psnr": [], "ssim": [], "seconds": []})
        r["psnr"].append(psnr(np.clip(sr, 0, 1), gt, data_range=1.0))
        r["ssim"].append(ssim(np.clip(sr, 0, 1), gt, data_range=1.0))
        r["seconds"].append(seconds)

    for seed in seeds:
        truth = make_study(seed, slices=slices, frames=32, size=256)
        low = degrade_acquisition(truth)
        for s in range(slices):
            lq, gt = low.frames[s], truth.frames[s]
            t0 = time.perf_counter()
            add("baseline", baseline_superresolve(lq), gt, time.perf_counter() - t0)
            for stride in strides:
                method = ModelMethod.configured(engine, stride=stride)
                t0 = time.perf_counter()
                out = method.superresolve_slice(lq, lambda n: None)
                add(f"stride{stride}", out, gt, time.perf_counter() - t0)
                log(f"[stride] seed {seed} slice {s} stride {stride}: psnr {rows[f'stride{stride}']['psnr'][-1]:.2f}")
    table = {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in rows.items()}
    # the cheapest (largest) stride within 0.1 dB PSNR of the best one
    best = max(table[f"stride{s}"]["psnr"] for s in strides)
    chosen = max(s for s in strides if table[f"stride{s}"]["psnr"] >= best - 0.1)
    return {"model": loaded.source, "engine": engine.describe(), "seeds": list(seeds), "slices": slices,
            "table": table, "chosen_stride": chosen, "rule": "largest stride within 0.1 dB PSNR of the best",
            "git_commit": _git_commit(), "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def record_stride(bundle_dir: str | Path, study: dict[str, Any]) -> None:
    """Write the chosen default stride and the study behind it into a bundle's model.json
    ("inference": {"stride", "stride_study"}); ModelMethod reads it from there."""
    from cinesr.model.bundle import read_meta, write_meta

    inference = dict(read_meta(bundle_dir).get("inference") or {})
    inference.update({"stride": study["chosen_stride"],
                      "stride_study": {k: study[k] for k in ("table", "rule", "seeds", "slices", "created")}})
    write_meta(bundle_dir, {"inference": inference})
