"""ResShift residual-shifting diffusion as small pure functions of (network, latents, schedule).

Notation (ResShift, NeurIPS 2023): x0 is the high-resolution latent, y the latent of the bicubic-
upsampled low-resolution frames, t in {0..T-1} the step index, eta_t increasing from ~0 to ~1.

    q(x_t | x0, y)        = N(x0 + eta_t (y - x0), kappa^2 eta_t I)
    q(x_{t-1} | x_t, x0)  = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0, kappa^2 eta_{t-1}/eta_t alpha_t I)
    alpha_t = eta_t - eta_{t-1},   eta_{-1} = 0

The network predicts x0 from x_t / sqrt(kappa^2 eta_t + 1), the step index and the low-resolution
frames `lq` (concatenated to its input). A `Denoiser` is any callable (x_scaled, t, lq) -> x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def exponential_sqrt_eta(
    steps: int = 15,
    min_noise_level: float = 0.04,
    etas_end: float = 0.99,
    kappa: float = 2.0,
    power: float = 0.3,
) -> torch.Tensor:
    """ResShift's 'exponential' schedule: sqrt(eta_t), t = 0..steps-1, as float64.

    sqrt(eta_t) = start * q ** ((t / (T-1)) ** power * (T-1)), start = min(min_noise/kappa, min_noise),
    q chosen so that the last value is etas_end.
    """
    start = min(min_noise_level / kappa, min_noise_level)
    ratio = math.exp(math.log(etas_end / start) / (steps - 1))
    exponent = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) ** power * (steps - 1)
    return start * torch.pow(torch.tensor(ratio, dtype=torch.float64), exponent)


@dataclass(frozen=True)
class Schedule:
    """The per-step constants of one residual-shifting chain (all float64, length T)."""

    sqrt_etas: torch.Tensor
    kappa: float

    @property
    def steps(self) -> int:
        return int(self.sqrt_etas.shape[0])

    @property
    def etas(self) -> torch.Tensor:
        return self.sqrt_etas**2

    @property
    def etas_prev(self) -> torch.Tensor:
        return torch.cat([self.etas.new_zeros(1), self.etas[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        etas, prev = self.etas, self.etas_prev
        return self.kappa**2 * prev / etas * (etas - prev)

    def respaced(self, steps: int) -> tuple[Schedule, tuple[int, ...]]:
        """`steps` of the T steps, evenly spaced (ResShift's timestep respacing), as a chain of its own,
        with the original step indices it keeps (the network still sees those). One step starts from the
        prior at the last index (a single x0 prediction from the noised shift target), as a distilled
        one-step student does."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be in 1..{self.steps} for this model, got {steps}")
        if steps == 1:
            keep: tuple[int, ...] = (self.steps - 1,)
            return Schedule(sqrt_etas=self.sqrt_etas[list(keep)], kappa=self.kappa), keep
        keep = tuple(sorted({round(float(v)) for v in torch.linspace(0, self.steps - 1, steps)}))
        return Schedule(sqrt_etas=self.sqrt_etas[list(keep)], kappa=self.kappa), keep

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None = None) -> Schedule:
        """From ResShift's diffusion params (`steps`, `min_noise_level`, `etas_end`, `kappa`,
        `schedule_kwargs.power`), flat or under `params`; defaults are ResShift's v1 (15 steps)."""
        p = dict((cfg or {}).get("params", cfg or {}))
        name = p.get("schedule_name", "exponential")
        if name != "exponential":
            raise ValueError(f"unsupported eta schedule {name!r} (only 'exponential')")
        if p.get("predict_type", "xstart") != "xstart":
            raise ValueError("only predict_type 'xstart' (x0-prediction) is supported")
        if float(p.get("scale_factor", 1.0) or 1.0) != 1.0:
            raise ValueError("only latent scale_factor 1.0 is supported")
        kappa = float(p.get("kappa", 2.0))
        sqrt_etas = exponential_sqrt_eta(
            steps=int(p.get("steps", 15)),
            min_noise_level=float(p.get("min_noise_level", 0.04)),
            etas_end=float(p.get("etas_end", 0.99)),
            kappa=kappa,
            power=float((p.get("schedule_kwargs") or {}).get("power", 0.3)),
        )
        return cls(sqrt_etas=sqrt_etas, kappa=kappa)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) in like's dtype/device."""
    return values.to(like.device)[t.to(like.device)].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _steps(t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(t, int):
        return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)
    return t.to(device=like.device, dtype=torch.long)


def q_sample(
    x0: torch.Tensor, y: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, noise: torch.Tensor
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x0, y) = x0 + eta_t (y - x0) + kappa sqrt(eta_t) noise."""
    t = _steps(t, x0)
    eta = _at(schedule.etas, t, x0)
    return x0 + eta * (y - x0) + schedule.kappa * _at(schedule.sqrt_etas, t, x0) * noise


def scale_input(x_t: torch.Tensor, t: int | torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Normalise x_t to about unit variance for the network: x_t / sqrt(kappa^2 eta_t + 1)."""
    t = _steps(t, x_t)
    return x_t / torch.sqrt(_at(schedule.etas, t, x_t) * schedule.kappa**2 + 1)


def posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0); the variance is 0 at t = 0."""
    t = _steps(t, x_t)
    etas, prev = schedule.etas, schedule.etas_prev
    mean = _at(prev / etas, t, x_t) * x_t + _at((etas - prev) / etas, t, x_t) * x0
    return mean, _at(schedule.posterior_variance, t, x_t)


def prior_sample(y: torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """x_T = y + kappa sqrt(eta_T) noise (the chain starts at the shifted, noised LR latent)."""
    return y + schedule.kappa * float(schedule.sqrt_etas[-1]) * noise


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(
        x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device
    ).to(x.device)


def _predict_x0(
    denoise: Denoiser, x_t: torch.Tensor, t: int, lq: torch.Tensor | None, schedule: Schedule, clip: bool
) -> torch.Tensor:
    tt = _steps(t, x_t)
    x0 = denoise(scale_input(x_t, tt, schedule), tt, lq)
    return x0.clamp(-1.0, 1.0) if clip else x0


def sample(
    denoise: Denoiser,
    y: torch.Tensor,
    lq: torch.Tensor | None,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    step_noise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """ResShift's ancestral sampler: T steps of x_{t-1} ~ q(x_{t-1} | x_t, x0_hat); returns the final latent.

    `noise` fixes the start noise (else drawn with `generator`); the per-step noise comes from
    `step_noise()` when given (e.g. one stream per window), else from `generator` (or the global
    RNG). `clip` clamps x0_hat to [-1, 1] (ResShift does it in pixel space only, so it is off for
    latents). `on_step(done, total)` reports progress.
    """
    draw = step_noise if step_noise is not None else lambda: _noise_like(y, generator)
    x = prior_sample(y, schedule, noise if noise is not None else _noise_like(y, generator))
    for i in reversed(range(schedule.steps)):
        x0 = _predict_x0(denoise, x, i, lq, schedule, clip)
        mean, var = posterior_mean_variance(x0, x, i, schedule)
        x = mean + torch.sqrt(var) * draw() if i > 0 else mean
        if on_step is not None:
            on_step(schedule.steps - i, schedule.steps)
    return x


def sample_deterministic(
    denoise: Denoiser,
    y: torch.Tensor,
    lq: torch.Tensor | None,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM-like variant: each step keeps the noise implied by (x_t, x0_hat) instead of drawing new.

    x_{t-1} = x0 + eta_{t-1}(y - x0) + sqrt(eta_{t-1}/eta_t) (x_t - x0 - eta_t (y - x0)), which has the
    marginal q(x_{t-1} | x0, y) when x0_hat is exact. Start noise: `noise`, else drawn from
    `generator`, else zero (x_T = y), so with neither given the result depends on the inputs only.
    """
    if noise is None:
        noise = _noise_like(y, generator) if generator is not None else torch.zeros_like(y)
    x = prior_sample(y, schedule, noise)
    etas, prev = schedule.etas, schedule.etas_prev
    for i in reversed(range(schedule.steps)):
        x0 = _predict_x0(denoise, x, i, lq, schedule, clip)
        tt = _steps(i, x)
        residual = x - x0 - _at(etas, tt, x) * (y - x0)
        x = x0 + _at(prev, tt, x) * (y - x0) + _at(torch.sqrt(prev / etas), tt, x) * residual
        if on_step is not None:
            on_step(schedule.steps - i, schedule.steps)
    return x


def training_loss(
    denoise: Denoiser,
    x0: torch.Tensor,
    y: torch.Tensor,
    lq: torch.Tensor | None,
    schedule: Schedule,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between predicted and true x0 latents at t ~ U{0..T-1} (ResShift, predict_type xstart)."""
    if t is None:
        t = torch.randint(
            0,
            schedule.steps,
            (x0.shape[0],),
            generator=generator,
            device=generator.device if generator else x0.device,
        ).to(x0.device)
    if noise is None:
        noise = _noise_like(x0, generator)
    x_t = q_sample(x0, y, t, schedule, noise)
    pred = denoise(scale_input(x_t, t, schedule), t, lq)
    return F.mse_loss(pred, x0)


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Adapt a SwinUNet (forward(x, t, lq=...)) to the Denoiser signature."""

    def denoise(x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor | None) -> torch.Tensor:
        return unet(x, t, lq=lq)

    return denoise


def upsample_lq(lq: torch.Tensor, sf: int = 4) -> torch.Tensor:
    """Bicubic upsampling of the LR frames before encoding them as the shift target y (as ResShift)."""
    return F.interpolate(lq, scale_factor=sf, mode="bicubic")


SAMPLERS = ("ancestral", "ddim")


@dataclass(frozen=True)
class SamplerPlan:
    """A residual-shifting sampler as per-step constants, in the order the steps run (t = T-1 .. 0).

    x_T = y + start_scale * noise[0];  for k, t:  x0 = net(x * c_in[k], t, lq);
    x = a[k] * x + b[k] * x0 + c[k] * y + sigma[k] * noise[k + 1]   (sigma = 0 draws no noise).

    'ancestral' is ResShift's sampler (c = 0; same arithmetic as `sample` with the noise drawn in the
    same order); 'ddim' keeps the noise implied by (x_t, x0) instead of drawing new (sigma = 0; as
    `sample_deterministic`). `temperature` scales all injected noise (1: as trained; 0: the chain starts
    at y and stays deterministic). Engines run this loop on their own graphs.
    """

    timesteps: tuple[int, ...]
    c_in: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    sigma: tuple[float, ...]
    start_scale: float
    sampler: str = "ancestral"
    temperature: float = 1.0

    @classmethod
    def from_schedule(cls, schedule: Schedule, steps: int | None = None, sampler: str = "ancestral",
                      temperature: float = 1.0) -> SamplerPlan:
        """The plan over all T steps, or over `steps` of them evenly spaced (ResShift's timestep
        respacing: the network still sees the original step indices, the chain jumps between them)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (one of {', '.join(SAMPLERS)})")
        if not 0.0 <= temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        chain, keep = schedule.respaced(schedule.steps if steps is None else int(steps))
        etas, prev, var = chain.etas, chain.etas_prev, chain.posterior_variance
        order = list(reversed(range(len(keep))))
        # c_in as scale_input computes it (float32 eta), so both agree to rounding
        etas32 = etas.float()
        if sampler == "ancestral":
            a = prev / etas
            b = (etas - prev) / etas
            c = torch.zeros_like(etas)
            sigma = torch.sqrt(var) * temperature
        else:
            a = torch.sqrt(prev / etas)
            b = 1 - prev - a * (1 - etas)
            c = prev - a * etas
            sigma = torch.zeros_like(etas)
        return cls(
            timesteps=tuple(keep[j] for j in order),
            c_in=tuple(float(1.0 / torch.sqrt(etas32[j] * schedule.kappa**2 + 1)) for j in order),
            a=tuple(float(a[j]) for j in order),
            b=tuple(float(b[j]) for j in order),
            c=tuple(float(c[j]) for j in order),
            sigma=tuple(float(sigma[j]) if j > 0 else 0.0 for j in order),
            start_scale=schedule.kappa * float(torch.sqrt(etas[-1])) * temperature,
            sampler=sampler,
            temperature=float(temperature),
        )

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def draw_noise(
    shape: tuple[int, ...], steps: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(steps, *shape) standard normal noise: [0] starts the chain, [k] is drawn after step k-1.

    Drawn one step at a time from `generator` in the order `sample` draws it, whatever the sampler
    (a deterministic one uses only [0]), so that one seed means the same start whatever the plan."""
    return torch.stack([torch.randn(shape, generator=generator, dtype=dtype) for _ in range(steps)])


def run_plan(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    lq: torch.Tensor,
    plan: SamplerPlan,
    noise: torch.Tensor,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The sampling loop of a plan from the shift target y; noise is (steps, B, C, h, w) as from
    draw_noise. `denoise(x_scaled, t (B,) int64, lq)` is one network evaluation. Returns the final latent."""
    x = y + plan.start_scale * noise[0].to(y)
    for k, t in enumerate(plan.timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x * plan.c_in[k], tt, lq)
        x = plan.a[k] * x + plan.b[k] * x0
        if plan.c[k] != 0:
            x = x + plan.c[k] * y
        if plan.sigma[k] > 0:
            x = x + plan.sigma[k] * noise[k + 1].to(x)
        if on_step is not None:
            on_step(k + 1, plan.steps)
    return x
