"""bench/options.py: how the varied options are read, and a bad one stops the run with one line."""

from __future__ import annotations

import pytest
from cinesr.bench import options


def test_varied_options_are_read_as_numbers_or_names() -> None:
    assert options.parse_vary(["kspace_taper=0,0.4", "consistency=area,auto", "stride=1,3"]) == {
        "kspace_taper": [0, 0.4], "consistency": ["area", "auto"], "stride": [1, 3]}


@pytest.mark.parametrize("arg", ["kspace_taper", "kspace_taper=", "=0.4"])
def test_a_malformed_vary_says_so(arg: str) -> None:
    with pytest.raises(SystemExit, match="NAME=V1,V2"):
        options.parse_vary([arg])


@pytest.mark.parametrize("arg, message", [("no_such_option=1", "no_such_option"),
                                          ("kspace_taper=1.5", "kspace_taper must be in")])
def test_an_unknown_or_invalid_option_stops_before_any_run(arg: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        options.main(["--vary", arg, "--out", "/nonexistent/never-written"])


def test_against_first_reads_each_metric_in_its_own_direction() -> None:
    teacher = [{"source": "sax", "acquisition": "area",
                "model": {"psnr": 30.0, "ssim": 0.80, "lpips": 0.20, "temporal": 0.040}}]
    close = [{"source": "sax", "acquisition": "area",
              "model": {"psnr": 29.8, "ssim": 0.795, "lpips": 0.215, "temporal": 0.039}}]
    far = [{"source": "sax", "acquisition": "area",
            "model": {"psnr": 30.5, "ssim": 0.78, "lpips": 0.25, "temporal": 0.0405}}]
    (row,) = options.against(teacher, close)
    assert all(row["within"].values()) and row["delta"]["psnr"] == pytest.approx(-0.2)
    (row,) = options.against(teacher, far)
    assert row["within"] == {"psnr": True, "ssim": False, "lpips": False, "temporal": False}
    assert row["delta"]["temporal"] == pytest.approx(0.0125)  # relative to the first's
    assert options.against(teacher, [{**far[0], "source": "lax"}]) == []
