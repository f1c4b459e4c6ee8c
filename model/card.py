"""A bundle's card: its evaluation on held-out phantoms and on phantom generators it never saw.

`write_card(bundle)` runs both evaluations, stores them in model.json (`evaluation`, `generalisation`),
copies the Real-ESRGAN figures next to the weights and writes evaluation.md with a verdict against
the paper's margins computed from the numbers. `python -m cinesr.model.card BUNDLE` does the same.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .evaluate import evaluate, markdown_table

# The paper's relative gains over the same baseline (Table 1): PSNR +5%, SSIM +6.5%, LPIPS -39%.
PAPER_GAINS = {"psnr": 0.05, "ssim": 0.065, "lpips": -0.39}
TEST = "phantom:1000-1009"
UNSEEN = ("phantom:1000-1004:sax-fourier", "phantom:1000-1004:lax")
FIGURES = ("figure_paper_realesrgan.png", "figure_sequence_realesrgan.png")


def _reaches(gain: dict[str, float], margins: dict[str, float]) -> dict[str, bool]:
    """Per metric: is the relative gain at least the margin, in the metric's better direction
    (LPIPS, the one lower-is-better metric, has a negative margin)?"""
    return {k: (gain[k] <= v if k == "lpips" else gain[k] >= v) for k, v in margins.items()}


def paper_verdict(gain: dict[str, float]) -> dict[str, bool]:
    """Per metric: does this relative gain reach the paper's margin?"""
    return _reaches(gain, PAPER_GAINS)


def _margins(margins: dict[str, float]) -> str:
    return ", ".join(f"{k.upper()} {v:+.1%}" for k, v in margins.items())


def _row(report: dict[str, Any], protocol: str, degradation: str) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r["protocol"] == protocol and r["degradation"] == degradation), None)


def _margins_text(report: dict[str, Any], unseen: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Against the paper's margins", "",
             f"The paper's relative gains over the same baseline are {_margins(PAPER_GAINS)}.", ""]
    for label, rep in [("held-out test phantoms", report), *((f"`{k}`", v) for k, v in unseen.items())]:
        row = _row(rep, "paper", "realesrgan")
        if row is None:
            continue
        ok = paper_verdict(row["gain"])
        parts = ", ".join(f"{k.upper()} {row['gain'][k]:+.1%} ({'meets' if ok[k] else 'below'} "
                          f"{PAPER_GAINS[k]:+.1%})" for k in PAPER_GAINS)
        lines.append(f"- {label}, paper protocol, Real-ESRGAN: {parts}.")
    bic = _row(report, "paper", "bicubic")
    if bic is not None:
        won = [k.upper() for k, ok in _reaches(bic["gain"], dict.fromkeys(PAPER_GAINS, 0.0)).items() if ok]
        why = ("" if len(won) == len(PAPER_GAINS) else "; it was trained on Real-ESRGAN degradations only, so it "
               "denoises and sharpens inputs that need neither")
        lines.append(f"- bicubic-only degradation (paper protocol): beats the baseline on "
                     f"{', '.join(won) if won else 'no metric'}{why}.")
    return lines + [""]


def card_markdown(report: dict[str, Any], unseen: dict[str, dict[str, Any]], curves: Sequence[str] = ()) -> str:
    d, m = report["data"], report["model"]
    md = [f"# CineSR evaluation: {m['name']} ({m['version']})", "",
          f"Held-out test data: `{d['spec']}` ({d.get('generator', 'sax')} generator, {d['patients']} patients, "
          f"{d['slices']} slices; seeds disjoint from the training seeds); seed {report['seed']}; "
          f"{report['sampler_steps']} sampler steps; {report['clips_per_slice']} mini-clips per slice (paper "
          "protocol, metrics on the middle output frame) and every output frame (sequence protocol). Baseline: "
          f"{report['baseline']}. Ground truth is the phantom as acquired at full resolution (with its Rician "
          "noise), as the paper's ground truth is a real acquisition.", "",
          markdown_table(report), "",
          "## Phantoms the model never saw (other generators)", ""]
    for spec, rep in unseen.items():
        ud = rep["data"]
        md += [f"`{ud.get('generator')}`, seeds {ud.get('seeds')} (`{spec}`):", "", markdown_table(rep), ""]
    md += _margins_text(report, unseen)
    md += [f"![{f}]({f})" for f in FIGURES if f in report.get("figures", [])]
    if curves:
        md += ["", "Training curves: " + ", ".join(f"`{c}`" for c in curves) + "."]
    md += ["", "Relative gain = model / baseline - 1. Written by `python -m cinesr.model.card`."]
    return "\n".join(md) + "\n"


def write_card(bundle_dir: str | Path, test: str = TEST, unseen: Sequence[str] = UNSEEN,
               progress: Callable[[int, int, str], None] | None = None,
               phantom: dict[str, int] | None = None) -> dict[str, Any]:
    """Evaluate the bundle and write its card (model.json, evaluation.md, figures); returns model.json.
    phantom: options of the phantoms (slices, frames, size), as for `evaluate`."""
    from .bundle import load_bundle, write_meta

    folder = Path(bundle_dir)
    model = load_bundle(folder)
    with tempfile.TemporaryDirectory(prefix="cinesr-card-") as tmp:
        report = evaluate(test, model, Path(tmp), progress=progress, phantom=phantom)
        for name in FIGURES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, folder / name)
    report["figures"] = [f for f in report.get("figures", []) if f in FIGURES]
    report["model"]["path"] = None  # a temporary or local path says nothing to a reader of the bundle
    others = {spec: evaluate(spec, model, degradations=("realesrgan",), progress=progress, phantom=phantom)
              for spec in unseen}
    curves = sorted(p.name for p in folder.glob("*_curves.png"))
    (folder / "evaluation.md").write_text(card_markdown(report, others, curves), encoding="utf-8")
    generalisation = {str(rep["data"].get("generator")): {"data": rep["data"], "rows": rep["rows"]}
                      for rep in others.values()}
    return write_meta(folder, {"evaluation": report, "generalisation": generalisation})


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Evaluate a model bundle and write its card into the bundle folder.")
    p.add_argument("bundle")
    p.add_argument("--test", default=TEST)
    p.add_argument("--unseen", action="append", help=f"repeatable (default: {' '.join(UNSEEN)})")
    a = p.parse_args(argv)

    def show(done: int, total: int, what: str) -> None:
        print(f"[card] {done}/{total} {what}", flush=True)

    doc = write_card(a.bundle, a.test, a.unseen or UNSEEN, progress=show)
    for row in doc["evaluation"]["rows"]:
        print(row["protocol"], row["degradation"], {k: f"{v:+.1%}" for k, v in row["gain"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
