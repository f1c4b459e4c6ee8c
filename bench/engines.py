"""Engine benchmark: onnxruntime vs torch (and, on a GPU, torch fp16 + CUDA graphs, onnxruntime CUDA,
TensorRT) on a whole cine series, side by side in one run, plus per-stage times.

    .venv/bin/python bench/engines.py [--device auto|cpu|cuda] [--repeats 3] [--model DIR|tiny]
                                      [--slices 2 --frames 4 --size 64] [--out bench/results]

Prints a table and writes bench/results/engines-<cpu|gpu>-<UTC time>.json with the machine, git
commit and versions. The measuring code lives in cinesr.worker.engines.bench (`cinesr bench` uses it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cinesr.worker.engines.bench import record_stride, run_bench, stride_study, summary, write_report


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
