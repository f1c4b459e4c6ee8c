"""Model bundles (save/load, fp16 storage, integrity) and torch window inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cinesr.model.bundle import (
    MODEL_JSON,
    build_networks,
    load_bundle,
    read_meta,
    save_bundle,
    write_meta,
)
from cinesr.model.configs import load_config
from cinesr.model.errors import InputError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    config = {"name": "tiny", **load_config("tiny")}
    # a micro UNet (16x16 inputs) keeps the 15-step sampling in these tests fast on a shared CPU
    config["unet_config"] = {**config["unet_config"], "image_size": 16, "lq_size": 16, "channel_mult": [1, 1],
                             "num_res_blocks": [1, 1], "attention_resolutions": [8], "window_size": 4}
    unet, ae = build_networks(config)
    path = save_bundle(tmp_path_factory.mktemp("b") / "bundle", unet, ae, config,
                       {"training": {"steps": 0}, "metrics": {"note": "untrained"}})
    return path, unet.eval(), ae.eval()


def test_model_json_describes_the_bundle(saved: tuple[Path, torch.nn.Module, torch.nn.Module]) -> None:
    path, unet, _ = saved
    doc = json.loads((path / MODEL_JSON).read_text())
    assert doc["format"] == "cinesr-model-bundle" and doc["name"] == "tiny"
    assert doc["version"].startswith("tiny-")
    assert doc["config"]["unet_config"]["model_channels"] == 32
    assert doc["training"] == {"steps": 0}
    assert doc["weights"]["unet"]["parameters"] == sum(p.numel() for p in unet.parameters())
    assert "float16" in doc["weights"]["unet"]["dtypes"]
    assert (path / "unet.safetensors").stat().st_size == doc["weights"]["unet"]["bytes"]


def test_round_trip_reproduces_the_networks(saved: tuple[Path, torch.nn.Module, torch.nn.Module]) -> None:
    path, unet, ae = saved
    bundle = load_bundle(path, verify=True)
    assert bundle.lq_size == 16 and bundle.scale == 4 and bundle.schedule.steps == 15
    torch.manual_seed(1)
    latent = config_latent_channels(bundle.config)
    x = torch.rand(1, latent, 16, 16) * 2 - 1
    lq = torch.rand(1, 3, 16, 16) * 2 - 1
    t = torch.tensor([7])
    with torch.no_grad():
        ref = unet(x, t, lq=lq)
        got = bundle.unet(x, t, lq=lq)
        assert bundle.unet.out[2].weight.dtype == torch.float32
        # stored in fp16 only where lossless enough: outputs agree to well under a grey level
        assert float((ref - got).abs().max()) < 5e-3 * float(ref.abs().max())
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        assert float((ae.encode(img) - bundle.autoencoder.encode(img)).abs().max()) < 1e-2


def config_latent_channels(config: dict) -> int:
    return int(config["autoencoder_config"]["embed_dim"])


def test_integrity_and_bad_bundles(saved: tuple[Path, torch.nn.Module, torch.nn.Module], tmp_path: Path) -> None:
    path, _, _ = saved
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "unet.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        load_bundle(copy, verify=True)
    with pytest.raises(InputError, match="model.json"):
        load_bundle(tmp_path / "nothing")
    doc = write_meta(copy, {"evaluation": {"rows": []}})
    assert read_meta(copy)["evaluation"] == {"rows": []} and doc["name"] == "tiny"
