"""The bundle card: verdicts against the paper's margins, the card written into a bundle, and the
bundled model itself re-evaluated against those margins on held-out and never-seen phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cinesr.model.card import PAPER_GAINS, faithful_verdict, paper_verdict, write_card


def test_paper_verdict_compares_each_metric_in_its_direction() -> None:
    assert paper_verdict(PAPER_GAINS) == {"psnr": True, "ssim": True, "lpips": True}
    assert paper_verdict({"psnr": 0.049, "ssim": 0.2, "lpips": -0.38}) == {"psnr": False, "ssim": True,
                                                                            "lpips": False}
    assert paper_verdict({"psnr": 0.1, "ssim": 0.0, "lpips": -0.5}) == {"psnr": True, "ssim": False, "lpips": True}


def test_faithful_verdict_holds_each_bar() -> None:
    base = {"psnr": 30.0, "ssim": 0.80, "lpips": 0.30, "temporal": 0.010}
    good = {"baseline": base, "model": {"psnr": 29.95, "ssim": 0.796, "lpips": 0.24, "temporal": 0.0105}}
    assert faithful_verdict(good) == {"psnr": True, "ssim": True, "lpips": True, "temporal": True}
    bad = {"baseline": base, "model": {"psnr": 29.8, "ssim": 0.79, "lpips": 0.25, "temporal": 0.011}}
    assert faithful_verdict(bad) == {"psnr": False, "ssim": False, "lpips": False, "temporal": False}


def test_card_is_written_into_the_bundle(micro_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "micro"
    shutil.copytree(micro_bundle, bundle)  # the card writes into it
    from cinesr.model.bundle import write_meta

    write_meta(bundle, {"inference": {"steps": 2, "overlap": 4}})  # a quick card
    phantom = {"slices": 1, "frames": 16, "size": 64}
    doc = write_card(bundle, "phantom:3", content=("sax",), third_party=("mrphantom",), seeds="5",
                     phantom=phantom, ceiling_seeds=(5,))
    paper = {(r["protocol"], r["acquisition"]) for r in doc["evaluation"]["rows"]}
    assert paper == {("paper", "realesrgan"), ("paper", "bicubic")}
    seq = {(r["source"], r["acquisition"]) for r in doc["generalisation"]["rows"]}
    assert seq == {(g, a) for g in ("sax", "mrphantom") for a in ("area", "kspace")}
    assert set(doc["autoencoder"]) == {"sax", "sax noise-free", "mrphantom"}
    assert set(doc["verdicts"]["fidelity_bar"]) == {f"{g}/{a}" for g, a in seq}
    assert json.loads((bundle / "model.json").read_text())["evaluation"]["rows"] == doc["evaluation"]["rows"]
    md = (bundle / "evaluation.md").read_text()
    row = doc["generalisation"]["rows"][0]
    assert f"{row['model']['psnr']:.2f}" in md and f"{row['gain']['lpips']:+.1%}" in md
    assert "mrphantom" in md and "The autoencoder is not the ceiling" in md
    assert (bundle / "figure_mrphantom_sequence_area.png").stat().st_size > 1000
    assert doc["evaluation"]["model"]["path"] is None
