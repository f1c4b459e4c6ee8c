"""Engine benchmark: per-stage and whole-series times per backend and device, side by side in one run.

For every configuration (backend, device, options) it measures
  - stages: encode, one UNet step, decode, at the batch size the series run uses (median of repeats);
  - a whole synthetic series through ModelMethod (flow, windows, sampler, blending), runs of the
    configurations interleaved so that load from elsewhere on the machine hits them alike;
  - windows/s, output frames/s, peak memory (CPU: resident set during the run; CUDA: torch's peak
    allocation) and achieved GFLOP/s against model_stats' FLOPs per window;
and the speed ratios between configurations. `run_bench` returns the report (`cinesr bench` prints it);
`write_report` stores it as JSON with machine, git commit and versions (bench/results/).

    .venv/bin/python bench/engines.py [--device auto|cpu|cuda] [--repeats 3] [--model DIR|tiny]
                                      [--slices 2 --frames 4 --size 64] [--out bench/results]
    .venv/bin/python bench/engines.py --stride-study [--record]   (cinesr.bench.stride)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cinesr.bench.machine import git_commit, machine, versions
from cinesr.bench.stride import record_stride, stride_study
from cinesr.model.nets import model_stats
from cinesr.model.pipeline import Options
from cinesr.worker.inference.engines.base import Engine, LoadedModel, load_model
from cinesr.worker.inference.engines.select import create_engine


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
    from cinesr.worker.inference.engines.onnx_engine import cpu_threads

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
    from cinesr.worker.inference.engines.onnx_engine import OnnxEngine

    out: dict[str, Any] = {}
    for level in ("basic", "extended", "all"):
        for n in threads:
            engine = OnnxEngine(model, "cpu", threads=n, optimization=level)
            st = stage_times(engine, 1, repeats)
            out[f"{level}-{n}t"] = {k: st[k]["median_s"] for k in ("encode", "unet_step", "decode")}
            engine.close()
    return out


def bench_steps(loaded: LoadedModel, steps: int | Sequence[int] | None) -> tuple[int, ...]:
    """The step counts to time: those given, else every count the bundle serves as trained (the
    teacher's T and its distilled student's), the bundle's default first."""
    if steps is not None:
        return (steps,) if isinstance(steps, int) else tuple(dict.fromkeys(int(k) for k in steps))
    default = Options.from_mapping(loaded.meta.get("inference")).steps
    served = sorted({loaded.schedule.steps, *loaded.student_steps})
    return (default, *[k for k in served if k != default])


def run_bench(
    model: str | Path | LoadedModel | None = None,
    device: str = "auto",
    configs: Sequence[BenchConfig] | None = None,
    slices: int = 2,
    frames: int = 4,
    size: int = 64,
    steps: int | Sequence[int] | None = None,
    repeats: int = 3,
    stage_repeats: int = 5,
    batch_size: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    tune_ort: bool = False,
) -> dict[str, Any]:
    """Measure every loadable configuration at every step count; returns the report (see module doc).

    results[config]["series"] is the first step count's whole series (the bundle's default unless `steps`
    says otherwise), results[config]["by_steps"][k] each step count's. The whole-series runs are
    interleaved: repeat r runs every (config, steps) pair before repeat r+1."""
    from cinesr.worker.inference.engines.onnx_engine import cpu_threads
    from cinesr.worker.inference.modelsr import ModelMethod
    from cinesr.worker.inference.pipeline import superresolve_series

    commit = git_commit()  # the code as it was when measuring started
    threads = threads or cpu_threads()
    torch.set_num_threads(threads)  # torch eager gets the same cores as onnxruntime's intra-op pool
    loaded = load_model(model)
    counts = bench_steps(loaded, steps)
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
    shipped = loaded.meta.get("inference")
    results: dict[str, Any] = {}
    methods: dict[tuple[str, int], Any] = {}
    for label, engine in engines.items():
        for k in counts:
            methods[label, k] = ModelMethod(engine, Options.from_mapping(shipped, steps=k), batch_size)
        m = methods[label, counts[0]]
        log(f"[bench] {label}: stages at batch {m.batch_size} ...")
        m.apply_plan()  # the stage times run the first step count's plan
        results[label] = {"engine": engine.describe(), "stages": stage_times(engine, m.batch_size, stage_repeats),
                          "by_steps": {}}
    out_frames = sum(8 * s.num_frames for s in series.slices)
    first = next(iter(methods.values()), None)
    windows = first.units(series) // first.engine.plan.steps if first else 0
    for (label, k), m in methods.items():  # warm-up runs (also check the output shape)
        res = superresolve_series(series, m)
        assert all(f.shape[0] == 8 * s.num_frames for f, s in zip(res.frames, series.slices, strict=True))
        results[label]["by_steps"][k] = {"steps": k, "unet": "student" if m.engine.runs_student else "teacher",
                                         "sampler": m.options.sampler,
                                         "seconds": [], "peak_memory_mb": []}
    for r in range(repeats):
        for (label, k), m in methods.items():
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
            s = results[label]["by_steps"][k]
            s["seconds"].append(dt)
            s["peak_memory_mb"].append(peak / 2**20)
            log(f"[bench] repeat {r + 1}/{repeats} {label} {k}-step: {dt:.2f} s")
    for label, res in results.items():
        for s in res["by_steps"].values():
            med = statistics.median(s["seconds"])
            s.update({
                "median_s": med,
                "min_s": min(s["seconds"]),
                "windows": windows,
                "windows_per_s": windows / med,
                "frames_out": out_frames,
                "frames_per_s": out_frames / med,
                "gflops_per_s": (stats["gflops_window"] - (loaded.schedule.steps - s["steps"])
                                 * stats["gflops_unet_step"]) * windows / med,
                "peak_memory_mb_max": max(s["peak_memory_mb"]),
                "memory_kind": "cuda max_memory_allocated (torch allocator only)"
                if engines[label].device.type == "cuda" else "process RSS growth during the run",
            })
        res["series"] = res["by_steps"][counts[0]]
        st = res["stages"]
        st["unet_gflops_per_s"] = stats["gflops_unet_step"] * st["batch"] / st["unet_step"]["median_s"]
    tuning = None
    if tune_ort:
        log("[bench] onnxruntime CPU settings ...")
        tuning = ort_tuning(loaded, sorted({1, cpu_threads()}), stage_repeats)
    ratios = {}
    labels = list(results)
    for a in labels:
        for b in labels:
            if a != b and engines[a].device.type == engines[b].device.type:
                ratios[f"{a} vs {b}"] = results[b]["series"]["median_s"] / results[a]["series"]["median_s"]
    # fewer steps against the most timed (the teacher's whole chain by default), per configuration
    full = max(counts)
    steps_speedup = {
        f"{label} {k}-step vs {full}-step": res["by_steps"][full]["median_s"] / res["by_steps"][k]["median_s"]
        for label, res in results.items() if full in res["by_steps"] for k in res["by_steps"] if k != full
    }
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
        "machine": machine(),
        "versions": versions(),
        "model": {"source": loaded.source, "stats": stats, "student_steps": list(loaded.student_steps)},
        "series": {"slices": slices, "frames": frames, "size": size, "windows": windows, "frames_out": out_frames,
                   "steps": counts[0], "step_counts": list(counts), "repeats": repeats, "interleaved": True,
                   "threads": threads},
        "results": results,
        "skipped": skipped,
        "speedup": ratios,  # "A vs B": B's median series time / A's (> 1: A is faster), at the first step count
        "steps_speedup": steps_speedup,  # "A k-step vs K-step": A's K-step time / its k-step time
        "headline": headline,
        "ort_tuning": tuning,
    }


def summary(report: dict[str, Any]) -> str:
    """A plain table of the report."""
    lines = [f"{'config':28s} {'series s':>9s} {'win/s':>7s} {'frames/s':>9s} {'GFLOP/s':>8s} {'peak MB':>8s} "
             f"{'enc ms':>7s} {'unet ms':>8s} {'dec ms':>7s}"]
    for label, r in report["results"].items():
        by_steps = r.get("by_steps") or {"": r["series"]}
        st = r["stages"]
        for k, s in by_steps.items():
            name = f"{label} {k}-step" if len(by_steps) > 1 else label
            lines.append(
                f"{name:28s} {s['median_s']:9.2f} {s['windows_per_s']:7.2f} {s['frames_per_s']:9.2f} "
                f"{s['gflops_per_s']:8.1f} {s['peak_memory_mb_max']:8.0f} {1e3 * st['encode']['per_window_s']:7.1f} "
                f"{1e3 * st['unet_step']['per_window_s']:8.1f} {1e3 * st['decode']['per_window_s']:7.1f}"
            )
    for k, v in report["speedup"].items():
        lines.append(f"speed-up {k}: {v:.2f}x")
    for k, v in report.get("steps_speedup", {}).items():
        lines.append(f"steps speed-up {k}: {v:.2f}x")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default=None, help="model bundle folder or config name (default: bundled model)")
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tune-ort", action="store_true", help="also time onnxruntime per optimisation level/threads")
    p.add_argument("--stride-study", action="store_true",
                   help="instead: PSNR/SSIM vs phantom truth and time for window strides 1, 2, 3")
    p.add_argument("--record", action="store_true", help="with --stride-study: write the choice into the bundle")
    a = p.parse_args(argv)
    if a.stride_study:
        report = stride_study(a.model, device="cpu" if a.device == "auto" else a.device)
        for name, row in report["table"].items():
            print(f"{name:10s} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  {row['seconds']:7.2f} s/slice")
        out = Path(a.out) / f"stride-{report['created'].replace(':', '').replace('-', '')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {out}; chosen stride {report['chosen_stride']} ({report['rule']})")
        if a.record and a.model:
            record_stride(a.model, report)
            print(f"recorded in {a.model}/model.json")
        return 0
    report = run_bench(model=a.model, device=a.device, slices=a.slices, frames=a.frames, size=a.size,
                       steps=a.steps, repeats=a.repeats, batch_size=a.batch_size, threads=a.threads,
                       tune_ort=a.tune_ort)
    print(summary(report))
    print(f"written: {write_report(report, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
