"""Training: losses go down on a fixed batch, a short run writes logs/checkpoints/bundle, resume continues."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cinesr.model.bundle import build_networks, load_bundle, save_bundle
from cinesr.model.configs import load_config
from cinesr.model.diffusion import Schedule, training_loss, unet_denoiser
from cinesr.model.errors import InputError
from cinesr.model.metrics import LPIPS
from cinesr.model.plots import read_log, training_curves
from cinesr.model.train import DEFAULTS, apply_init, autoencoder_losses, load_train_config, restart_codes, train

# A micro model on 64x64 phantoms (16x16 inputs): same code paths as tiny, a fraction of the cost.
MICRO_UNET = {"image_size": 16, "lq_size": 16, "model_channels": 32, "channel_mult": [1, 1],
              "num_res_blocks": [1, 1], "attention_resolutions": [8], "swin_embed_dim": 32,
              "num_head_channels": 16, "window_size": 4}


def micro_model(codebook: bool = True) -> dict:
    """tiny at 16x16; with `codebook` an LDM-style VQ autoencoder (3-channel latent, GroupNorm, codebook of
    64: the code path of base), else tiny's own (continuous latent with the skip, no GroupNorm)."""
    cfg = copy.deepcopy(load_config("tiny"))
    cfg["unet_config"].update(MICRO_UNET)
    if codebook:
        cfg["unet_config"].update(in_channels=3, out_channels=3)
        cfg["autoencoder_config"].update(n_embed=64, embed_dim=3)
        cfg["autoencoder_config"]["ddconfig"].update(z_channels=3, norm="group", skip=False)
    return cfg


def micro_config(steps: int = 2, ae_steps: int | None = None) -> dict:
    return {
        "name": "micro", "model": micro_model(), "seed": 5, "device": "cpu",
        "data": {"source": "phantom:0-11", "phantom": {"slices": 1, "frames": 9, "size": 64}, "pool": 6,
                 "degradation": {"kind": "bicubic"}, "cache_patients": 12,
                 "val_source": "phantom:100-101", "val_split": "all"},
        "autoencoder": {"steps": ae_steps or steps, "batch_size": 2, "crop": 32, "log_every": 1, "checkpoint_every": 1,
                        "restart_codes_every": 2},
        "denoiser": {"steps": steps, "batch_size": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": 1,
                     "val_every": 2, "val_windows": 2},
    }


def test_losses_decrease_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    unet, ae = build_networks(micro_model())
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 32, 32) * 2 - 1, 3, 1, 1)
    lpips_net = LPIPS()
    with torch.no_grad():  # as train() does: codebook starts on encoder outputs
        restart_codes(ae, torch.zeros(64, dtype=torch.long), ae.encode(x), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(ae.parameters(), lr=2e-4)
    cfg = DEFAULTS["autoencoder"]
    ae_losses = []
    for _ in range(6):
        loss, parts, _, _ = autoencoder_losses(ae, x, lpips_net, cfg)
        ae_losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ae_losses[-1] < 0.9 * ae_losses[0]
    assert set(parts) >= {"l1", "lpips", "codebook", "commit"}

    continuous = build_networks(micro_model(codebook=False))[1]
    opt = torch.optim.Adam(continuous.parameters(), lr=1e-3)
    cont = DEFAULTS["autoencoder"] | {"mse_weight": 1.0}
    cont_losses = []
    for _ in range(6):
        loss, parts, _, idx = autoencoder_losses(continuous, x, lpips_net, cont)
        cont_losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert idx is None and set(parts) == {"l1", "mse", "lpips"} and cont_losses[-1] < 0.9 * cont_losses[0]

    schedule = Schedule.from_config(micro_model()["diffusion"])
    g = torch.Generator().manual_seed(0)
    x0, y, lq = (torch.randn(4, 3, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([0, 4, 9, 14])
    noise = torch.randn(4, 3, 16, 16, generator=g)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = training_loss(unet_denoiser(unet), x0, y, lq, schedule, t=t, noise=noise)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


def test_short_run_then_resume_continues(tmp_path: Path) -> None:
    out = tmp_path / "run"
    bundle = train(micro_config(2), out)
    assert (bundle / "model.json").is_file()
    ckpt = torch.load(out / "checkpoints" / "denoiser.pt", weights_only=True)
    assert ckpt["step"] == 2
    ae_log = read_log(out / "logs" / "autoencoder.jsonl")
    assert [r["step"] for r in ae_log] == [1, 2]
    assert all(r["loss"] > 0 and "lpips" in r for r in ae_log)
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["training"]["autoencoder"]["steps"] == 2 and meta["training"]["denoiser"]["steps"] == 2
    assert meta["training"]["data"]["kind"] == "phantom"

    # resume with a longer schedule: continues at step 3, does not start over
    train(micro_config(3), out)
    ae_steps = [r["step"] for r in read_log(out / "logs" / "autoencoder.jsonl")]
    dn = read_log(out / "logs" / "denoiser.jsonl")
    assert ae_steps == [1, 2, 3]
    assert [r["step"] for r in dn] == [1, 2, 3]
    assert any("val_psnr" in r and "val_baseline_psnr" in r for r in dn)
    assert torch.load(out / "checkpoints" / "denoiser.pt", weights_only=True)["step"] == 3

    # with the autoencoder fixed, a denoiser run straight to 3 steps gives the same weights as
    # 2 steps + resume (everything is seeded per step)
    train(micro_config(2), tmp_path / "two")
    resumed = train(micro_config(3, ae_steps=2), tmp_path / "two")
    straight = train(micro_config(3, ae_steps=2), tmp_path / "straight")
    a, b = load_bundle(resumed), load_bundle(straight)
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5), name
    png = training_curves(out, tmp_path / "curves.png")
    assert png.stat().st_size > 1000


def test_init_from_bundle_and_checkpoint_files(tmp_path: Path) -> None:
    torch.manual_seed(1)
    unet, ae = build_networks(micro_model())
    save_bundle(tmp_path / "b", unet, ae, micro_model())
    fresh_unet, fresh_ae = build_networks(micro_model())
    assert apply_init(tmp_path / "b", fresh_unet, fresh_ae) == [f"bundle {tmp_path / 'b'}"]
    ref = unet.state_dict()["out.2.weight"]
    assert torch.allclose(fresh_unet.state_dict()["out.2.weight"], ref, atol=1e-3)
    # a ResShift-style checkpoint: weights nested under "state_dict" with a "model." prefix
    torch.save({"state_dict": {f"model.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "unet.pth")
    other_unet, other_ae = build_networks(micro_model())
    loaded = apply_init([tmp_path / "unet.pth"], other_unet, other_ae)
    assert loaded == [f"unet <- {tmp_path / 'unet.pth'}"]
    assert torch.equal(other_unet.state_dict()["out.2.weight"], ref)
    torch.save({"state_dict": {"nonsense": torch.zeros(3)}}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="fits neither"):
        apply_init(tmp_path / "bad.pth", other_unet, other_ae)


def test_train_config_validation() -> None:
    cfg = load_train_config("tiny")
    assert cfg["model"] == "tiny" and cfg["denoiser"]["ema_decay"] > 0.9
    assert load_train_config("base")["denoiser"]["lr"] == pytest.approx(5e-5)
    with pytest.raises(InputError):
        load_train_config("nope")
    with pytest.raises(InputError):
        load_train_config({"bogus": 1})
    with pytest.raises(InputError):
        train(micro_config(1), "/tmp/never", stage="everything")


def test_decoder_stage_keeps_the_latent_space(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = micro_config(2)
    train(cfg, out, stage="autoencoder")
    before = torch.load(out / "checkpoints" / "autoencoder.pt", weights_only=True)["model"]
    cfg["decoder"] = {"steps": 2, "batch_size": 2, "crop": 32, "log_every": 1, "checkpoint_every": 1}
    assert train(cfg, out, stage="decoder") == out  # no denoiser yet: no bundle
    after = torch.load(out / "checkpoints" / "decoder.pt", weights_only=True)["model"]
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert [r["step"] for r in read_log(out / "logs" / "decoder.jsonl")] == [1, 2]


def test_refine_stage_trains_the_decoder_on_sampled_latents(tmp_path: Path) -> None:
    start = train(micro_config(2), tmp_path / "base")  # a micro bundle with a denoiser
    cfg = micro_config(2)
    cfg["refine"] = {"steps": 3, "pool": 4, "batch_size": 2, "crop": 32, "log_every": 1, "checkpoint_every": 1}
    refined = train(cfg, tmp_path / "refined", stage="refine", init_from=[start])
    a, b = load_bundle(start), load_bundle(refined)
    sa, sb = a.autoencoder.state_dict(), b.autoencoder.state_dict()
    frozen = [k for k in sa if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(sa[k], sb[k]) for k in frozen)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name  # the denoiser is not touched
    log = read_log(tmp_path / "refined" / "logs" / "refine.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["mse"] > 0 and "lpips" in r for r in log)
    meta = json.loads((refined / "model.json").read_text())["training"]
    assert meta["refine"]["steps"] == 3 and meta["refine"]["pool"] == 4
    assert meta["autoencoder"]["steps"] == 2 and meta["denoiser"]["steps"] == 2  # the bundle's history is kept
    again = train({**cfg, "refine": {**cfg["refine"], "steps": 2}}, tmp_path / "again", stage="refine",
                  init_from=[refined])
    twice = json.loads((again / "model.json").read_text())["training"]
    assert twice["refine"]["steps"] == 2 and [e["steps"] for e in twice["refine"]["earlier"]] == [3]
    assert "earlier" not in twice["denoiser"]  # only a stage that ran again keeps an earlier record
    assert twice["wall_time_s"] >= meta["wall_time_s"]  # earlier runs count
    with pytest.raises(InputError, match="'refine' needs a trained autoencoder"):
        train(cfg, tmp_path / "empty", stage="refine")


def test_distill_stage_puts_a_student_in_the_bundle(tmp_path: Path) -> None:
    """A student distilled from a micro bundle: its weights and `distilled` record ship in the bundle, it
    serves 1, 2 and 4 steps (with the deterministic sampler), the teacher the rest; the history is kept."""
    from cinesr.model.inference import TorchRunner
    from cinesr.model.pipeline import Options

    cfg = micro_config(2, ae_steps=2)
    cfg["model"] = micro_model(codebook=False)
    start = train(cfg, tmp_path / "cont")
    cfg["distill"] = {"steps": 3, "pool": 4, "batch_size": 2, "log_every": 1, "checkpoint_every": 1}
    distilled = train(cfg, tmp_path / "student", stage="distill", init_from=[start])
    b = load_bundle(distilled)
    assert (distilled / "student.safetensors").is_file() and b.student is not None
    assert b.student_steps == (1, 2, 4) and b.meta["distilled"]["sampler"] == "ddim"
    assert b.unet_for(1) is b.student and b.unet_for(15) is b.unet
    teacher = load_bundle(start)
    for (name, pa), pb in zip(teacher.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name  # the teacher ships unchanged
    assert any(not torch.equal(pa, pb) for pa, pb in zip(b.unet.state_dict().values(),
                                                          b.student.state_dict().values(), strict=True))
    log = read_log(tmp_path / "student" / "logs" / "distill.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["teacher_mse"] >= 0 and r["gt_mse"] > 0 for r in log)
    meta = json.loads((distilled / "model.json").read_text())["training"]
    assert meta["distill"]["steps"] == 3 and meta["denoiser"]["steps"] == 2
    # only the samples the teacher's chains use are built (data.pool 6, distill.pool 4)
    assert torch.load(tmp_path / "student" / "pool.pt", weights_only=False)["lq"].shape[0] == 4
    runner = TorchRunner.for_options(b, Options(steps=1, sampler="ancestral"))
    assert runner.unet is b.student and runner.plan.sampler == "ddim" and runner.plan.timesteps == (14,)
    assert TorchRunner.for_options(b, Options(steps=15)).unet is b.unet
    # a decoder stage on top keeps the student (the denoiser it learned from did not change)
    cfg["refine"] = {"steps": 1, "pool": 2, "batch_size": 2, "crop": 32, "log_every": 1, "checkpoint_every": 1}
    refined = train(cfg, tmp_path / "refined", stage="refine", init_from=[distilled])
    assert load_bundle(refined).student_steps == (1, 2, 4)


def test_a_smoke_run_caps_the_sampler_chain_pools_too(tmp_path: Path) -> None:
    """--max-steps caps every stage's steps and the refine/distill pools (each chain costs T UNet calls)."""
    import yaml

    cfg = micro_config(2, ae_steps=2)
    cfg["distill"] = {"steps": 1500, "pool": 512}
    with pytest.raises(InputError, match="needs a trained autoencoder"):
        train(cfg, tmp_path / "smoke", stage="distill", max_steps=3)
    written = yaml.safe_load((tmp_path / "smoke" / "train_config.yaml").read_text())
    assert written["distill"]["steps"] == 3 and written["distill"]["pool"] == 8
    assert written["refine"]["pool"] == 8
