"""The one training loop: resume, learning-rate schedule, logging, validation, checkpoints.

Each training stage (cinesr.model.stages) plugs in what differs: the modules it checkpoints, the
parameters it optimises, the loss of one (micro-)step, and optional hooks after a step (EMA, codebook
restarts), for validation and at checkpoints. Everything is seeded per step (`step_generator`), so a
resumed run continues the same sequence as one that never stopped.

    out_dir/checkpoints/<stage>.pt    modules, optimiser, step, wall time, best validation score
    out_dir/logs/<stage>.jsonl        one JSON object per logged step (plot: cinesr.model.plots)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .folders import atomic_write

Progress = Callable[[str, int, int, dict], None]  # (stage, step, total steps, latest metrics)
LossFn = Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]  # (step, micro-batch) -> loss, parts


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The RNG of one step: a pure function of (seed, step, stream), so resume repeats the sequence."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % 2**63)


class JsonlLog:
    """Append-only JSON lines (a run may be read while it writes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint whole or not at all (never a half-written file under the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def learning_rate(section: Mapping[str, Any], step: int) -> float:
    """Linear warm-up over `warmup` steps, then constant, or cosine down to `lr_end` when it is set."""
    lr0, total = float(section["lr"]), max(1, int(section["steps"]))
    warmup = int(section.get("warmup") or 0)
    if warmup and step < warmup:
        return lr0 * (step + 1) / warmup
    if section.get("lr_end") is None:
        return lr0
    end = float(section["lr_end"])
    return end + 0.5 * (lr0 - end) * (1 + math.cos(math.pi * min(step, total) / total))


@dataclass
class Stage:
    """What one stage plugs into the loop.

    modules: checkpointed by name ('model' is the trained network); params: what the optimiser trains;
    loss(step, micro): one micro-batch's loss and its logged parts; after_step(step): runs after each
    optimiser step (EMA, codebook restarts) and may return more logged parts; validate(step): a record
    with a 'val_score' (higher is better); on_best / on_checkpoint: called with (step, wall seconds)
    when the score improves / a checkpoint is written; extra: more state to checkpoint (e.g. a
    discriminator's optimiser), as (state_dict getter, loader) pairs by name.
    """

    name: str
    section: Mapping[str, Any]
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    loss: LossFn
    after_step: Callable[[int], dict[str, Any] | None] | None = None
    validate: Callable[[int], dict[str, Any]] | None = None
    on_best: Callable[[int, float], None] | None = None
    on_checkpoint: Callable[[int, float], None] | None = None
    autocast: Any = None  # a torch.autocast context for the loss (CUDA mixed precision), or None
    scaler: Any = None  # a GradScaler for float16 autocast
    extra: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = field(default_factory=dict)


def run(stage: Stage, out_dir: Path, resume: bool, progress: Progress | None = None) -> dict[str, Any]:
    """Train one stage to section['steps'] (continuing a checkpoint when `resume`); returns steps and wall time."""
    c = stage.section
    ckpt_path = out_dir / "checkpoints" / f"{stage.name}.pt"
    log = JsonlLog(out_dir / "logs" / f"{stage.name}.jsonl")
    opt = torch.optim.Adam(stage.params, lr=float(c["lr"]), betas=tuple(c.get("betas") or (0.9, 0.999)))
    step, wall, best = 0, 0.0, -math.inf
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        for key, module in stage.modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["optimizer"])
        for key, (_, load) in stage.extra.items():
            if key in state:
                load(state[key])
        step, wall, best = int(state["step"]), float(state["wall_time_s"]), float(state.get("best", -math.inf))
    total, accum = int(c["steps"]), int(c.get("grad_accum") or 1)
    log_every, ckpt_every = int(c.get("log_every") or 10), int(c.get("checkpoint_every") or 100)
    val_every = int(c.get("val_every") or 0)
    t0 = last_t = time.monotonic()
    last_step = step
    while step < total:
        lr = learning_rate(c, step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses, parts = [], {}
        for micro in range(accum):
            with stage.autocast if stage.autocast is not None else nullcontext():
                loss, parts = stage.loss(step, micro)
            scaled = loss.float() / accum
            (stage.scaler.scale(scaled) if stage.scaler else scaled).backward()
            losses.append(float(loss.detach()))
        if stage.scaler:
            stage.scaler.step(opt)
            stage.scaler.update()
        else:
            opt.step()
        step += 1
        if stage.after_step is not None:
            parts = {**parts, **(stage.after_step(step) or {})}
        record: dict[str, Any] = {}
        if step % log_every == 0 or step == total:
            now = time.monotonic()
            record = {"stage": stage.name, "step": step, "loss": sum(losses) / len(losses), **parts, "lr": lr,
                      "wall_time_s": round(wall + now - t0, 2),
                      "steps_per_s": round((step - last_step) / max(now - last_t, 1e-9), 4)}
            last_t, last_step = now, step
        if stage.validate is not None and val_every and (step % val_every == 0 or step == total):
            v = stage.validate(step)
            record = {**(record or {"stage": stage.name, "step": step}), **v}
            if v["val_score"] > best:
                best = v["val_score"]
                if stage.on_best is not None:
                    stage.on_best(step, wall + time.monotonic() - t0)
        if record:
            log.write(record)
            if progress is not None:
                progress(stage.name, step, total, record)
        if step % ckpt_every == 0 or step == total:
            elapsed = wall + time.monotonic() - t0
            saved = {"step": step, "wall_time_s": elapsed, "best": best, "optimizer": opt.state_dict(),
                     **{k: m.state_dict() for k, m in stage.modules.items()},
                     **{k: get() for k, (get, _) in stage.extra.items()}}
            save_checkpoint(ckpt_path, saved)
            if stage.on_checkpoint is not None:
                stage.on_checkpoint(step, elapsed)
    return {"steps": step, "wall_time_s": round(wall + time.monotonic() - t0, 1)}
