"""The bundled model under other inference options, through the shipped path, scored against the fidelity bar.

    .venv/bin/python bench/options.py --sources sax,mrphantom --seeds 2000-2002 --acquisition kspace \\
        --vary kspace_taper=0,0.4 [--vary detail_gate=0.02,0.03] [--out bench/results]

How a shipped option is chosen: each combination of the varied options (the others are the bundle's
`inference`) runs `cinesr.model.evaluate` (the path `cinesr superresolve` runs) over phantom sources at the
model card's size (1 slice x 32 frames at 128 pixels, every 8th frame acquired at 32), and each row is scored
with the card's fidelity bar (`cinesr.model.card.faithful_verdict`). Use validation seeds (2000-2009), not
the card's test seeds (1000-1009). Prints one line per row and writes bench/results/options-<UTC time>.json
with the machine, commit and versions. Every setting after the first is also held against the first, row by
row (TOLERANCE: how a few-step student is held to its 15-step teacher, `--vary steps=15,2,1`); `--model`
takes another bundle folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from cinesr.bench.machine import git_commit, machine, versions


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """['kspace_taper=0,0.4', 'consistency=area,auto'] -> {'kspace_taper': [0.0, 0.4], 'consistency': [...]}"""
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise SystemExit(f"--vary wants NAME=V1,V2,... (got {item!r})")
        out[name] = [_value(v) for v in values.split(",")]
    return out


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# how far another setting may fall behind the first (the 15-step teacher, for a few-step student): PSNR,
# SSIM and LPIPS in their own units; the temporal error relative to the first's, 1% ("no worse" read at
# the precision the figure has: the teacher's own ancestral and deterministic 15-step samplers differ by
# up to 0.08% of it on validation seed 2000, its 4-step respacing by up to 0.08%)
TOLERANCE = {"psnr": 0.3, "ssim": 0.01, "lpips": 0.02, "temporal": 0.01}


def against(first: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row (same source and acquisition) the model's metrics minus the first setting's (the temporal
    error as a share of the first's), and whether each stays within TOLERANCE of it (PSNR and SSIM not
    lower, LPIPS and the temporal error not higher, by more)."""
    ref = {(r["source"], r["acquisition"]): r["model"] for r in first}
    out = []
    for r in rows:
        base = ref.get((r["source"], r["acquisition"]))
        if base is None:
            continue
        d = {k: r["model"][k] - base[k] for k in ("psnr", "ssim", "lpips")}
        d["temporal"] = r["model"]["temporal"] / base["temporal"] - 1
        within = {k: d[k] >= -TOLERANCE[k] if k in ("psnr", "ssim") else d[k] <= TOLERANCE[k] for k in TOLERANCE}
        out.append({"source": r["source"], "acquisition": r["acquisition"], "delta": d, "within": within})
    return out


def main(argv: list[str] | None = None) -> int:
    from cinesr.model.bundle import load_bundle
    from cinesr.model.card import faithful_verdict
    from cinesr.model.evaluate import evaluate
    from cinesr.model.pipeline import Options

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="sax,sax-fourier,lax,mrphantom,shepp-logan,deadleaves,texture,motioncloud")
    p.add_argument("--seeds", default="2000")
    p.add_argument("--acquisition", default="area,kspace")
    p.add_argument("--vary", action="append", default=[], help="NAME=V1,V2,... (an inference option; repeatable)")
    p.add_argument("--model", default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    model = load_bundle(a.model)
    shipped = Options.from_mapping(model.meta.get("inference"))
    vary = parse_vary(a.vary)
    try:
        combos = [shipped.with_(**dict(zip(vary, values, strict=True))) for values in itertools.product(*vary.values())]
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"bad option: {exc}") from None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for options in combos or [shipped]:
        label = ", ".join(f"{k}={getattr(options, k)}" for k in vary) or "shipped"
        t0 = time.monotonic()
        report = evaluate([f"phantom:{a.seeds}:{s}" for s in a.sources.split(",")], model,
                          acquisitions=tuple(a.acquisition.split(",")), protocols=("sequence",), options=options,
                          phantom={"slices": 1, "frames": 32, "size": 128},
                          progress=lambda done, total, what, label=label: print(f"  [{label}] {done}/{total} {what}",
                                                                             flush=True))
        rows = []
        for row in report["rows"]:
            verdict = faithful_verdict(row)
            b, m = row["baseline"], row["model"]
            rows.append({"source": row["source"], "acquisition": row["acquisition"], "baseline": b, "model": m,
                         "gain": row["gain"], "verdict": verdict})
            missed = [k for k, v in verdict.items() if not v]
            print(f"{label:28s} {row['source']:12s} {row['acquisition']:6s} dPSNR {m['psnr'] - b['psnr']:+.2f} "
                  f"dSSIM {m['ssim'] - b['ssim']:+.4f} LPIPS {100 * row['gain']['lpips']:+.1f}% "
                  f"temporal {100 * row['gain']['temporal']:+.1f}% "
                  f"{'misses ' + ','.join(missed) if missed else 'meets'}", flush=True)
        met = sum(all(r["verdict"].values()) for r in rows)
        print(f"{label}: bar met on {met} of {len(rows)} rows ({time.monotonic() - t0:.0f} s)", flush=True)
        results.append({"options": {k: getattr(options, k) for k in vary}, "met": met, "rows": rows})
    for r in results[1:]:
        r["against_first"] = against(results[0]["rows"], r["rows"])
        worse = [f"{d['source']}/{d['acquisition']}" for d in r["against_first"] if not all(d["within"].values())]
        print(f"{r['options']} against {results[0]['options']}: within the tolerance on "
              f"{len(r['against_first']) - len(worse)} of {len(r['against_first'])} rows"
              f"{' (not: ' + ', '.join(worse) + ')' if worse else ''}", flush=True)
    record = {"what": "a model bundle under varied inference options, shipped path, fidelity bar per row",
              "created": started, "commit": git_commit(), "machine": machine(), "versions": versions(),
              "model": str(model.path or "bundled"),
              "sources": a.sources.split(","), "seeds": a.seeds, "acquisitions": a.acquisition.split(","),
              "shipped": shipped.parameters(), "results": results}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"options-{started.replace('-', '').replace(':', '')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
