"""Training: the VQGAN autoencoder, then the Swin-UNet denoiser with the autoencoder frozen, then the decoder.

`train(config, out_dir, stage=...)` runs stages from a training config (YAML in `model/configs/train/`,
by name or path) through the one training loop (cinesr.model.loop); what each stage trains is in
cinesr.model.stages. Everything is seeded: batch b of step s is a pure function of (seed, s), so a
resumed run continues the same sequence.

    out_dir/checkpoints/<stage>.pt     resumable state (weights, EMA, optimiser, step)
    out_dir/logs/<stage>.jsonl         one JSON object per logged step (plot: cinesr.model.plots)
    out_dir/bundle/                    the model bundle (latest), out_dir/bundle-best/ (best validation)

Data: one source or several weighted ones (`data.sources`: heart phantoms, dead leaves, textures,
Shepp-Logan...), samples built as the pipeline sees an acquisition (`data.mode: acquired`) or as in the
paper, under one acquisition kind or a mix of them (`data.degradation`, cinesr.model.degrade).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import bundle as bundle_io
from . import loop, stages
from .checkpoint import extract_state_dict, load_into, read_checkpoint, select_prefix
from .configs import load_config
from .datasets import SampleDataset, open_source
from .degrade import DegradationConfig
from .errors import InputError
from .loop import Progress
from .stages import SamplePool, autoencoder_losses, restart_codes

TRAIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "train"
STAGES = ("autoencoder", "denoiser", "decoder", "refine", "distill", "both")
STAGE_KEYS = ("autoencoder", "denoiser", "decoder", "refine", "distill")

_AE = {"steps": 1000, "batch_size": 8, "crop": 128, "lr": 2e-4, "betas": [0.5, 0.9], "warmup": 0, "lr_end": None,
       "l1_weight": 1.0, "mse_weight": 0.0, "lpips_weight": 1.0, "codebook_weight": 1.0, "commitment": 0.25,
       "lq_fraction": 0.25, "adversarial_weight": 0.0, "adversarial_start": 0, "restart_codes_every": 100,
       "log_every": 10, "checkpoint_every": 200}
DEFAULTS: dict[str, Any] = {
    "name": None,
    "model": "tiny",
    "seed": 0,
    "device": "auto",
    "threads": 0,
    # source: one data spec, or sources: [{source: spec, weight: w}, ...]; mode: acquired | paper
    "data": {"source": "phantom:0-99", "sources": None, "mode": "paper", "split": "train",
             "degradation": {"kind": "realesrgan"}, "val_source": None, "val_split": "val", "cache_patients": 128,
             "pool": 0, "phantom": {}},
    "autoencoder": dict(_AE),
    # optional: fine-tune the VQGAN decoder alone (encoder and codebook frozen, so the latents the
    # denoiser learned stay valid)
    "decoder": {**_AE, "steps": 0, "lr": 1e-4, "codebook_weight": 0.0, "commitment": 0.0, "lq_fraction": 0.0,
                "restart_codes_every": 0},
    "denoiser": {"steps": 2000, "batch_size": 8, "grad_accum": 1, "lr": 5e-5, "warmup": 0, "lr_end": None,
                 "ema_decay": 0.999, "amp": True, "log_every": 10, "checkpoint_every": 250,
                 "val_every": 250, "val_windows": 8},
    # optional very last stage: the decoder alone again, on the latents the trained denoiser's sampler
    # produces (with the bundle's shipped sampler options), with a fidelity loss. The autoencoder stages
    # teach the decoder to reproduce its own codes; the sampler's latents differ from those, and
    # decoding them as if they were exact costs fidelity. Encoder, codebook and UNet stay as they are.
    "refine": {"steps": 0, "pool": 512, "batch_size": 8, "crop": 96, "lr": 1e-4, "lr_end": None, "warmup": 0,
               "l1_weight": 1.0, "mse_weight": 1.0, "lpips_weight": 0.1, "log_every": 10, "checkpoint_every": 250},
    # optional: a few-step student distilled from the trained denoiser (SinSR-style: the teacher's
    # deterministic 15-step chain in one x0 prediction), for 1, 2 and 4 steps; gt_weight > 0 adds the truth's
    # latent to the loss (it cost the tiny student SSIM: see model/configs/train/tiny.yaml)
    "distill": {"steps": 0, "pool": 1024, "batch_size": 8, "lr": 1e-4, "lr_end": 1e-5, "warmup": 0,
                "temperature": 1.0, "gt_weight": 0.0, "log_every": 10, "checkpoint_every": 250},
    # the bundle's shipped inference options (cinesr.model.pipeline.Options), written into model.json
    "inference": {},
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


def _sources(data: Mapping[str, Any], key: str) -> list[tuple[Any, float]]:
    phantom = dict(data.get("phantom") or {})  # slices/frames/size of on-the-fly phantoms
    if key == "sources":
        if data.get("sources"):
            return [(open_source(s["source"], **phantom), float(s.get("weight", 1.0))) for s in data["sources"]]
        key = "source"
    return [(open_source(data[key], **phantom), 1.0)]


def _datasets(cfg: Mapping[str, Any]) -> tuple[SampleDataset, SampleDataset | None]:
    data = cfg["data"]
    degradation = DegradationConfig.from_dict(dict(data.get("degradation") or {}))
    mode = str(data.get("mode") or "paper")
    train = SampleDataset(_sources(data, "sources"), data.get("split", "train"), degradation,
                          seed=int(cfg["seed"]), cache_patients=int(data.get("cache_patients", 128)), mode=mode)
    try:
        parts = _sources(data, "val_source") if data.get("val_source") else _sources(data, "sources")
        val = SampleDataset(parts, data.get("val_split", "val"), degradation, seed=int(cfg["seed"]) + 1,
                            cache_patients=16, mode=mode)
    except InputError:
        val = None  # too few patients for a validation split: train without validation
    return train, val


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



# ------------------------------------------------------------------------------------------ record


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


def _write_bundle(path: Path, unet: nn.Module, ae: nn.Module, model_cfg: Mapping[str, Any], cfg: Mapping[str, Any],
                  record: Mapping[str, Any], extra: Mapping[str, Any], denoiser_wall: float,
                  student: nn.Module | None = None, distilled: Mapping[str, Any] | None = None) -> None:
    training = copy.deepcopy(dict(record))
    training.setdefault("denoiser", {})
    training["denoiser"] = {**training["denoiser"], "steps": extra.get("denoiser_steps"),
                            "wall_time_s": round(denoiser_wall, 1)}
    training["wall_time_s"] = round(sum(_stage_wall(training[s]) for s in STAGE_KEYS if s in training), 1)
    meta: dict[str, Any] = {"name": cfg["name"], "training": training}
    if cfg.get("inference"):
        meta["inference"] = dict(cfg["inference"])
    if "val" in extra:
        meta["validation"] = extra["val"]
    if student is not None:
        meta["distilled"] = dict(distilled or {})
    bundle_io.save_bundle(path, unet, ae, model_cfg, meta, student=student)


def _bundle_training_records(init_from: str | Path | Sequence[str | Path] | None) -> list[dict[str, Any]]:
    """The `training` records in model.json of the bundle folders among init_from."""
    items = [] if init_from is None else [init_from] if isinstance(init_from, (str, Path)) else list(init_from)
    return [dict(bundle_io.read_meta(item).get("training") or {}) for item in items
            if (Path(item) / bundle_io.MODEL_JSON).is_file()]


def _options(cfg: Mapping[str, Any], init_from: Any) -> Any:
    """The inference options the bundle will ship: the config's, else those of the bundle it continues."""
    from .pipeline import Options

    shipped = dict(cfg.get("inference") or {})
    for item in ([] if init_from is None else [init_from] if isinstance(init_from, (str, Path)) else init_from):
        if not shipped and (Path(item) / bundle_io.MODEL_JSON).is_file():
            shipped = dict(bundle_io.read_meta(item).get("inference") or {})
    return Options.from_mapping(shipped)


# ------------------------------------------------------------------------------------------- API


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
    'decoder' (fine-tune the decoder alone, latents unchanged), 'refine' (the decoder on sampled
    latents; needs a denoiser), 'distill' (a few-step student of the denoiser) or 'both' (every stage
    whose steps > 0, in that order). Returns
    out_dir/bundle, or out_dir when no denoiser exists yet. init_from: bundle folder or ResShift/LDM
    checkpoint file(s) to start from. resume: continue from out_dir/checkpoints when present.
    max_steps caps each stage (smoke runs).
    """
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    cfg = load_train_config(config)
    if max_steps is not None:
        for key in STAGE_KEYS:
            cfg[key]["steps"] = min(int(cfg[key]["steps"]), max_steps)
        for key in ("refine", "distill"):  # their pools of sampler chains too
            cfg[key]["pool"] = min(int(cfg[key]["pool"]), max(8, max_steps))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    model_cfg = cfg["model"] if isinstance(cfg["model"], Mapping) else load_config(cfg["model"])
    model_cfg = {**dict(model_cfg), "name": cfg["name"]}
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    device = _device(str(cfg["device"]))
    unet, ae = bundle_io.build_networks(model_cfg)
    loaded = apply_init(init_from, unet, ae)
    from_bundle = any(s.startswith("bundle") for s in loaded)
    # a student distilled from the bundle's denoiser stays valid while that denoiser does
    student, distilled = _bundle_student(init_from)
    options = _options(cfg, init_from)
    train_set, val_set = _datasets(cfg)
    samples: SamplePool | SampleDataset = train_set
    pool_size = int(cfg["data"].get("pool") or 0)
    if stage == "distill":  # the teacher's chains need only their own pool's samples (the first ones)
        pool_size = min(pool_size, int(cfg["distill"]["pool"]))
    if pool_size > 0 and stage != "refine":  # refine draws its own (smaller) pool
        samples = SamplePool.build(train_set, pool_size, out / "pool.pt", progress)
    record_path = out / "training_record.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if resume and record_path.is_file() else {}
    history: dict[str, Any] = {}
    for earlier in _bundle_training_records(init_from):  # a run that continues a bundle keeps its history
        for key, value in earlier.items():
            history.setdefault(key, value)
            record.setdefault(key, value)
    record.update({"data": train_set.source.describe() if len(train_set.parts) == 1 else train_set.describe(),
                   "mode": train_set.mode, "split": cfg["data"].get("split", "train"),
                   "train_patients": len(train_set.patients), "degradation": cfg["data"].get("degradation"),
                   "seed": seed, "device": str(device), "torch": torch.__version__,
                   "init_from": loaded or record.get("init_from", [])})

    def save_record() -> None:
        record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")

    ckpts = out / "checkpoints"
    if stage in ("autoencoder", "both"):
        result = loop.run(stages.autoencoder_stage("autoencoder", cfg["autoencoder"], seed, ae, samples, device),
                          out, resume, progress)
        ae.eval().requires_grad_(True)
        _set_stage(record, history, "autoencoder",
                   {**result, **{k: cfg["autoencoder"][k] for k in ("batch_size", "crop", "lr")}})
    elif (ckpts / "autoencoder.pt").is_file():
        ae.load_state_dict(loop.load_checkpoint(ckpts / "autoencoder.pt")["model"])
    elif not (from_bundle or any("autoencoder" in s for s in loaded)):
        raise InputError(f"stage {stage!r} needs a trained autoencoder: train stage 'autoencoder' first "
                         "or pass --init-from an autoencoder checkpoint or bundle")
    save_record()
    if stage in ("denoiser", "both"):
        c = cfg["denoiser"]

        def check(step: int) -> dict[str, Any]:
            return stages.validate(dn.ema, ae, model_cfg, val_set, int(c["val_windows"]), seed, options)

        def best(step: int, wall: float) -> None:
            _write_bundle(out / "bundle-best", dn.ema, ae, model_cfg, cfg, record,
                          {"denoiser_steps": step, "val": check_cache.get(step)}, wall)

        check_cache: dict[int, dict[str, Any]] = {}

        def check_and_keep(step: int) -> dict[str, Any]:
            check_cache[step] = check(step)
            return check_cache[step]

        dn = stages.denoiser_stage(c, model_cfg, seed, unet, ae, samples, device,
                                   check_and_keep if val_set is not None and int(c["val_every"]) else None, progress,
                                   cache=out / "latents.pt")
        dn.stage.on_best = best
        dn.stage.on_checkpoint = lambda step, wall: _write_bundle(out / "bundle", dn.ema, ae, model_cfg, cfg, record,
                                                                  {"denoiser_steps": step}, wall)
        result = loop.run(dn.stage, out, resume, progress)
        unet.load_state_dict(dn.ema.state_dict())  # the bundle ships the EMA weights
        student, distilled = None, None  # a new teacher: an earlier student no longer matches it
        _set_stage(record, history, "denoiser",
                   {**result, **{k: c[k] for k in ("batch_size", "grad_accum", "lr", "ema_decay")},
                    "sample_pool": int(cfg["data"].get("pool") or 0)})
        save_record()
    elif (ckpts / "denoiser.pt").is_file():
        unet.load_state_dict(loop.load_checkpoint(ckpts / "denoiser.pt")["ema"])
    if stage == "decoder" or (stage == "both" and int(cfg["decoder"]["steps"]) > 0):
        result = loop.run(stages.autoencoder_stage("decoder", cfg["decoder"], seed + 17, ae, samples, device),
                          out, resume, progress)
        ae.eval().requires_grad_(True)
        _set_stage(record, history, "decoder",
                   {**result, "note": "decoder fine-tuned alone (encoder and codebook frozen)",
                    **{k: cfg["decoder"][k] for k in ("batch_size", "crop", "lr")}})
        save_record()
    if stage == "refine" or (stage == "both" and int(cfg["refine"]["steps"]) > 0):
        if not ((ckpts / "denoiser.pt").is_file() or from_bundle):
            raise InputError("refine needs a trained denoiser: train stage 'denoiser' first or pass --init-from "
                             "a bundle")
        c = cfg["refine"]
        state = loop.load_checkpoint(ckpts / "refine.pt") if resume else None
        pool: dict[str, torch.Tensor] = {}
        if state is None or int(state["step"]) < int(c["steps"]):
            # the pool comes from the unrefined decoder's sampler: built before the checkpoint is loaded
            pool = stages.sampled_pool(unet, ae, model_cfg, samples, int(c["pool"]), seed + 29, device, options,
                                       progress=progress)
        result = loop.run(stages.refine_stage(c, model_cfg, seed + 29, ae, pool, device), out, resume, progress)
        ae.eval().requires_grad_(True)
        _set_stage(record, history, "refine",
                   {**result, "pool": int(c["pool"]),
                    "note": "decoder fine-tuned on the sampler's latents (fidelity loss)",
                    **{k: c[k] for k in ("batch_size", "crop", "lr", "lr_end", "l1_weight", "mse_weight",
                                         "lpips_weight")}})
        save_record()
    if stage == "distill" or (stage == "both" and int(cfg["distill"]["steps"]) > 0):
        if not ((ckpts / "denoiser.pt").is_file() or from_bundle):
            raise InputError("distill needs a trained denoiser (the teacher): train stage 'denoiser' first or pass "
                             "--init-from a bundle")
        c = cfg["distill"]
        student = copy.deepcopy(unet)  # starts as the teacher
        state = loop.load_checkpoint(ckpts / "distill.pt") if resume else None
        pool = {}
        if state is None or int(state["step"]) < int(c["steps"]):
            pool = stages.teacher_pool(unet, ae, model_cfg, samples, int(c["pool"]), seed + 41, device,
                                       float(c["temperature"]), progress=progress)
        result = loop.run(stages.distill_stage(c, model_cfg, seed + 41, student, pool, device), out, resume,
                          progress)
        student.eval().requires_grad_(False)
        distilled = {"steps": list(stages.STUDENT_STEPS), "sampler": "ddim", "teacher_temperature": c["temperature"],
                     "teacher_sha256": bundle_io.state_digest(unet)}
        note = distilled_note(float(c.get("gt_weight") or 0))
        _set_stage(record, history, "distill", {**result, "pool": int(c["pool"]), "note": note,
                                                **{k: c[k] for k in ("batch_size", "lr", "lr_end", "gt_weight")}})
        save_record()
    if not (ckpts / "denoiser.pt").is_file() and not from_bundle:
        return out  # no denoiser yet: nothing to bundle (the autoencoder lives in out/checkpoints)
    _write_bundle(out / "bundle", unet, ae, model_cfg, cfg, record,
                  {"denoiser_steps": (record.get("denoiser") or {}).get("steps")},
                  float((record.get("denoiser") or {}).get("wall_time_s") or 0), student, distilled)
    return out / "bundle"


def distilled_note(gt_weight: float = 0.0) -> str:
    truth = f", plus {gt_weight:g} x the true latent's" if gt_weight else ""
    return ("student UNet distilled from the denoiser: the teacher's deterministic 15-step chain in one x0 "
            f"prediction from each of the 1-, 2- and 4-step plans' steps (MSE to the teacher's result{truth})")


def _bundle_student(init_from: Any) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The student and its `distilled` record of the (last) bundle among init_from, if it has one."""
    items = [] if init_from is None else [init_from] if isinstance(init_from, (str, Path)) else list(init_from)
    for item in reversed(items):
        if (Path(item) / bundle_io.MODEL_JSON).is_file():
            b = bundle_io.load_bundle(item)
            if b.student is not None:
                return b.student, dict(b.meta.get("distilled") or {})
    return None, None


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
        keys = [k for k in ("loss", "l1", "mse", "lpips", "steps_per_s", "val_psnr", "val_baseline_psnr", "val_lpips",
                            "val_baseline_lpips") if k in m]
        print(f"{stage} {step}/{total} " + " ".join(f"{k}={m[k]:.4g}" for k in keys), flush=True)

    path = train(a.config, a.out_dir, stage=a.stage, init_from=a.init_from, resume=not a.no_resume,
                 progress=show, max_steps=a.max_steps)
    print(path)
    return 0


__all__ = ["DEFAULTS", "apply_init", "autoencoder_losses", "load_train_config", "restart_codes", "train"]

if __name__ == "__main__":
    raise SystemExit(main())
