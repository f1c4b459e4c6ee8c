"""Training: the VQGAN autoencoder, then the Swin-UNet denoiser with the autoencoder frozen.

`train(config, out_dir, stage=...)` runs one or both stages from a training config (YAML in
`model/configs/train/`, by name or path). Everything is seeded: batch b of step s is a pure
function of (seed, s), so a resumed run continues the same sequence.

    out_dir/checkpoints/<stage>.pt                  resumable state (weights, EMA, optimiser, step)
    out_dir/logs/<stage>.jsonl                      one JSON object per logged step (plot: model.plots)
    out_dir/bundle/                                 the model bundle (latest), out_dir/bundle-best/ (best val)

Autoencoder loss: L1 + LPIPS reconstruction, VQ codebook + commitment, optionally a PatchGAN hinge
loss; unused codes are restarted from recent encoder outputs. Denoiser: ResShift's x0-MSE on
latents of paper-style samples (see model.samples), Adam, gradient accumulation, EMA, AMP on CUDA.
Optional last stages fine-tune the decoder alone: on encoder outputs ('decoder') and on the
latents the trained sampler produces ('refine', L1 + MSE + a little LPIPS against the truth).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import bundle as bundle_io
from .checkpoint import extract_state_dict, load_into, read_checkpoint, select_prefix
from .configs import load_config
from .datasets import SampleDataset, open_source
from .degrade import DegradationConfig
from .diffusion import Schedule, training_loss, unet_denoiser, upsample_lq
from .errors import InputError
from .metrics import LPIPS

TRAIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "train"
STAGES = ("autoencoder", "denoiser", "decoder", "refine", "both")

Progress = Callable[[str, int, int, dict], None]  # (stage, step, total steps, latest metrics)

DEFAULTS: dict[str, Any] = {
    "name": None,
    "model": "tiny",
    "seed": 0,
    "device": "auto",
    "threads": 0,
    "data": {"source": "phantom:0-99", "split": "train", "degradation": {"kind": "realesrgan"},
             "val_source": None, "val_split": "val", "cache_patients": 128, "pool": 0, "phantom": {}},
    "autoencoder": {"steps": 1000, "batch_size": 8, "crop": 128, "lr": 2e-4, "betas": [0.5, 0.9],
                    "l1_weight": 1.0, "lpips_weight": 1.0, "codebook_weight": 1.0, "commitment": 0.25,
                    "lq_fraction": 0.25, "adversarial_weight": 0.0, "adversarial_start": 0,
                    "restart_codes_every": 100, "log_every": 10, "checkpoint_every": 200},
    # optional last stage: fine-tune the VQGAN decoder alone (encoder and codebook frozen, so the
    # latents the denoiser learned stay valid)
    "decoder": {"steps": 0, "batch_size": 8, "crop": 128, "lr": 1e-4, "betas": [0.5, 0.9],
                "l1_weight": 1.0, "lpips_weight": 1.0, "codebook_weight": 0.0, "commitment": 0.0,
                "lq_fraction": 0.0, "adversarial_weight": 0.0, "adversarial_start": 0,
                "restart_codes_every": 0, "log_every": 10, "checkpoint_every": 200},
    "denoiser": {"steps": 2000, "batch_size": 8, "grad_accum": 1, "lr": 5e-5, "warmup": 0,
                 "ema_decay": 0.999, "amp": True, "log_every": 10, "checkpoint_every": 250,
                 "val_every": 250, "val_windows": 8},
    # optional very last stage: the decoder alone again, now on the latents the trained denoiser's
    # sampler produces (not on encoder outputs), with a fidelity loss. The autoencoder stages teach
    # the decoder to reproduce textures from clean codes; the sampler's latents are noisier than
    # those, and decoding them as if they were exact costs PSNR/SSIM. Encoder, codebook and UNet
    # stay as they are, so the bundle's graphs and their shapes do not change.
    "refine": {"steps": 0, "pool": 512, "batch_size": 8, "crop": 96, "lr": 1e-4, "lr_end": None, "l1_weight": 1.0,
               "mse_weight": 1.0, "lpips_weight": 0.1, "log_every": 10, "checkpoint_every": 250},
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_train_config(name_or_path: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A training config: bundled name ('tiny', 'base'), YAML path or dict; merged over DEFAULTS."""
    if isinstance(name_or_path, Mapping):
        raw = dict(name_or_path)
    else:
        path = TRAIN_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            path = Path(name_or_path)
        if not path.is_file():
            bundled = ", ".join(sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.yaml")))
            raise InputError(f"unknown training config {name_or_path!r} (bundled: {bundled}, or a .yaml path)")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    cfg = _merge(DEFAULTS, raw)
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise InputError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    cfg["name"] = cfg["name"] or (cfg["model"] if isinstance(cfg["model"], str) else "model")
    return cfg


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The RNG of one step: a pure function of (seed, step, stream), so resume repeats the sequence."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % 2**63)


class _JsonlLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _datasets(cfg: Mapping[str, Any]) -> tuple[SampleDataset, SampleDataset | None]:
    data = cfg["data"]
    degradation = DegradationConfig.from_dict(dict(data.get("degradation") or {}))
    phantom = dict(data.get("phantom") or {})  # slices/frames/size of on-the-fly phantoms
    source = open_source(data["source"], **phantom)
    train = SampleDataset(source, data.get("split", "train"), degradation, seed=int(cfg["seed"]),
                          cache_patients=int(data.get("cache_patients", 128)))
    val_source = open_source(data["val_source"], **phantom) if data.get("val_source") else source
    try:
        val = SampleDataset(val_source, data.get("val_split", "val"), degradation, seed=int(cfg["seed"]) + 1,
                            cache_patients=16)
    except InputError:
        val = None  # too few patients for a validation split: train without validation
    return train, val


class SamplePool:
    """A fixed set of samples 0..N-1 of a dataset held in memory (float16), built once per run.

    CPU training cannot afford flow interpolation, degradation and phantom rendering at every step;
    with `data.pool: N` both stages draw from these N samples (the autoencoder takes random crops).
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
        key = {"size": size, "seed": dataset.seed, "source": dataset.source.describe(),
               "patients": dataset.patients, "degradation": dataset.degradation.to_dict()}
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if saved.get("key") == json.loads(json.dumps(key)):
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
            tmp = path.with_suffix(".tmp")
            torch.save({"key": json.loads(json.dumps(key)), "lq": pool.lq, "gt": pool.gt}, tmp)
            tmp.replace(path)
        return pool


# ------------------------------------------------------------------------------------------ init


def apply_init(init_from: str | Path | Sequence[str | Path] | None, unet: nn.Module | None,
               autoencoder: nn.Module | None) -> list[str]:
    """Load weights from a bundle folder or ResShift/LDM checkpoint files into the matching networks.

    Each file is tried against the UNet and the autoencoder (after stripping a `model.`/`unet.`/
    `autoencoder.` style prefix); it must fit at least one. Returns what was loaded, for the log.
    """
    if init_from is None:
        return []
    items = [init_from] if isinstance(init_from, (str, Path)) else list(init_from)
    loaded: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            b = bundle_io.load_bundle(path)
            if unet is not None:
                unet.load_state_dict(b.unet.state_dict())
            if autoencoder is not None:
                autoencoder.load_state_dict(b.autoencoder.state_dict())
            loaded.append(f"bundle {path}")
            continue
        state = extract_state_dict(read_checkpoint(path), source=str(path))
        errors = []
        fitted = False
        for label, module, prefixes in (("unet", unet, ("unet.", "model.")),
                                        ("autoencoder", autoencoder, ("autoencoder.", "first_stage_model."))):
            if module is None:
                continue
            for prefix in (*prefixes, ""):
                candidate = select_prefix(state, prefix) if prefix else state
                try:
                    load_into(module, candidate, source=str(path))
                except ValueError as exc:
                    errors.append(str(exc))
                    continue
                loaded.append(f"{label} <- {path}")
                fitted = True
                break
        if not fitted:
            raise InputError(f"fits neither the UNet nor the autoencoder: {errors[0] if errors else ''}", path)
    return loaded


# ---------------------------------------------------------------------------------- autoencoder


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


def autoencoder_losses(ae: nn.Module, x: torch.Tensor, lpips_net: nn.Module, cfg: Mapping[str, Any]
                       ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    """Reconstruction + VQ losses of a batch in [-1, 1]; returns (loss, parts, reconstruction, code indices)."""
    z = ae.encode(x)
    idx = ae.quantize.indices(z)
    zq = ae.quantize.embedding(idx).permute(0, 3, 1, 2)
    codebook = F.mse_loss(zq, z.detach())
    commit = F.mse_loss(z, zq.detach())
    rec = ae.decode(z + (zq - z).detach(), quantize=False)  # straight-through estimator
    l1 = (rec - x).abs().mean()
    perceptual = lpips_net((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).mean()
    loss = (cfg["l1_weight"] * l1 + cfg["lpips_weight"] * perceptual
            + cfg["codebook_weight"] * (codebook + cfg["commitment"] * commit))
    parts = {k: float(v.detach()) for k, v in
             (("l1", l1), ("lpips", perceptual), ("codebook", codebook), ("commit", commit))}
    return loss, parts, rec, idx


def _restart_codes(ae: nn.Module, usage: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
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


def _ae_batch(dataset: SampleDataset | SamplePool, step: int, cfg: Mapping[str, Any], seed: int) -> torch.Tensor:
    """Random crops of ground-truth frames, some of them bicubic-upsampled inputs (what y encodes)."""
    n, crop = int(cfg["batch_size"]), int(cfg["crop"])
    gen = _step_generator(seed, step, 1)
    images = []
    for j in range(n):
        if isinstance(dataset, SamplePool):
            item = dataset[int(torch.randint(0, len(dataset), (), generator=gen))]
        else:
            item = dataset[step * n + j]
        img = item["gt"]
        if float(torch.rand((), generator=gen)) < float(cfg.get("lq_fraction", 0.0)):
            img = upsample_lq(item["lq"][None], 4)[0].clamp(-1, 1)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (), generator=gen)) if h > crop else 0
        left = int(torch.randint(0, w - crop + 1, (), generator=gen)) if w > crop else 0
        img = img[:, top : top + crop, left : left + crop]
        if float(torch.rand((), generator=gen)) < 0.5:
            img = img.flip(-1)
        images.append(img)
    return torch.stack(images)


def _decoder_only(ae: nn.Module) -> list[nn.Parameter]:
    """Freeze the autoencoder but its decoder (and post-quant conv); return those parameters.

    Encoder, quant conv and codebook stay fixed, so every latent the denoiser learned keeps its meaning."""
    ae.requires_grad_(False)
    trainable = [*ae.decoder.parameters(), *ae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def train_autoencoder(cfg: Mapping[str, Any], out_dir: Path, ae: nn.Module, dataset: SampleDataset | SamplePool,
                      device: torch.device, resume: bool, progress: Progress | None,
                      decoder_only: bool = False) -> dict[str, Any]:
    """Train the VQGAN (or, decoder_only, fine-tune its decoder with encoder and codebook frozen)."""
    name = "decoder" if decoder_only else "autoencoder"
    c = cfg[name]
    seed = int(cfg["seed"]) + (17 if decoder_only else 0)
    ckpt_path = out_dir / "checkpoints" / f"{name}.pt"
    log = _JsonlLog(out_dir / "logs" / f"{name}.jsonl")
    ae.to(device).train()
    lpips_net = LPIPS().to(device)
    if decoder_only:
        trainable = _decoder_only(ae)
    else:
        trainable = list(ae.parameters())
    opt = torch.optim.Adam(trainable, lr=float(c["lr"]), betas=tuple(c["betas"]))
    use_adv = float(c["adversarial_weight"]) > 0
    disc = PatchDiscriminator().to(device) if use_adv else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(c["lr"]), betas=tuple(c["betas"])) if disc else None
    step, wall = 0, 0.0
    state = _load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None and "discriminator" in state:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["optimizer_d"])
        step, wall = int(state["step"]), float(state["wall_time_s"])
    total = int(c["steps"])
    usage = torch.zeros(ae.quantize.embedding.weight.shape[0], dtype=torch.long, device=device)
    t0, last_t, last_step = time.monotonic(), time.monotonic(), step
    if step == 0 and state is None and int(c["restart_codes_every"]):
        # start the codebook on encoder outputs: random codes far from them would all be dead
        with torch.no_grad():
            _restart_codes(ae, usage, ae.encode(_ae_batch(dataset, 0, c, seed).to(device)),
                           _step_generator(seed, 0, 2))
    while step < total:
        x = _ae_batch(dataset, step, c, seed).to(device)
        loss, parts, rec, idx = autoencoder_losses(ae, x, lpips_net, c)
        if disc is not None and step >= int(c["adversarial_start"]):
            g_adv = -disc(rec).mean()
            loss = loss + float(c["adversarial_weight"]) * g_adv
            parts["g_adv"] = float(g_adv.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= int(c["adversarial_start"]):
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["d_loss"] = float(d_loss)
        usage += torch.bincount(idx.flatten(), minlength=usage.numel())
        step += 1
        every = int(c["restart_codes_every"])
        if every and step % every == 0:
            with torch.no_grad():
                z = ae.encode(x)
            parts["codes_used"] = int((usage > 0).sum())
            parts["codes_restarted"] = _restart_codes(ae, usage, z, _step_generator(seed, step, 2))
            usage.zero_()
        if step % int(c["log_every"]) == 0 or step == total:
            now = time.monotonic()
            record = {"stage": name, "step": step, "loss": float(loss.detach()), **parts,
                      "lr": opt.param_groups[0]["lr"], "wall_time_s": round(wall + now - t0, 2),
                      "steps_per_s": round((step - last_step) / max(now - last_t, 1e-9), 4)}
            log.write(record)
            last_t, last_step = now, step
            if progress:
                progress(name, step, total, record)
        if step % int(c["checkpoint_every"]) == 0 or step == total:
            st = {"step": step, "wall_time_s": wall + time.monotonic() - t0, "model": ae.state_dict(),
                  "optimizer": opt.state_dict()}
            if disc is not None:
                st["discriminator"], st["optimizer_d"] = disc.state_dict(), opt_d.state_dict()
            _save_checkpoint(ckpt_path, st)
    ae.eval().requires_grad_(True)
    return {"steps": step, "wall_time_s": round(wall + time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------- denoiser


@torch.no_grad()
def _encode_items(ae: nn.Module, items: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    lq = torch.stack([it["lq"] for it in items]).to(device)
    gt = torch.stack([it["gt"] for it in items]).to(device)
    return {"lq": lq.cpu(), "x0": ae.encode(gt).cpu(), "y": ae.encode(upsample_lq(lq, 4)).cpu()}


def build_latent_pool(ae: nn.Module, dataset: SampleDataset | SamplePool, size: int, device: torch.device,
                      chunk: int = 16, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Samples 0..size-1 of the dataset with their latents x0 = E(gt), y = E(bicubic(lq)) (frozen E)."""
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, size, chunk):
        items = [dataset[i] for i in range(start, min(size, start + chunk))]
        parts.append(_encode_items(ae, items, device))
        if progress:
            progress("pool", min(size, start + chunk), size, {})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _amp(device: torch.device, enabled: bool) -> tuple[torch.autocast | None, torch.amp.GradScaler | None]:
    if not enabled or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def validate(unet: nn.Module, ae: nn.Module, config: Mapping[str, Any], dataset: SampleDataset,
             windows: int, seed: int = 0) -> dict[str, float]:
    """Paper protocol on `windows` validation samples (middle window, middle frame): model vs bicubic."""
    from .evaluate import score_frames
    from .inference import superresolve_windows
    from .samples import MIDDLE_WINDOW, sample_from_slice

    b = bundle_io.ModelBundle(path=None, config=dict(config), unet=unet, autoencoder=ae)
    lqs, gts = [], []
    for i in range(windows):
        rng = np.random.default_rng([seed, 7, i])
        patient = dataset.patients[i % len(dataset.patients)]
        slices = dataset.cache.get(patient)
        s = sample_from_slice(slices[int(rng.integers(len(slices)))].astype(np.float32), rng,
                              dataset.degradation, window_start=MIDDLE_WINDOW)
        lqs.append(s.lq)
        gts.append(s.gt[1])
    was_training = unet.training
    unet.eval()
    out = superresolve_windows(b, np.stack(lqs), seed=seed)
    unet.train(was_training)
    from .baseline import bicubic_up

    base = np.clip(bicubic_up(np.stack(lqs)[:, 1]), 0, 1)
    model_scores = score_frames(out[:, 1], np.stack(gts))
    base_scores = score_frames(base, np.stack(gts))
    return {**{f"val_{k}": v for k, v in model_scores.items()},
            **{f"val_baseline_{k}": v for k, v in base_scores.items()}}


def _val_score(v: Mapping[str, float]) -> float:
    """Sum of relative gains over the baseline (PSNR, SSIM up; LPIPS down): higher is better."""
    return (v["val_psnr"] / v["val_baseline_psnr"] - 1 + v["val_ssim"] / v["val_baseline_ssim"] - 1
            + 1 - v["val_lpips"] / max(v["val_baseline_lpips"], 1e-9))


def train_denoiser(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], out_dir: Path, unet: nn.Module,
                   ae: nn.Module, dataset: SampleDataset, val: SampleDataset | None, device: torch.device,
                   samples: SamplePool | None,
                   resume: bool, progress: Progress | None, record: dict[str, Any]) -> dict[str, Any]:
    c = cfg["denoiser"]
    seed = int(cfg["seed"])
    schedule = Schedule.from_config(model_cfg.get("diffusion"))
    ckpt_path = out_dir / "checkpoints" / "denoiser.pt"
    log = _JsonlLog(out_dir / "logs" / "denoiser.jsonl")
    ae.to(device).eval().requires_grad_(False)
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=float(c["lr"]))
    autocast, scaler = _amp(device, bool(c["amp"]))
    step, wall, best = 0, 0.0, -math.inf
    state = _load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, wall, best = int(state["step"]), float(state["wall_time_s"]), float(state.get("best", -math.inf))
    total, accum, bs = int(c["steps"]), int(c["grad_accum"]), int(c["batch_size"])
    pool = None
    if samples is not None and step < total:
        pool = build_latent_pool(ae, samples, len(samples), device, progress=progress)
    denoise = unet_denoiser(unet)
    t0, last_t, last_step = time.monotonic(), time.monotonic(), step
    while step < total:
        lr = float(c["lr"]) * min(1.0, (step + 1) / max(1, int(c["warmup"]))) if int(c["warmup"]) else float(c["lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            gen = _step_generator(seed, step, 10 + micro)
            if pool is not None:
                idx = torch.randint(0, pool["x0"].shape[0], (bs,), generator=gen)
                batch = {k: v[idx].to(device) for k, v in pool.items()}
            else:
                start = (step * accum + micro) * bs
                batch = {k: v.to(device) for k, v in _encode_items(
                    ae, [dataset[i] for i in range(start, start + bs)], device).items()}
            t = torch.randint(0, schedule.steps, (bs,), generator=gen).to(device)
            noise = torch.randn(batch["x0"].shape, generator=gen).to(device)
            if autocast is not None:
                with autocast:
                    loss = training_loss(denoise, batch["x0"], batch["y"], batch["lq"], schedule, t=t, noise=noise)
            else:
                loss = training_loss(denoise, batch["x0"], batch["y"], batch["lq"], schedule, t=t, noise=noise)
            scaled = loss.float() / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            losses.append(float(loss.detach()))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        _ema_update(ema, unet, float(c["ema_decay"]) if step >= 10 else 0.0)  # EMA starts as a copy
        step += 1
        rec: dict[str, Any] = {}
        if step % int(c["log_every"]) == 0 or step == total:
            now = time.monotonic()
            rec = {"stage": "denoiser", "step": step, "loss": float(np.mean(losses)), "lr": lr,
                   "wall_time_s": round(wall + now - t0, 2),
                   "steps_per_s": round((step - last_step) / max(now - last_t, 1e-9), 4)}
            last_t, last_step = now, step
        is_ckpt = step % int(c["checkpoint_every"]) == 0 or step == total
        if val is not None and int(c["val_every"]) and (step % int(c["val_every"]) == 0 or step == total):
            v = validate(ema, ae, model_cfg, val, int(c["val_windows"]), seed=seed)
            rec = {**(rec or {"stage": "denoiser", "step": step}), **v, "val_score": _val_score(v)}
            if _val_score(v) > best:
                best = _val_score(v)
                _write_bundle(out_dir / "bundle-best", ema, ae, model_cfg, cfg, record,
                              {"denoiser_steps": step, "val": v}, wall + time.monotonic() - t0)
        if rec:
            log.write(rec)
            if progress:
                progress("denoiser", step, total, rec)
        if is_ckpt:
            elapsed = wall + time.monotonic() - t0
            _save_checkpoint(ckpt_path, {"step": step, "wall_time_s": elapsed, "model": unet.state_dict(),
                                         "ema": ema.state_dict(), "optimizer": opt.state_dict(), "best": best})
            _write_bundle(out_dir / "bundle", ema, ae, model_cfg, cfg, record, {"denoiser_steps": step}, elapsed)
    unet.load_state_dict(ema.state_dict())  # the caller gets the EMA weights
    return {"steps": step, "wall_time_s": round(wall + time.monotonic() - t0, 1)}


STAGE_KEYS = ("autoencoder", "denoiser", "decoder", "refine")


def _set_stage(record: dict[str, Any], history: Mapping[str, Any], name: str, result: dict[str, Any]) -> None:
    """record[name] = result; the same stage of the bundle this run continues is kept in `earlier`
    (newest first), so a bundle's record says every step its weights went through."""
    old = history.get(name)
    if old:
        result = {**result, "earlier": [{k: v for k, v in old.items() if k != "earlier"}, *old.get("earlier", [])]}
    record[name] = result


def _stage_wall(stage: Mapping[str, Any]) -> float:
    """Seconds a stage took, with its earlier runs."""
    return float(stage.get("wall_time_s") or 0) + sum(float(e.get("wall_time_s") or 0)
                                                      for e in stage.get("earlier", []))


def _write_bundle(path: Path, unet: nn.Module, ae: nn.Module, model_cfg: Mapping[str, Any],
                  cfg: Mapping[str, Any], record: Mapping[str, Any], extra: Mapping[str, Any],
                  denoiser_wall: float) -> None:
    training = copy.deepcopy(dict(record))
    training.setdefault("denoiser", {})
    training["denoiser"] = {**training["denoiser"], "steps": extra.get("denoiser_steps"),
                            "wall_time_s": round(denoiser_wall, 1)}
    training["wall_time_s"] = round(sum(_stage_wall(training[s]) for s in STAGE_KEYS if s in training), 1)
    meta = {"name": cfg["name"], "training": training}
    if "val" in extra:
        meta["validation"] = extra["val"]
    bundle_io.save_bundle(path, unet, ae, model_cfg, meta)


# --------------------------------------------------------------------------------------- refine


@torch.no_grad()
def build_sampled_pool(unet: nn.Module, ae: nn.Module, model_cfg: Mapping[str, Any],
                       dataset: SampleDataset | SamplePool, size: int, seed: int, device: torch.device,
                       chunk: int = 8, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Samples 0..size-1 with the sampler's final latents for them (`z`, as inference makes them:
    ancestral sampler, one noise stream per sample) and their truth (`gt`, float16)."""
    from .inference import sample_latents

    b = bundle_io.ModelBundle(path=None, config=dict(model_cfg), unet=unet.to(device).eval(),
                              autoencoder=ae.to(device).eval())
    zs, gts = [], []
    for start in range(0, size, chunk):
        items = [dataset[i] for i in range(start, min(size, start + chunk))]
        lq = torch.stack([it["lq"] for it in items]).to(device)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + j) for j in range(len(items))]
        zs.append(sample_latents(b, lq, gens).float().cpu())
        gts.append(torch.stack([it["gt"] for it in items]).half())
        if progress:
            progress("sampled pool", min(size, start + chunk), size, {})
    return {"z": torch.cat(zs), "gt": torch.cat(gts)}


def _refine_batch(pool: Mapping[str, torch.Tensor], gen: torch.Generator, batch: int, crop: int, scale: int
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


def train_refiner(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], out_dir: Path, unet: nn.Module,
                  ae: nn.Module, dataset: SampleDataset | SamplePool, device: torch.device, resume: bool,
                  progress: Progress | None) -> dict[str, Any]:
    """Fine-tune the decoder (and post-quant conv) on (sampled latents -> truth); all else frozen."""
    c = cfg["refine"]
    seed = int(cfg["seed"]) + 29
    scale = int((model_cfg.get("diffusion") or {}).get("sf", 4))
    ckpt_path = out_dir / "checkpoints" / "refine.pt"
    log = _JsonlLog(out_dir / "logs" / "refine.jsonl")
    step, wall = 0, 0.0
    state = _load_checkpoint(ckpt_path) if resume else None
    total = int(c["steps"])
    if state is not None:
        step, wall = int(state["step"]), float(state["wall_time_s"])
    pool = None
    if step < total:  # the pool comes from the unrefined decoder's sampler: build it before loading state
        pool = build_sampled_pool(unet, ae, model_cfg, dataset, int(c["pool"]), seed, device, progress=progress)
    if state is not None:
        ae.load_state_dict(state["model"])
    ae.to(device).train()
    trainable = _decoder_only(ae)
    opt = torch.optim.Adam(trainable, lr=float(c["lr"]))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    lpips_net = LPIPS().to(device) if float(c["lpips_weight"]) > 0 else None
    t0, last_t, last_step = time.monotonic(), time.monotonic(), step
    lr0 = float(c["lr"])
    lr_end = lr0 if c.get("lr_end") is None else float(c["lr_end"])
    while step < total:
        # cosine from lr to lr_end: the targets are noisy (sampled latents), a decaying step settles them
        lr = lr_end + 0.5 * (lr0 - lr_end) * (1 + math.cos(math.pi * step / max(1, total)))
        for group in opt.param_groups:
            group["lr"] = lr
        z, gt = _refine_batch(pool, _step_generator(seed, step, 3), int(c["batch_size"]), int(c["crop"]), scale)
        z, gt = z.to(device), gt.to(device)
        rec = ae.decode(z)  # quantises as inference does; only the decoder learns
        l1 = (rec - gt).abs().mean()
        mse = F.mse_loss(rec, gt)
        loss = float(c["l1_weight"]) * l1 + float(c["mse_weight"]) * mse
        parts = {"l1": float(l1.detach()), "mse": float(mse.detach())}
        if lpips_net is not None:
            perceptual = lpips_net((rec.clamp(-1, 1) + 1) / 2, (gt + 1) / 2).mean()
            loss = loss + float(c["lpips_weight"]) * perceptual
            parts["lpips"] = float(perceptual.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % int(c["log_every"]) == 0 or step == total:
            now = time.monotonic()
            record = {"stage": "refine", "step": step, "loss": float(loss.detach()), **parts, "lr": lr,
                      "wall_time_s": round(wall + now - t0, 2),
                      "steps_per_s": round((step - last_step) / max(now - last_t, 1e-9), 4)}
            log.write(record)
            last_t, last_step = now, step
            if progress:
                progress("refine", step, total, record)
        if step % int(c["checkpoint_every"]) == 0 or step == total:
            _save_checkpoint(ckpt_path, {"step": step, "wall_time_s": wall + time.monotonic() - t0,
                                         "model": ae.state_dict(), "optimizer": opt.state_dict()})
    ae.eval().requires_grad_(True)
    return {"steps": step, "wall_time_s": round(wall + time.monotonic() - t0, 1), "pool": int(c["pool"])}


# ------------------------------------------------------------------------------------------- API


def _bundle_training_records(init_from: str | Path | Sequence[str | Path] | None) -> list[dict[str, Any]]:
    """The `training` records in model.json of the bundle folders among init_from."""
    items = [] if init_from is None else [init_from] if isinstance(init_from, (str, Path)) else list(init_from)
    return [dict(bundle_io.read_meta(item).get("training") or {}) for item in items
            if (Path(item) / bundle_io.MODEL_JSON).is_file()]


def train(
    config: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    stage: str = "both",
    init_from: str | Path | Sequence[str | Path] | None = None,
    resume: bool = True,
    progress: Progress | None = None,
    max_steps: int | None = None,
) -> Path:
    """Train from a config (name, YAML path or dict) into `out_dir`; returns the written bundle folder.

    stage: 'autoencoder', 'denoiser' (needs an autoencoder: a previous run in out_dir or `init_from`),
    'decoder' (fine-tune the decoder alone, latents unchanged) or 'both' (autoencoder, denoiser, and
    the decoder when its steps > 0). Returns out_dir/bundle, or out_dir when no denoiser exists yet.
    init_from: bundle folder or ResShift/LDM checkpoint file(s) to start from. resume:
    continue from out_dir/checkpoints when present. max_steps caps each stage (smoke runs).
    """
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    cfg = load_train_config(config)
    if max_steps is not None:
        cfg["autoencoder"]["steps"] = min(int(cfg["autoencoder"]["steps"]), max_steps)
        cfg["denoiser"]["steps"] = min(int(cfg["denoiser"]["steps"]), max_steps)
        cfg["decoder"]["steps"] = min(int(cfg["decoder"]["steps"]), max_steps)
        cfg["refine"]["steps"] = min(int(cfg["refine"]["steps"]), max_steps)
        cfg["refine"]["pool"] = min(int(cfg["refine"]["pool"]), max(8, max_steps))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    model_cfg = cfg["model"] if isinstance(cfg["model"], Mapping) else load_config(cfg["model"])
    model_cfg = {**dict(model_cfg), "name": cfg["name"]}
    torch.manual_seed(int(cfg["seed"]))
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    device = _device(str(cfg["device"]))
    unet, ae = bundle_io.build_networks(model_cfg)
    loaded = apply_init(init_from, unet, ae)
    from_bundle = any(s.startswith("bundle") for s in loaded)
    train_set, val_set = _datasets(cfg)
    samples = None
    if int(cfg["data"].get("pool") or 0) > 0 and stage != "refine":  # refine draws its own (smaller) pool
        samples = SamplePool.build(train_set, int(cfg["data"]["pool"]), out / "pool.pt", progress)
    record_path = out / "training_record.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if resume and record_path.is_file() else {}
    history: dict[str, Any] = {}
    for earlier in _bundle_training_records(init_from):  # a run that continues a bundle keeps its history
        for key, value in earlier.items():
            history.setdefault(key, value)
            record.setdefault(key, value)
    record.update({"data": train_set.source.describe(), "split": cfg["data"].get("split", "train"),
                   "train_patients": len(train_set.patients), "degradation": cfg["data"].get("degradation"),
                   "seed": int(cfg["seed"]), "device": str(device), "torch": torch.__version__,
                   "init_from": loaded or record.get("init_from", [])})

    ae_ckpt = out / "checkpoints" / "autoencoder.pt"
    if stage in ("autoencoder", "both"):
        result = train_autoencoder(cfg, out, ae, samples or train_set, device, resume, progress)
        _set_stage(record, history, "autoencoder",
                   {**result, **{k: cfg["autoencoder"][k] for k in ("batch_size", "crop", "lr")}})
    elif ae_ckpt.is_file():
        ae.load_state_dict(_load_checkpoint(ae_ckpt)["model"])
    elif not (from_bundle or any("autoencoder" in s for s in loaded)):
        raise InputError(f"stage {stage!r} needs a trained autoencoder: train stage 'autoencoder' first "
                         "or pass --init-from an autoencoder checkpoint or bundle")
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    if stage in ("denoiser", "both"):
        result = train_denoiser(cfg, model_cfg, out, unet, ae, train_set, val_set, device, samples, resume,
                                progress, record)
        _set_stage(record, history, "denoiser",
                   {**result, **{k: cfg["denoiser"][k] for k in ("batch_size", "grad_accum", "lr", "ema_decay")},
                    "sample_pool": int(cfg["data"].get("pool") or 0)})
        record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    elif (out / "checkpoints" / "denoiser.pt").is_file():
        unet.load_state_dict(_load_checkpoint(out / "checkpoints" / "denoiser.pt")["ema"])
    if stage == "decoder" or (stage == "both" and int(cfg["decoder"]["steps"]) > 0):
        result = train_autoencoder(cfg, out, ae, samples or train_set, device, resume, progress, decoder_only=True)
        _set_stage(record, history, "decoder",
                   {**result, "note": "decoder fine-tuned alone (encoder and codebook frozen)",
                    **{k: cfg["decoder"][k] for k in ("batch_size", "crop", "lr")}})
        record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    if stage == "refine" or (stage == "both" and int(cfg["refine"]["steps"]) > 0):
        if not ((out / "checkpoints" / "denoiser.pt").is_file() or from_bundle):
            raise InputError("refine needs a trained denoiser: train stage 'denoiser' first or pass --init-from "
                             "a bundle")
        result = train_refiner(cfg, model_cfg, out, unet, ae, samples or train_set, device, resume, progress)
        _set_stage(record, history, "refine",
                   {**result, "note": "decoder fine-tuned on the sampler's latents (fidelity loss)",
                    **{k: cfg["refine"][k] for k in ("batch_size", "crop", "lr", "lr_end", "l1_weight",
                                                    "mse_weight", "lpips_weight")}})
        record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    if not (out / "checkpoints" / "denoiser.pt").is_file() and not from_bundle:
        return out  # no denoiser yet: nothing to bundle (the autoencoder lives in out/checkpoints)
    _write_bundle(out / "bundle", unet, ae, model_cfg, cfg, record,
                  {"denoiser_steps": (record.get("denoiser") or {}).get("steps")},
                  float((record.get("denoiser") or {}).get("wall_time_s") or 0))
    return out / "bundle"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cinesr.model.train CONFIG OUT [--stage ...]` (the `cinesr train` command wraps train())."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("--stage", default="both", choices=STAGES)
    p.add_argument("--init-from", action="append")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--max-steps", type=int)
    a = p.parse_args(argv)

    def show(stage: str, step: int, total: int, m: dict) -> None:
        keys = [k for k in ("loss", "l1", "lpips", "steps_per_s", "val_psnr", "val_baseline_psnr", "val_lpips",
                            "val_baseline_lpips") if k in m]
        print(f"{stage} {step}/{total} " + " ".join(f"{k}={m[k]:.4g}" for k in keys), flush=True)

    path = train(a.config, a.out_dir, stage=a.stage, init_from=a.init_from, resume=not a.no_resume,
                 progress=show, max_steps=a.max_steps)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
