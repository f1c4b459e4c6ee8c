"""Window-stride study: quality (PSNR/SSIM against the phantom's truth) and time per stride, with the
baseline for reference; the numbers behind ModelMethod's default stride, recorded in a bundle's model.json."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cinesr.bench.machine import git_commit
from cinesr.worker.inference.engines.base import LoadedModel, load_model
from cinesr.worker.inference.engines.select import create_engine


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
    from cinesr.worker.inference.modelsr import ModelMethod

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
            "git_commit": git_commit(), "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def record_stride(bundle_dir: str | Path, study: dict[str, Any]) -> None:
    """Write the chosen default stride and the study behind it into a bundle's model.json
    ("inference": {"stride", "stride_study"}); ModelMethod reads it from there."""
    from cinesr.model.bundle import read_meta, write_meta

    inference = dict(read_meta(bundle_dir).get("inference") or {})
    inference.update({"stride": study["chosen_stride"],
                      "stride_study": {k: study[k] for k in ("table", "rule", "seeds", "slices", "created")}})
    write_meta(bundle_dir, {"inference": inference})
