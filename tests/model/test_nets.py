"""The networks reproduce ResShift's reference modules and fit its released state dicts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cinesr.model.checkpoint import extract_state_dict, load_weights, read_checkpoint
from cinesr.model.configs import load_config
from cinesr.model.nets import VQGAN, SwinUNet, decoder_graph, encoder_graph, model_stats
from cinesr.model.nets.swin import relative_position_index, shifted_window_mask
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "resshift"
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "resshift_small_reference.json").read_text())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "resshift_full_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "resshift_small_weights.safetensors"))


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "resshift_small_io.safetensors"))


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def small_unet(reference, weights) -> SwinUNet:
    unet = SwinUNet.from_resshift_config(reference["unet_config"]).eval()
    result = unet.load_state_dict(_strip(weights, "unet."), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return unet


@pytest.fixture(scope="module")
def small_vqgan(reference, weights) -> VQGAN:
    ae = VQGAN.from_resshift_config(reference["autoencoder_config"]).eval()
    ae.load_state_dict(_strip(weights, "autoencoder."), strict=True)
    return ae


def test_unet_reproduces_reference_output(small_unet, io):
    with torch.no_grad():
        out = small_unet(io["unet_x_t"], io["unet_t"], lq=io["unet_lq"])
    assert out.shape == io["unet_out"].shape
    assert (out - io["unet_out"]).abs().max().item() < TOL
    # the output depends on t: swapping the steps changes it
    with torch.no_grad():
        swapped = small_unet(io["unet_x_t"], io["unet_t"].flip(0), lq=io["unet_lq"])
    assert (swapped - io["unet_out"]).abs().max().item() > 1e-3


def test_vqgan_encode_is_unquantised_latent(small_vqgan, io):
    with torch.no_grad():
        z = small_vqgan.encode(io["ae_image"])
    assert z.shape == (2, 3, 64, 64)
    assert (z - io["ae_latent"]).abs().max().item() < TOL
    codes = small_vqgan.quantize.embedding.weight
    # before quantisation: the latent is not already a codebook entry
    assert torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), codes).min(dim=1).values.max() > 1e-4


def test_vqgan_decode_quantises_then_decodes(small_vqgan, io):
    with torch.no_grad():
        rec = small_vqgan.decode(io["ae_latent"])
        unquantised = small_vqgan.decode(io["ae_latent"], quantize=False)
    assert rec.shape == (2, 3, 256, 256)
    assert (rec - io["ae_decoded"]).abs().max().item() < TOL
    assert (unquantised - io["ae_decoded"]).abs().max().item() > TOL


def test_fresh_buffers_equal_released_ones(reference, weights):
    """Masks and position indices computed at build time equal those stored by ResShift."""
    fresh = SwinUNet.from_resshift_config(reference["unet_config"]).state_dict()
    buffers = [k for k in fresh if k.endswith(("attn_mask", "relative_position_index"))]
    assert any(k.endswith("attn_mask") for k in buffers)
    for key in buffers:
        assert torch.equal(fresh[key], weights["unet." + key]), key


def test_shift_mask_shape_and_values():
    mask = shifted_window_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert torch.equal(mask, mask.transpose(1, 2))
    idx = relative_position_index(8)
    assert idx.shape == (64, 64) and idx.min() == 0 and idx.max() == 15 * 15 - 1
    assert (idx.diagonal() == 7 * 15 + 7).all()


@pytest.mark.parametrize(
    ("net", "cfg_key", "sd_key"),
    [(SwinUNet, "unet_config", "unet_state_dict"), (VQGAN, "autoencoder_config", "autoencoder_state_dict")],
)
def test_full_size_matches_manifest(manifest, net, cfg_key, sd_key):
    with torch.device("meta"):
        module = net.from_resshift_config(manifest[cfg_key])
    got = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert list(got) == list(manifest[sd_key])
    assert got == manifest[sd_key]


def test_base_config_is_resshift_v1(manifest):
    base = load_config("base")
    assert base["unet_config"] == manifest["unet_config"]
    assert base["autoencoder_config"] == manifest["autoencoder_config"]


def test_model_stats_both_configs():
    base, tiny = model_stats(load_config("base")), model_stats(load_config("tiny"))
    assert base["unet_params_m"] == pytest.approx(118.594, abs=1e-3)
    assert base["vqgan_params_m"] == pytest.approx(55.323, abs=1e-3)
    for s in (base, tiny):
        total = s["gflops_encode"] + 15 * s["gflops_unet_step"] + s["gflops_decode"]
        assert s["gflops_window"] == pytest.approx(total)
    assert tiny["unet_params_m"] < 2 and tiny["vqgan_params_m"] < 1
    assert tiny["gflops_window"] < base["gflops_window"] / 40


def test_tiny_window_shapes():
    cfg = load_config("tiny")
    unet = SwinUNet.from_resshift_config(cfg["unet_config"]).eval()
    ae = VQGAN.from_resshift_config(cfg["autoencoder_config"]).eval()
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 256, 256))
        out = unet(z, torch.tensor([3]), lq=torch.zeros(1, 3, 64, 64))
        img = ae.decode(out)
    latent = cfg["autoencoder_config"]["embed_dim"]
    assert latent >= 3 and cfg["unet_config"]["in_channels"] == cfg["unet_config"]["out_channels"] == latent
    assert z.shape == out.shape == (1, latent, 64, 64)
    assert img.shape == (1, 3, 256, 256)


def test_tiny_autoencoder_options_skip_and_continuous_latent():
    """tiny's autoencoder: no codebook, no GroupNorm, and the skip: at initialisation (or with the
    networks' own contributions zeroed) the first 3 latent channels are the 4x4 block means and the
    decoder returns their bicubic enlargement."""
    cfg = load_config("tiny")
    ae = VQGAN.from_resshift_config(cfg["autoencoder_config"]).eval()
    assert not ae.quantized and not any(isinstance(m, torch.nn.GroupNorm) for m in ae.modules())
    for conv in (ae.quant_conv, ae.decoder.conv_out):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(img)
        out = ae.decode(z)
    torch.testing.assert_close(z[:, :3], torch.nn.functional.avg_pool2d(img, 4))
    assert torch.count_nonzero(z[:, 3:]) == 0
    torch.testing.assert_close(out, torch.nn.functional.interpolate(z[:, :3], scale_factor=4, mode="bicubic"))
    with pytest.raises(ValueError, match="skip"):
        VQGAN(dict(cfg["autoencoder_config"]["ddconfig"]), 64, cfg["autoencoder_config"]["embed_dim"])


# ---- checkpoint loader -------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_state(small_unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in small_unet.state_dict().items()}


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module", "nested_module"])
def test_loader_accepts_released_layouts(tmp_path, reference, unet_state, io, layout):
    wrapped = {
        "plain": unet_state,
        "state_dict": {"state_dict": unet_state, "epoch": 7},
        "model": {"model": unet_state},
        "module": {"module." + k: v for k, v in unet_state.items()},
        "nested_module": {"state_dict": {"module." + k: v for k, v in unet_state.items()}},
    }[layout]
    path = tmp_path / "unet.pth"
    torch.save(wrapped, path)
    unet = load_weights(SwinUNet.from_resshift_config(reference["unet_config"]).eval(), path)
    with torch.no_grad():
        out = unet(io["unet_x_t"], io["unet_t"], lq=io["unet_lq"])
    assert (out - io["unet_out"]).abs().max().item() < TOL


def test_loader_reads_safetensors_with_prefix(reference, io):
    ae = load_weights(
        VQGAN.from_resshift_config(reference["autoencoder_config"]).eval(),
        FIXTURES / "resshift_small_weights.safetensors",
        prefix="autoencoder.",
    )
    with torch.no_grad():
        assert (ae.encode(io["ae_image"]) - io["ae_latent"]).abs().max().item() < TOL


def test_loader_rejects_what_does_not_fit(tmp_path, reference, unet_state):
    def fresh() -> SwinUNet:
        return SwinUNet.from_resshift_config(reference["unet_config"])

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_weights(fresh(), junk)
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_weights(fresh(), tmp_path / "absent.pth")
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 3}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        load_weights(fresh(), tmp_path / "opt.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_weights(fresh(), tmp_path / "list.pth")
    bad = dict(unet_state)
    bad["out.2.weight"] = torch.zeros(5, 32, 3, 3)
    del bad["time_embed.0.bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing .*time_embed\.0\.bias.*shape mismatch.*out\.2\.weight"):
        load_weights(fresh(), tmp_path / "bad.safetensors")


def test_loader_tolerates_missing_buffers(reference, unet_state):
    no_buffers = {
        k: v for k, v in unet_state.items() if not k.endswith(("attn_mask", "relative_position_index"))
    }
    state = extract_state_dict({"state_dict": no_buffers})
    assert len(state) < len(unet_state)
    from cinesr.model.checkpoint import load_into

    unet = load_into(SwinUNet.from_resshift_config(reference["unet_config"]), state)
    assert torch.equal(unet.state_dict()["out.2.weight"], unet_state["out.2.weight"])


def test_read_checkpoint_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError):
        read_checkpoint(path)


# ---- ONNX export ---------------------------------------------------------------------------


def _export_and_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> np.ndarray:
    import onnxruntime as ort

    names = [f"in{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, inputs, str(path), dynamo=False, opset_version=17, input_names=names, output_names=["out"]
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})[0]


class _UNetCall(torch.nn.Module):
    def __init__(self, unet: SwinUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, lq=lq)


def test_onnx_export_matches_torch(tmp_path, small_unet, small_vqgan, io):
    x, t, lq = io["unet_x_t"][1:], io["unet_t"][1:], io["unet_lq"][1:]
    got = _export_and_run(_UNetCall(small_unet), (x, t, lq), tmp_path / "unet.onnx")
    np.testing.assert_allclose(got, io["unet_out"][1:].numpy(), atol=TOL, rtol=0)

    img = io["ae_image"][:1]
    got = _export_and_run(encoder_graph(small_vqgan), (img,), tmp_path / "encoder.onnx")
    np.testing.assert_allclose(got, io["ae_latent"][:1].numpy(), atol=TOL, rtol=0)

    z = io["ae_latent"][:1]
    got = _export_and_run(decoder_graph(small_vqgan), (z,), tmp_path / "decoder.onnx")
    np.testing.assert_allclose(got, io["ae_decoded"][:1].numpy(), atol=1e-4, rtol=0)
