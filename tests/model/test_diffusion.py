"""Residual-shifting diffusion: schedule, marginals, posterior, samplers and loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cinesr.model.configs import load_config
from cinesr.model.diffusion import (
    SamplerPlan,
    Schedule,
    draw_noise,
    exponential_sqrt_eta,
    posterior_mean_variance,
    prior_sample,
    q_sample,
    run_plan,
    sample,
    sample_deterministic,
    scale_input,
    training_loss,
    unet_denoiser,
)
from cinesr.model.nets import SwinUNet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "resshift"


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.from_config(load_config("tiny")["diffusion"])


def _latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 16, 16, generator=g)
    y = x0 + 0.5 * torch.randn(2, 3, 16, 16, generator=g)
    lq = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    return x0, y, lq


def test_schedule_equals_resshift_fixture(schedule):
    ref = json.loads((FIXTURES / "resshift_small_reference.json").read_text())["eta_schedule"]
    expected = torch.tensor(ref["sqrt_eta"], dtype=torch.float64)
    assert schedule.steps == ref["steps"] == 15 and schedule.kappa == ref["kappa"]
    assert (schedule.sqrt_etas - expected).abs().max().item() < 1e-6
    direct = exponential_sqrt_eta(
        ref["steps"], ref["min_noise_level"], ref["etas_end"], ref["kappa"], ref["power"]
    )
    assert (direct - expected).abs().max().item() < 1e-6
    assert torch.all(schedule.sqrt_etas[1:] > schedule.sqrt_etas[:-1])


def test_schedule_config_is_validated():
    with pytest.raises(ValueError, match="predict_type"):
        Schedule.from_config({"predict_type": "epsilon"})
    with pytest.raises(ValueError, match="schedule"):
        Schedule.from_config({"params": {"schedule_name": "ldm"}})
    assert Schedule.from_config({"params": {"steps": 4}}).steps == 4


def test_q_sample_marginal(schedule):
    x0, y, _ = _latents()
    t = torch.tensor([0, 14])
    noise = torch.randn_like(x0)
    x_t = q_sample(x0, y, t, schedule, noise)
    eta = schedule.etas[t].float().view(-1, 1, 1, 1)
    expected = x0 + eta * (y - x0) + 2.0 * eta.sqrt() * noise
    torch.testing.assert_close(x_t, expected)
    # no noise: the mean moves from ~x0 (t=0) to ~y (t=T-1)
    mean = q_sample(x0, y, t, schedule, torch.zeros_like(x0))
    assert (mean[0] - x0[0]).abs().max() < 0.01 * (y - x0).abs().max()
    assert (mean[1] - y[1]).abs().max() < 0.02 * (y - x0).abs().max()
    # empirical variance of many draws at one step is kappa^2 eta_t
    many = q_sample(
        torch.zeros(20000, 1, 1, 1), torch.zeros(20000, 1, 1, 1), 7, schedule, torch.randn(20000, 1, 1, 1)
    )
    assert many.var().item() == pytest.approx(4.0 * schedule.etas[7].item(), rel=0.05)


def test_scale_input(schedule):
    x = torch.ones(2, 3, 4, 4)
    scaled = scale_input(x, torch.tensor([0, 14]), schedule)
    for i, t in enumerate((0, 14)):
        expected = 1.0 / (4.0 * schedule.etas[t].item() + 1) ** 0.5
        assert scaled[i].flatten()[0].item() == pytest.approx(expected, rel=1e-6)


def test_posterior_matches_resshift_formulas(schedule):
    x0, y, _ = _latents(1)
    x_t = q_sample(x0, y, 9, schedule, torch.randn_like(x0))
    mean, var = posterior_mean_variance(x0, x_t, 9, schedule)
    e, ep = schedule.etas[9].item(), schedule.etas[8].item()
    torch.testing.assert_close(mean, ep / e * x_t + (e - ep) / e * x0)
    assert var.flatten()[0].item() == pytest.approx(4.0 * ep / e * (e - ep), rel=1e-6)
    mean0, var0 = posterior_mean_variance(x0, x_t, 0, schedule)
    torch.testing.assert_close(mean0, x0)  # the last step lands on x0
    assert var0.abs().max().item() == 0.0


def test_posterior_is_consistent_with_marginals(schedule):
    """Mixing q(x_{t-1}|x_t,x0) over q(x_t|x0) gives q(x_{t-1}|x0): check mean and variance."""
    n, t = 40000, 6
    x0, y = torch.full((n, 1, 1, 1), 0.3), torch.full((n, 1, 1, 1), -0.7)
    x_t = q_sample(x0, y, t, schedule, torch.randn(n, 1, 1, 1))
    mean, var = posterior_mean_variance(x0, x_t, t, schedule)
    prev = mean + var.sqrt() * torch.randn(n, 1, 1, 1)
    eta = schedule.etas[t - 1].item()
    assert prev.mean().item() == pytest.approx(0.3 + eta * (-1.0), abs=0.01)
    assert prev.var().item() == pytest.approx(4.0 * eta, rel=0.05)


def _oracle(x0: torch.Tensor, seen: list):
    def denoise(x_scaled, t, lq):
        seen.append((t.clone(), x_scaled.clone(), lq))
        return x0.clone()

    return denoise


@pytest.mark.parametrize("sampler", [sample, sample_deterministic])
def test_oracle_network_recovers_x0(schedule, sampler):
    x0, y, lq = _latents(2)
    seen: list = []
    g = torch.Generator().manual_seed(5)
    out = sampler(_oracle(x0, seen), y, lq, schedule, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # 15 calls, t = 14 .. 0, each with the lq conditioning and a scaled input
    assert [int(t[0]) for t, _, _ in seen] == list(range(14, -1, -1))
    assert all(lq_seen is lq for _, _, lq_seen in seen)


def test_stochastic_sampler_starts_at_prior(schedule):
    x0, y, lq = _latents(3)
    noise = torch.randn_like(y)
    seen: list = []
    sample(_oracle(x0, seen), y, lq, schedule, noise=noise, generator=torch.Generator().manual_seed(0))
    x_T = y + 2.0 * 0.99 * noise
    torch.testing.assert_close(prior_sample(y, schedule, noise), x_T)
    first_input = seen[0][1]
    torch.testing.assert_close(first_input, x_T / (4.0 * 0.99**2 + 1) ** 0.5)


def test_deterministic_sampler_is_deterministic(schedule):
    x0, y, lq = _latents(4)

    def imperfect(x_scaled, t, lq_):  # a network that is not an oracle: depends on its inputs
        return 0.5 * x_scaled + 0.1 * lq_ + 0.01 * t.float().view(-1, 1, 1, 1)

    a = sample_deterministic(imperfect, y, lq, schedule)
    b = sample_deterministic(imperfect, y, lq, schedule)
    assert torch.equal(a, b)
    # the stochastic sampler with a different generator seed does not repeat itself
    s1 = sample(imperfect, y, lq, schedule, generator=torch.Generator().manual_seed(1))
    s2 = sample(imperfect, y, lq, schedule, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(s1, s2)
    s1_again = sample(imperfect, y, lq, schedule, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s1_again)


def test_training_loss_is_x0_mse(schedule):
    x0, y, lq = _latents(5)
    seen: list = []
    assert training_loss(_oracle(x0, seen), x0, y, lq, schedule).item() == 0.0
    t = torch.tensor([3, 11])
    noise = torch.randn_like(x0)

    def zero(x_scaled, t_, lq_):
        return torch.zeros_like(x_scaled)

    assert training_loss(zero, x0, y, lq, schedule, t=t, noise=noise).item() == pytest.approx(
        x0.pow(2).mean().item()
    )
    # the network sees the scaled x_t of the given step
    seen.clear()
    training_loss(_oracle(x0, seen), x0, y, lq, schedule, t=t, noise=noise)
    torch.testing.assert_close(seen[0][1], scale_input(q_sample(x0, y, t, schedule, noise), t, schedule))
    # uniform t: all 15 steps are drawn
    g = torch.Generator().manual_seed(0)
    drawn: set = set()
    for _ in range(60):
        seen.clear()
        training_loss(_oracle(x0, seen), x0, y, lq, schedule, generator=g)
        drawn.update(seen[0][0].tolist())
    assert drawn == set(range(15))


def test_training_loss_trains_tiny_unet(schedule):
    """A few optimiser steps on one batch reduce the loss (gradients flow through the UNet)."""
    torch.manual_seed(0)
    cfg = load_config("tiny")["unet_config"]
    unet = SwinUNet.from_resshift_config(cfg)
    x0 = torch.randn(2, cfg["in_channels"], 64, 64) * 0.5
    lq = torch.rand(2, 3, 64, 64) * 2 - 1
    y = x0 + 0.3 * lq.repeat(1, 3, 1, 1)[:, : cfg["in_channels"]]
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    t, noise = torch.tensor([2, 12]), torch.randn_like(x0)
    losses = []
    for _ in range(8):
        loss = training_loss(unet_denoiser(unet), x0, y, lq, schedule, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_plans_run_the_reference_samplers(schedule):
    """run_plan with the ancestral plan is `sample`, with the ddim plan `sample_deterministic` (same noise);
    temperature 0 starts the chain at y and draws nothing."""
    g = torch.Generator().manual_seed(5)
    y, lq = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1

    def denoise(x, t, cond):  # any smooth function of its inputs will do
        return torch.tanh(0.7 * x + 0.1 * cond + 0.01 * t.view(-1, 1, 1, 1))

    noise = draw_noise(tuple(y.shape), schedule.steps, torch.Generator().manual_seed(9))
    draws = iter(noise[1:])
    ref = sample(denoise, y, lq, schedule, noise=noise[0], step_noise=lambda: next(draws))
    assert torch.allclose(run_plan(denoise, y, lq, SamplerPlan.from_schedule(schedule), noise), ref, atol=1e-6)
    ref = sample_deterministic(denoise, y, lq, schedule, noise=noise[0])
    assert torch.allclose(run_plan(denoise, y, lq, SamplerPlan.from_schedule(schedule, None, "ddim"), noise), ref,
                          atol=1e-6)
    cold = SamplerPlan.from_schedule(schedule, None, "ancestral", temperature=0.0)
    assert cold.start_scale == 0 and not any(cold.sigma)
    assert torch.equal(run_plan(denoise, y, lq, cold, noise), run_plan(denoise, y, lq, cold, torch.zeros_like(noise)))


def test_respaced_schedule_keeps_the_ends_and_the_original_etas() -> None:
    full = Schedule.from_config()
    same, keep = full.respaced(full.steps)
    assert keep == tuple(range(full.steps)) and torch.equal(same.sqrt_etas, full.sqrt_etas)
    few, keep = full.respaced(5)
    assert keep[0] == 0 and keep[-1] == full.steps - 1 and len(keep) == 5
    assert torch.equal(few.etas, full.etas[list(keep)]) and few.kappa == full.kappa
    assert few.posterior_variance[0] == 0  # the last step of the chain draws no noise
    with pytest.raises(ValueError, match="steps must be in 1..15"):
        full.respaced(16)
