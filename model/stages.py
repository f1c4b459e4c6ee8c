# Over 500 lines: the five training stages side by side, each small; the loop they plug into is loop.py.
"""The training stages, each a `cinesr.model.loop.Stage`: what differs between them, and nothing else.

* ``autoencoder``: the VQGAN on random crops of true windows (and some bicubic-upsampled inputs, which
  the shift target y encodes): L1 + MSE + LPIPS reconstruction, codebook and commitment losses when it
  has a codebook (unused codes restarted from recent encoder outputs), optionally a PatchGAN loss.
* ``decoder``: the decoder alone on encoder outputs (encoder and codebook frozen, so every latent the
  denoiser learned keeps its meaning).
* ``denoiser``: ResShift's x0-MSE on latents of the samples (autoencoder frozen), EMA, validation
  through the shipped inference path against the baseline.
* ``refine``: the decoder alone again, on the latents the trained sampler produces (as inference makes
  them, with the bundle's shipped sampler options), with a fidelity loss against the truth.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import SampleDataset
from .diffusion import Schedule, training_loss, unet_denoiser, upsample_lq
from .loop import Progress, Stage, step_generator
from .metrics import LPIPS

# ------------------------------------------------------------------------------------------- data


class SamplePool:
    """A fixed set of samples 0..N-1 of a dataset held in memory (float16), built once per run.

    CPU training cannot afford flow interpolation, degradation and phantom rendering at every step;
    with `data.pool: N` the stages draw from these N samples (the autoencoder takes random crops).
    Saved under out_dir/pool.pt so a resumed run does not rebuild it.
    """

    def __init__(self, lq: torch.Tensor, gt: torch.Tensor) -> None:
        self.lq, self.gt = lq, gt

    def __len__(self) -> int:
        return int(self.lq.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"lq": self.lq[i].float(), "gt": self.gt[i].float()}

    @classmethod
    def build(cls, dataset: SampleDataset, size: int, path: Path | None = None,
              progress: Progress | None = None) -> SamplePool:
        import json

        from .folders import atomic_write

        key = {"size": size, "seed": dataset.seed, "sources": dataset.describe(), "mode": dataset.mode,
               "patients": dataset.patients, "degradation": dataset.degradation.to_dict()}
        key = json.loads(json.dumps(key))
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if saved.get("key") == key:
                return cls(saved["lq"], saved["gt"])
        lq, gt = [], []
        for i in range(size):
            item = dataset[i]
            lq.append(item["lq"].half())
            gt.append(item["gt"].half())
            if progress and ((i + 1) % 64 == 0 or i + 1 == size):
                progress("samples", i + 1, size, {})
        pool = cls(torch.stack(lq), torch.stack(gt))
        if path is not None:
            with atomic_write(path) as tmp:
                torch.save({"key": key, "lq": pool.lq, "gt": pool.gt}, tmp)
        return pool


Samples = SampleDataset | SamplePool


def _item(samples: Samples, index: int) -> dict[str, torch.Tensor]:
    return samples[index]


def random_crops(samples: Samples, step: int, batch: int, crop: int, seed: int, lq_fraction: float = 0.0
                 ) -> torch.Tensor:
    """Random crops of true windows (a fraction of them bicubic-upsampled inputs instead), flipped at random."""
    gen = step_generator(seed, step, 1)
    images = []
    for j in range(batch):
        if isinstance(samples, SamplePool):
            item = samples[int(torch.randint(0, len(samples), (), generator=gen))]
        else:
            item = samples[step * batch + j]
        img = item["gt"]
        if float(torch.rand((), generator=gen)) < lq_fraction:
            img = upsample_lq(item["lq"][None], 4)[0]
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (), generator=gen)) if h > crop else 0
        left = int(torch.randint(0, w - crop + 1, (), generator=gen)) if w > crop else 0
        img = img[:, top : top + crop, left : left + crop]
        if float(torch.rand((), generator=gen)) < 0.5:
            img = img.flip(-1)
        images.append(img)
    return torch.stack(images)


# ------------------------------------------------------------------------------------ autoencoder


def autoencoder_losses(ae: nn.Module, x: torch.Tensor, lpips_net: nn.Module | None, cfg: Mapping[str, Any]
                       ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor | None]:
    """Reconstruction (+ VQ) losses of a batch in model units; returns (loss, parts, reconstruction,
    code indices or None without a codebook)."""
    z = ae.encode(x)
    parts: dict[str, torch.Tensor] = {}
    idx = None
    if ae.quantized:
        idx = ae.quantize.indices(z)
        zq = ae.quantize.embedding(idx).permute(0, 3, 1, 2)
        parts["codebook"] = F.mse_loss(zq, z.detach())
        parts["commit"] = F.mse_loss(z, zq.detach())
        rec = ae.decode(z + (zq - z).detach(), quantize=False)  # straight-through estimator
    else:
        rec = ae.decode(z)
    parts["l1"] = (rec - x).abs().mean()
    loss = float(cfg["l1_weight"]) * parts["l1"]
    if float(cfg.get("mse_weight") or 0):
        parts["mse"] = F.mse_loss(rec, x)
        loss = loss + float(cfg["mse_weight"]) * parts["mse"]
    if lpips_net is not None:
        parts["lpips"] = lpips_net(((rec.clamp(-1, 1) + 1) / 2), (x.clamp(-1, 1) + 1) / 2).mean()
        loss = loss + float(cfg["lpips_weight"]) * parts["lpips"]
    if ae.quantized:
        loss = loss + float(cfg["codebook_weight"]) * (parts["codebook"] + float(cfg["commitment"]) * parts["commit"])
    return loss, {k: float(v.detach()) for k, v in parts.items()}, rec, idx


def restart_codes(ae: nn.Module, usage: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
    """Move never-used codebook entries onto random recent encoder outputs (keeps the codebook alive)."""
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0:
        return 0
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)
    with torch.no_grad():
        ae.quantize.embedding.weight[dead] = flat[pick] + 0.01 * flat.std() * torch.randn(
            dead.numel(), flat.shape[1], generator=gen).to(flat.device)
    return int(dead.numel())


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (LDM's NLayerDiscriminator in miniature) for the optional adversarial loss."""

    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 4, 4, 1, 1), nn.GroupNorm(8, width * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 4, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def decoder_parameters(ae: nn.Module) -> list[nn.Parameter]:
    """Freeze the autoencoder but its decoder (and post-quant conv); return those parameters.

    Encoder, quant conv and codebook stay fixed, so every latent the denoiser learned keeps its meaning."""
    ae.requires_grad_(False)
    trainable = [*ae.decoder.parameters(), *ae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def autoencoder_stage(name: str, section: Mapping[str, Any], seed: int, ae: nn.Module, samples: Samples,
                      device: torch.device) -> Stage:
    """The autoencoder (name 'autoencoder') or its decoder alone (name 'decoder')."""
    decoder_only = name == "decoder"
    ae.to(device).train()
    params = decoder_parameters(ae) if decoder_only else list(ae.parameters())
    lpips_net = LPIPS().to(device) if float(section.get("lpips_weight") or 0) > 0 else None
    disc = PatchDiscriminator().to(device) if float(section["adversarial_weight"]) > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(section["lr"]), betas=tuple(section["betas"])) \
        if disc is not None else None
    restart_every = int(section.get("restart_codes_every") or 0) if ae.quantized and not decoder_only else 0
    usage = torch.zeros(ae.quantize.embedding.weight.shape[0], dtype=torch.long, device=device) \
        if restart_every else None
    last: dict[str, torch.Tensor] = {}

    def batch(step: int) -> torch.Tensor:
        return random_crops(samples, step, int(section["batch_size"]), int(section["crop"]), seed,
                            float(section.get("lq_fraction") or 0)).to(device)

    if usage is not None:
        with torch.no_grad():  # start the codebook on encoder outputs: random codes far from them would all die
            restart_codes(ae, usage, ae.encode(batch(0)), step_generator(seed, 0, 2))

    def loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch(step)
        total, parts, rec, idx = autoencoder_losses(ae, x, lpips_net, section)
        if disc is not None and step >= int(section["adversarial_start"]):
            g_adv = -disc(rec).mean()
            total = total + float(section["adversarial_weight"]) * g_adv
            parts["g_adv"] = float(g_adv.detach())
        last.update(x=x, rec=rec.detach())
        if usage is not None and idx is not None:
            usage.add_(torch.bincount(idx.flatten(), minlength=usage.numel()))
        return total, parts

    def after_step(step: int) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        if disc is not None and step - 1 >= int(section["adversarial_start"]):
            d_loss = F.relu(1 - disc(last["x"])).mean() + F.relu(1 + disc(last["rec"])).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["d_loss"] = float(d_loss)
        if usage is not None and step % restart_every == 0:
            with torch.no_grad():
                z = ae.encode(last["x"])
            parts["codes_used"] = int((usage > 0).sum())
            parts["codes_restarted"] = restart_codes(ae, usage, z, step_generator(seed, step, 2))
            usage.zero_()
        return parts

    extra = {}
    if disc is not None:
        extra = {"discriminator": (disc.state_dict, disc.load_state_dict),
                 "optimizer_d": (opt_d.state_dict, opt_d.load_state_dict)}
    return Stage(name, section, {"model": ae}, params, loss, after_step, extra=extra)


# ------------------------------------------------------------------------------------- denoiser


@torch.no_grad()
def encode_items(ae: nn.Module, items: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    lq = torch.stack([it["lq"] for it in items]).to(device)
    gt = torch.stack([it["gt"] for it in items]).to(device)
    return {"lq": lq.cpu(), "x0": ae.encode(gt).cpu(), "y": ae.encode(upsample_lq(lq, 4)).cpu()}


def latent_pool(ae: nn.Module, samples: Samples, size: int, device: torch.device, chunk: int = 16,
                progress: Progress | None = None, path: Path | None = None) -> dict[str, torch.Tensor]:
    """Samples 0..size-1 with their latents x0 = E(gt), y = E(bicubic(lq)) (frozen E). Kept at `path`
    (keyed by the encoder's weights), so a resumed run does not encode them again."""
    import hashlib

    from .bundle import state_digest
    from .folders import atomic_write

    data = hashlib.sha256(samples.lq.numpy().tobytes()).hexdigest() if isinstance(samples, SamplePool) else None
    key = {"size": size, "encoder": state_digest(ae.encoder, ae.quant_conv), "samples": data}
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            return saved["latents"]
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, size, chunk):
        parts.append(encode_items(ae, [samples[i] for i in range(start, min(size, start + chunk))], device))
        if progress:
            progress("pool", min(size, start + chunk), size, {})
    latents = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if path is not None:
        with atomic_write(path) as tmp:
            torch.save({"key": key, "latents": latents}, tmp)
    return latents


def mixed_precision(device: torch.device, enabled: bool) -> tuple[Any, Any]:
    if not enabled or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


@dataclass
class Denoiser:
    """The denoiser stage and its EMA copy (the weights a bundle ships)."""

    stage: Stage
    ema: nn.Module


def denoiser_stage(section: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int, unet: nn.Module,
                   ae: nn.Module, samples: Samples, device: torch.device, validate: Any = None,
                   progress: Progress | None = None, cache: Path | None = None) -> Denoiser:
    schedule = Schedule.from_config(model_cfg.get("diffusion"))
    ae.to(device).eval().requires_grad_(False)
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    bs = int(section["batch_size"])
    accum = int(section.get("grad_accum") or 1)
    pool = latent_pool(ae, samples, len(samples), device, progress=progress, path=cache) \
        if isinstance(samples, SamplePool) else None
    denoise = unet_denoiser(unet)
    autocast, scaler = mixed_precision(device, bool(section.get("amp")))

    def loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(seed, step, 10 + micro)
        if pool is not None:
            idx = torch.randint(0, pool["x0"].shape[0], (bs,), generator=gen)
            batch = {k: v[idx].to(device) for k, v in pool.items()}
        else:
            start = (step * accum + micro) * bs
            batch = {k: v.to(device) for k, v in encode_items(ae, [samples[i] for i in range(start, start + bs)],
                                                               device).items()}
        t = torch.randint(0, schedule.steps, (bs,), generator=gen).to(device)
        noise = torch.randn(batch["x0"].shape, generator=gen).to(device)
        return training_loss(denoise, batch["x0"], batch["y"], batch["lq"], schedule, t=t, noise=noise), {}

    def after_step(step: int) -> None:
        ema_update(ema, unet, float(section["ema_decay"]) if step > 10 else 0.0)  # EMA starts as a copy

    stage = Stage("denoiser", section, {"model": unet, "ema": ema}, list(unet.parameters()), loss, after_step,
                  validate=validate, autocast=autocast, scaler=scaler)
    return Denoiser(stage, ema)


def validate(unet: nn.Module, ae: nn.Module, config: Mapping[str, Any], dataset: SampleDataset, windows: int,
             seed: int = 0, options: Any = None) -> dict[str, float]:
    """Validation windows through the shipped inference path (each window a series of its own, no
    temporal step), model vs bicubic, on the middle frame."""
    from .baseline import bicubic_up
    from .bundle import ModelBundle
    from .evaluate import score_frames
    from .inference import TorchRunner
    from .pipeline import Options, superresolve_slices

    opts = (options or Options()).with_(temporal=1, stride=3)
    bundle = ModelBundle(path=None, config=dict(config), unet=unet, autoencoder=ae)
    runner = TorchRunner(bundle, opts.steps, opts.sampler, opts.temperature)
    was_training = unet.training
    unet.eval()
    lqs, gts, outs = [], [], []
    for i in range(windows):
        item = dataset[int(np.random.default_rng([seed, 7, i]).integers(1 << 30))]
        lq, gt = item["lq"].numpy(), item["gt"].numpy()
        outs.append(superresolve_slices([lq], runner, opts).frames[0][1])
        lqs.append(lq[1])
        gts.append(gt[1])
    unet.train(was_training)

    def unit(x: np.ndarray) -> np.ndarray:  # model units -> [0, 1] for the metrics
        return np.clip((np.asarray(x) + 1) / 2, 0, 1)

    model_scores = score_frames(unit(np.stack(outs)), unit(np.stack(gts)))
    base_scores = score_frames(unit(bicubic_up(np.stack(lqs))), unit(np.stack(gts)))
    v = {**{f"val_{k}": s for k, s in model_scores.items()}, **{f"val_baseline_{k}": s for k, s in base_scores.items()}}
    v["val_score"] = (v["val_psnr"] / v["val_baseline_psnr"] - 1 + v["val_ssim"] / v["val_baseline_ssim"] - 1
                      + 1 - v["val_lpips"] / max(v["val_baseline_lpips"], 1e-9))
    return v


# --------------------------------------------------------------------------------------- refine


@torch.no_grad()
def sampled_pool(unet: nn.Module, ae: nn.Module, model_cfg: Mapping[str, Any], samples: Samples, size: int,
                 seed: int, device: torch.device, options: Any = None, chunk: int = 8,
                 progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Samples 0..size-1 with the sampler's final latents for them (`z`, as inference makes them: the
    shipped sampler options, one noise stream per sample) and their truth (`gt`, float16)."""
    from .bundle import ModelBundle
    from .diffusion import draw_noise
    from .inference import TorchRunner
    from .pipeline import Options

    o = options or Options()
    runner = TorchRunner(ModelBundle(path=None, config=dict(model_cfg), unet=unet.to(device).eval(),
                                     autoencoder=ae.to(device).eval()), o.steps, o.sampler, o.temperature)
    g = runner.geometry
    zs, gts = [], []
    for start in range(0, size, chunk):
        items = [samples[i] for i in range(start, min(size, start + chunk))]
        lq = torch.stack([it["lq"] for it in items])
        noise = torch.cat([draw_noise((1, g.latent_channels, g.latent_size, g.latent_size), runner.plan.steps,
                                      torch.Generator().manual_seed(seed * 1_000_003 + start + j))
                           for j in range(len(items))], dim=1)
        zs.append(runner.latents(lq, noise).float().cpu())
        gts.append(torch.stack([it["gt"] for it in items]).half())
        if progress:
            progress("sampled pool", min(size, start + chunk), size, {})
    return {"z": torch.cat(zs), "gt": torch.cat(gts)}


def refine_crops(pool: Mapping[str, torch.Tensor], gen: torch.Generator, batch: int, crop: int, scale: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random aligned crops: latents (batch, C, crop/scale, crop/scale) and truth (batch, 3, crop, crop)."""
    c = max(1, crop // scale)
    h, w = pool["z"].shape[-2:]
    zs, gts = [], []
    for i in torch.randint(0, pool["z"].shape[0], (batch,), generator=gen).tolist():
        top = int(torch.randint(0, h - c + 1, (), generator=gen)) if h > c else 0
        left = int(torch.randint(0, w - c + 1, (), generator=gen)) if w > c else 0
        zs.append(pool["z"][i, :, top : top + c, left : left + c])
        gts.append(pool["gt"][i, :, top * scale : (top + c) * scale, left * scale : (left + c) * scale].float())
    return torch.stack(zs), torch.stack(gts)


def refine_stage(section: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int, ae: nn.Module,
                 pool: Mapping[str, torch.Tensor], device: torch.device) -> Stage:
    """The decoder (and post-quant conv) on (sampled latents -> truth); all else frozen."""
    scale = int((model_cfg.get("diffusion") or {}).get("sf", 4))
    ae.to(device).train()
    params = decoder_parameters(ae)
    lpips_net = LPIPS().to(device) if float(section["lpips_weight"]) > 0 else None

    def loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        z, gt = refine_crops(pool, step_generator(seed, step, 3), int(section["batch_size"]), int(section["crop"]),
                             scale)
        z, gt = z.to(device), gt.to(device)
        rec = ae.decode(z)  # quantises as inference does (when there is a codebook); only the decoder learns
        l1, mse = (rec - gt).abs().mean(), F.mse_loss(rec, gt)
        total = float(section["l1_weight"]) * l1 + float(section["mse_weight"]) * mse
        parts = {"l1": float(l1.detach()), "mse": float(mse.detach())}
        if lpips_net is not None:
            perceptual = lpips_net((rec.clamp(-1, 1) + 1) / 2, (gt.clamp(-1, 1) + 1) / 2).mean()
            total = total + float(section["lpips_weight"]) * perceptual
            parts["lpips"] = float(perceptual.detach())
        return total, parts

    return Stage("refine", section, {"model": ae}, params, loss)


# -------------------------------------------------------------------------------------- distill

STUDENT_STEPS = (1, 2, 4)


def student_timesteps(schedule: Schedule, steps: tuple[int, ...] = STUDENT_STEPS) -> tuple[int, ...]:
    """The step indices at which the student runs for those step counts (each plan's respaced steps)."""
    from .diffusion import SamplerPlan

    return tuple(sorted({t for k in steps for t in SamplerPlan.from_schedule(schedule, k, "ddim").timesteps},
                        reverse=True))


@torch.no_grad()
def teacher_pool(unet: nn.Module, ae: nn.Module, model_cfg: Mapping[str, Any], samples: Samples, size: int,
                 seed: int, device: torch.device, temperature: float = 1.0, chunk: int = 8,
                 progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """What the student learns from: per sample the lq frames, the true latent x0 = E(gt), and the
    teacher's deterministic (ddim) 15-step chain from its start: its states at the student's step
    indices (`x<t>`) and its final latent (`z`). float16 where large."""
    from .diffusion import SamplerPlan, draw_noise, run_plan

    schedule = Schedule.from_config(model_cfg.get("diffusion"))
    plan = SamplerPlan.from_schedule(schedule, None, "ddim", temperature)
    wanted = set(student_timesteps(schedule))
    unet = unet.to(device).eval()
    ae = ae.to(device).eval()
    out: dict[str, list[torch.Tensor]] = {"lq": [], "x0": [], "z": [], **{f"x{t}": [] for t in wanted}}
    for start in range(0, size, chunk):
        items = [samples[i] for i in range(start, min(size, start + chunk))]
        lq = torch.stack([it["lq"] for it in items]).to(device)
        y = ae.encode(upsample_lq(lq, 4))
        states: dict[int, torch.Tensor] = {}

        def denoise(x_scaled: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    states: dict[int, torch.Tensor] = states) -> torch.Tensor:
            step = int(t[0])
            if step in wanted:  # the state the chain is in at this step (unscaled)
                states[step] = x_scaled / plan.c_in[plan.timesteps.index(step)]
            return unet(x_scaled, t, lq=cond).float()

        noise = draw_noise(tuple(y.shape), plan.steps, torch.Generator().manual_seed(seed * 1_000_003 + start))
        z = run_plan(denoise, y, lq, plan, noise.to(device))
        out["lq"].append(lq.cpu().half())
        out["x0"].append(ae.encode(torch.stack([it["gt"] for it in items]).to(device)).cpu())
        out["z"].append(z.cpu())
        for t in wanted:
            out[f"x{t}"].append(states[t].cpu())
        if progress:
            progress("teacher pool", min(size, start + chunk), size, {})
    return {k: torch.cat(v) for k, v in out.items()}


def distill_stage(section: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int, student: nn.Module,
                  pool: Mapping[str, torch.Tensor], device: torch.device) -> Stage:
    """The student (initialised as the teacher) learns the teacher's whole deterministic chain in one x0
    prediction from any of its step indices: MSE to the teacher's final latent, plus `gt_weight` x MSE to
    the true latent (the truth supervising the student, after SinSR's consistency loss; 0 by default: the
    tiny student lost SSIM with it), half of the batches at the first step."""
    schedule = Schedule.from_config(model_cfg.get("diffusion"))
    steps = student_timesteps(schedule)
    student.to(device).train()
    bs, gt_weight = int(section["batch_size"]), float(section.get("gt_weight") or 0.0)

    def loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(seed, step, 20 + micro)
        idx = torch.randint(0, pool["z"].shape[0], (bs,), generator=gen)
        first = torch.rand(bs, generator=gen) < 0.5
        pick = torch.randint(0, len(steps), (bs,), generator=gen)
        t = torch.where(first, torch.full_like(pick, steps[0]), torch.tensor(steps)[pick])
        x_t = torch.stack([pool[f"x{int(ti)}"][i] for ti, i in zip(t.tolist(), idx.tolist(), strict=True)])
        c_in = 1.0 / torch.sqrt(schedule.etas.float()[t] * schedule.kappa**2 + 1)
        pred = student((x_t.float() * c_in.view(-1, 1, 1, 1)).to(device), t.to(device),
                       lq=pool["lq"][idx].float().to(device))
        teacher = F.mse_loss(pred, pool["z"][idx].float().to(device))
        truth = F.mse_loss(pred, pool["x0"][idx].float().to(device))
        return teacher + gt_weight * truth, {"teacher_mse": float(teacher.detach()), "gt_mse": float(truth.detach())}

    return Stage("distill", section, {"model": student}, list(student.parameters()), loss)
