"""`cinesr demo` over phantom seeds 1-7: CineSR (the service's default method) against the baseline.

    .venv/bin/python bench/demo_seeds.py [--seeds 1-7] [--out bench/results]

Each seed runs the whole demo as a user does (`cinesr demo --seed N`: phantom study, C-STORE into
`cinesr serve`, embedded worker, derived series back in a local PACS) and reads its metrics.json. Prints
a table and writes bench/results/demo-seeds-<UTC time>.json with the machine, commit and versions, and
whether CineSR beat the baseline on PSNR, SSIM and LPIPS for every seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cinesr.bench.machine import git_commit, machine, versions

METRICS = ("psnr", "ssim", "lpips")


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1)) if "," not in text else [int(v) for v in text.split(",")]


def wins(row: dict[str, dict[str, float]]) -> dict[str, bool]:
    b, c = row["baseline"], row["cinesr"]
    return {"psnr": c["psnr"] > b["psnr"], "ssim": c["ssim"] > b["ssim"], "lpips": c["lpips"] < b["lpips"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-7")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cinesr-demo-seeds-") as tmp:
        for seed in seeds_of(a.seeds):
            out = Path(tmp) / f"seed{seed}"
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "cinesr.service.cli", "demo", "--seed", str(seed), "--out",
                                  str(out)], capture_output=True, text=True, timeout=3600)
            if run.returncode != 0:
                print(run.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"demo seed {seed} failed (exit {run.returncode})")
            doc = json.loads((out / "metrics.json").read_text())
            rows[str(seed)] = {"baseline": doc["metrics"]["baseline"], "cinesr": doc["metrics"]["cinesr"],
                               "method": doc.get("method"), "seconds": round(time.monotonic() - t0, 1)}
            ok = wins(rows[str(seed)])
            b, c = rows[str(seed)]["baseline"], rows[str(seed)]["cinesr"]
            print(f"seed {seed}: baseline {b['psnr']:.2f}/{b['ssim']:.4f}/{b['lpips']:.4f}  "
                  f"CineSR {c['psnr']:.2f}/{c['ssim']:.4f}/{c['lpips']:.4f}  wins "
                  f"{[k for k, v in ok.items() if v]}", flush=True)
    all_win = {m: all(wins(r)[m] for r in rows.values()) for m in METRICS}
    report = {"what": "cinesr demo per phantom seed (defaults otherwise), the service's default method vs the "
                      "baseline", "created": started, "commit": git_commit(), "machine": machine(),
              "versions": versions(), "seeds": rows, "wins_every_seed": all_win}
    out_file = Path(a.out) / f"demo-seeds-{started.replace(':', '').replace('-', '')}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wins on every seed: {all_win}; written: {out_file}")
    return 0 if all(all_win.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
