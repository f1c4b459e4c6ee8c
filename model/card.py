"""A bundle's card: what the model does on data it never trained on, measured through the shipped path.

`write_card(bundle)` runs, with the bundle's shipped inference options (cinesr.model.evaluate runs
cinesr.model.pipeline, the path of `cinesr superresolve` and the service):

* the paper's protocol on held-out heart phantoms, with Real-ESRGAN and bicubic acquisitions, against
  the paper's margins (+5% PSNR, +6.5% SSIM, -39% LPIPS) and against "win on all three" (bicubic);
* the whole-sequence protocol with area-averaged and k-space-truncated acquisitions on held-out seeds of
  every content generator the model trained on, and on the two third-party cine sources it never saw
  (`mrphantom`, `motioncloud`), against the fidelity bar: LPIPS at least 20% below the baseline, PSNR
  no more than 0.1 dB and SSIM no more than 0.005 below it, temporal error at most 5% above it;
* the autoencoder's reconstruction of held-out truth per content kind (and of the heart phantoms'
  noise-free twins) against the bicubic baseline on the same frames: the ceiling of the model.

It stores them in model.json (`evaluation`, `generalisation`, `autoencoder`, `verdicts`), copies figures
next to the weights and writes evaluation.md. `python -m cinesr.model.card BUNDLE` does the same.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import Progress, evaluate, markdown_table

# The paper's relative gains over the same baseline (Table 1): PSNR +5%, SSIM +6.5%, LPIPS -39%.
PAPER_GAINS = {"psnr": 0.05, "ssim": 0.065, "lpips": -0.39}
HELD_OUT = "phantom:1000-1009"
CONTENT = ("sax", "sax-fourier", "lax", "deadleaves", "texture", "shepp-logan")
THIRD_PARTY = ("mrphantom", "motioncloud")
SEEDS = "1000-1003"



def _reaches(gain: dict[str, float], margins: dict[str, float]) -> dict[str, bool]:
    """Per metric: is the relative gain at least the margin, in the metric's better direction
    (LPIPS, the one lower-is-better metric, has a negative margin)?"""
    return {k: (gain[k] <= v if k == "lpips" else gain[k] >= v) for k, v in margins.items()}


def paper_verdict(gain: dict[str, float]) -> dict[str, bool]:
    """Per metric: does this relative gain reach the paper's margin?"""
    return _reaches(gain, PAPER_GAINS)


def faithful_verdict(row: dict[str, Any]) -> dict[str, bool]:
    """The fidelity bar of one evaluation row: LPIPS >= 20% lower, PSNR >= baseline - 0.1 dB, SSIM >=
    baseline - 0.005, temporal error <= 1.05 x the baseline's (where measured)."""
    b, m = row["baseline"], row["model"]
    out = {"lpips": m["lpips"] <= 0.8 * b["lpips"], "psnr": m["psnr"] >= b["psnr"] - 0.1,
           "ssim": m["ssim"] >= b["ssim"] - 0.005}
    if "temporal" in b and "temporal" in m:
        out["temporal"] = m["temporal"] <= 1.05 * b["temporal"]
    return out


def _row(report: dict[str, Any], protocol: str, acquisition: str, source: str | None = None) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r["protocol"] == protocol and r["acquisition"] == acquisition
                 and (source is None or r["source"] == source)), None)


@torch.no_grad()
def autoencoder_ceiling(bundle: Any, generators: Sequence[str], seeds: Sequence[int], windows: int = 4
                        ) -> dict[str, dict[str, float]]:
    """Per generator: PSNR (dB) of the autoencoder's reconstruction of held-out true windows, and of the
    bicubic baseline (4x4 area acquisition, bicubic back) on the same frames; for the heart phantoms also
    on their noise-free twins (noise in the truth bounds any reconstruction)."""
    from .baseline import bicubic_up
    from .degrade import area_down
    from .intensity import Normalisation
    from .metrics import psnr
    from .phantom import HEART_GENERATORS, make_study

    ae = bundle.autoencoder
    table: dict[str, dict[str, float]] = {}
    for gen in generators:
        variants = [("", True)] + ([(" noise-free", False)] if gen in HEART_GENERATORS else [])
        for suffix, noise in variants:
            rec_db, base_db = [], []
            for seed in seeds:
                frames = make_study(int(seed), slices=1, frames=16, size=256, generator=gen, noise=noise).frames[0]
                rng = np.random.default_rng(int(seed))
                for _ in range(windows):
                    k = int(rng.integers(frames.shape[0] - 2))
                    win = frames[k : k + 3]
                    norm = Normalisation.fit([area_down(win)])  # the pipeline's units
                    x = torch.from_numpy(norm.forward(win))[None]
                    rec = norm.inverse(ae.decode(ae.encode(x.to(bundle.device))).cpu().numpy()[0])
                    rec_db.append(psnr(np.clip(rec, 0, 1), win))
                    base_db.append(psnr(np.clip(bicubic_up(area_down(win)), 0, 1), win))
            table[gen + suffix] = {"autoencoder_psnr": round(float(np.mean(rec_db)), 2),
                                   "baseline_psnr": round(float(np.mean(base_db)), 2),
                                   "margin_db": round(float(np.mean(rec_db) - np.mean(base_db)), 2)}
    return table


def _verdict_lines(paper: dict[str, Any], sequence: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    verdicts: dict[str, Any] = {}
    lines = ["## Verdicts", ""]
    row = _row(paper, "paper", "realesrgan")
    if row is not None:
        ok = paper_verdict(row["gain"])
        verdicts["paper_margins_realesrgan"] = ok
        lines.append("- Held-out phantoms, paper protocol, Real-ESRGAN, against the paper's margins: " + ", ".join(
            f"{k.upper()} {row['gain'][k]:+.1%} ({'meets' if ok[k] else 'below'} {PAPER_GAINS[k]:+.1%})"
            for k in PAPER_GAINS) + ".")
    row = _row(paper, "paper", "bicubic")
    if row is not None:
        ok = _reaches(row["gain"], dict.fromkeys(PAPER_GAINS, 0.0))
        verdicts["paper_bicubic_wins"] = ok
        won = [k.upper() for k, v in ok.items() if v]
        lines.append(f"- Held-out phantoms, paper protocol, bicubic-only: wins {', '.join(won) or 'no metric'}"
                     f"{'' if len(won) == len(ok) else ' (not all three)'}.")
    faithful = {}
    for r in sequence["rows"]:
        ok = faithful_verdict(r)
        faithful[f"{r['source']}/{r['acquisition']}"] = ok
        failed = [k for k, v in ok.items() if not v]
        lines.append(f"- {r['source']}, {r['acquisition']} acquisition (sequence): "
                     + ("meets the fidelity bar" if not failed else f"misses the fidelity bar on {', '.join(failed)}")
                     + f" (PSNR {r['model']['psnr'] - r['baseline']['psnr']:+.2f} dB, SSIM "
                       f"{r['model']['ssim'] - r['baseline']['ssim']:+.4f}, LPIPS {r['gain']['lpips']:+.1%}, "
                       f"temporal {r['gain'].get('temporal', float('nan')):+.1%}).")
    verdicts["fidelity_bar"] = faithful
    return lines + [""], verdicts


def card_markdown(paper: dict[str, Any], sequence: dict[str, Any], ceiling: dict[str, dict[str, float]],
                  verdict_lines: list[str], figures: Sequence[str], curves: Sequence[str] = ()) -> str:
    m = paper["model"]
    md = [f"# CineSR model card: {m['name']} ({m['version']})", "",
          "Every number below comes from the shipped inference path (cinesr.model.pipeline: windows, tiles, "
          "intensity map, sampler, data consistency), with the bundle's options "
          f"`{paper['options']}`. Baseline: {paper['baseline']}. Written by `python -m cinesr.model.card`.", "",
          "## The paper's protocol, held-out heart phantoms", "",
          "Seeds disjoint from the training seeds; metrics on the middle frame of each 3-frame window.", "",
          markdown_table(paper), "",
          "## Whole sequences, area and k-space acquisitions, on content it never trained on", "",
          "Held-out seeds of the training generators, and two cine sources written by others that it never "
          "saw in training: MRPhantom (`mrphantom`) and MotionClouds (`motioncloud`). Every 8th frame "
          "acquired; metrics over every output frame; temporal error = RMSE of frame-to-frame changes "
          "against the truth's.", "",
          markdown_table(sequence), "",
          "## The autoencoder is not the ceiling", "",
          "PSNR of the autoencoder's reconstruction of held-out true windows against the bicubic baseline on the "
          "same frames (4x4 area acquisition).", "",
          "| content | autoencoder PSNR (dB) | baseline PSNR (dB) | margin (dB) |", "|---|---|---|---|"]
    md += [f"| {k} | {v['autoencoder_psnr']:.2f} | {v['baseline_psnr']:.2f} | {v['margin_db']:+.2f} |"
           for k, v in ceiling.items()]
    md += ["", *verdict_lines]
    md += [f"![{f}]({f})" for f in figures]
    if curves:
        md += ["", "Training curves: " + ", ".join(f"`{c}`" for c in curves) + "."]
    md += ["", "Relative gain = model / baseline - 1 (higher PSNR/SSIM, lower LPIPS and temporal error are "
           "better)."]
    return "\n".join(md) + "\n"


def write_card(bundle_dir: str | Path, held_out: str = HELD_OUT, content: Sequence[str] = CONTENT,
               third_party: Sequence[str] = THIRD_PARTY, seeds: str = SEEDS, progress: Progress | None = None,
               phantom: dict[str, int] | None = None, ceiling_seeds: Sequence[int] = (1000, 1001)) -> dict[str, Any]:
    """Evaluate the bundle and write its card (model.json, evaluation.md, figures); returns model.json.
    phantom: options of the phantoms (slices, frames, size), as for `evaluate`."""
    from .bundle import load_bundle, write_meta

    folder = Path(bundle_dir)
    model = load_bundle(folder)
    specs = [f"phantom:{seeds}:{g}" for g in (*content, *third_party)]
    figures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cinesr-card-") as tmp:
        paper = evaluate(held_out, model, Path(tmp) / "paper", acquisitions=("realesrgan", "bicubic"),
                         protocols=("paper",), progress=progress, phantom=phantom)
        sequence = evaluate(specs, model, Path(tmp) / "sequence", acquisitions=("area", "kspace"),
                            protocols=("sequence",), progress=progress, phantom=phantom)
        for name in sequence.get("figures", []):
            if any(name.startswith(f"figure_{g}_") for g in third_party) or name.startswith("figure_sax_"):
                shutil.copyfile(Path(tmp) / "sequence" / name, folder / name)
                figures.append(name)
    for report in (paper, sequence):
        report["model"]["path"] = None  # a temporary or local path says nothing to a reader of the bundle
        report["figures"] = figures
    ceiling = autoencoder_ceiling(model, (*content, *third_party), ceiling_seeds)
    lines, verdicts = _verdict_lines(paper, sequence)
    curves = sorted(p.name for p in folder.glob("*_curves.png"))
    (folder / "evaluation.md").write_text(card_markdown(paper, sequence, ceiling, lines, figures, curves),
                                          encoding="utf-8")
    return write_meta(folder, {"evaluation": paper, "generalisation": sequence, "autoencoder": ceiling,
                               "verdicts": verdicts})


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Evaluate a model bundle and write its card into the bundle folder.")
    p.add_argument("bundle")
    p.add_argument("--held-out", default=HELD_OUT)
    p.add_argument("--seeds", default=SEEDS, help="seeds of every content source (sequence protocol)")
    p.add_argument("--phantom-slices", type=int, help="slices per phantom patient (default: the source's)")
    p.add_argument("--phantom-frames", type=int, help="frames per phantom cycle")
    p.add_argument("--phantom-size", type=int, help="phantom matrix (truth)")
    a = p.parse_args(argv)
    phantom = {k: v for k, v in (("slices", a.phantom_slices), ("frames", a.phantom_frames),
                                 ("size", a.phantom_size)) if v}

    def show(done: int, total: int, what: str) -> None:
        print(f"[card] {done}/{total} {what}", flush=True)

    doc = write_card(a.bundle, a.held_out, seeds=a.seeds, progress=show, phantom=phantom or None)
    for key, ok in doc["verdicts"]["fidelity_bar"].items():
        print(key, "meets" if all(ok.values()) else f"misses {[k for k, v in ok.items() if not v]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
