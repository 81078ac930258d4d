"""VDM's learned noise schedule and loss (diffusion/vdm_schedule.py) against closed forms and brute force:
monotone with exact endpoints, closed-form gamma' = autograd, the learned linear schedule reproduces the fixed
schedule's loss term by term, the schedule-invariance of the continuous-time ELBO (VDM Sec. 5.1) with the exact
mixture denoiser, and the variance-minimising gradient = central differences of mean(L_diff^2)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.likelihood import vdm_elbo
from diffusion_lab.diffusion.losses import DenoisingLoss
from diffusion_lab.diffusion.schedules import VE
from diffusion_lab.diffusion.vdm_schedule import LearnedNoiseSchedule, VDMLoss

G_MIN, G_MAX = -13.3, 5.0


def _random_net_schedule(
    seed: int, num_features: int = 8, gamma_min: float = G_MIN, gamma_max: float = G_MAX
) -> LearnedNoiseSchedule:
    """A monotone-net schedule far from linear: every raw weight random (negative ones included)."""
    torch.manual_seed(seed)
    schedule = LearnedNoiseSchedule(gamma_min, gamma_max, num_features=num_features).double()
    with torch.no_grad():
        for p in (schedule.w2, schedule.b2, schedule.w3):
            p.copy_(3 * torch.randn_like(p))
        schedule.w1.fill_(-0.3)  # |w1| is what counts
    return schedule


def test_gamma_is_increasing_with_exact_endpoints():
    schedule = _random_net_schedule(0)
    with torch.no_grad():
        schedule.gamma_min.fill_(-9.0)
        schedule.gamma_max.fill_(3.5)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    gamma = schedule(t)
    assert (gamma.diff() > 0).all()
    assert gamma[0].item() == pytest.approx(-9.0, abs=1e-12) and gamma[-1].item() == pytest.approx(
        3.5, abs=1e-12
    )
    assert schedule.sigma_min == pytest.approx(math.exp(-4.5)) and schedule.sigma_max == pytest.approx(
        math.exp(1.75)
    )
    # not the linear schedule: the shape really is learned
    assert (gamma - (-9.0 + 12.5 * t)).abs().max() > 0.5
    # the NoiseSchedule view: sigma_ve^2 = exp(gamma), log_snr = -gamma, and its inverse
    torch.testing.assert_close(schedule.sigma_ve(t) ** 2, gamma.exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        schedule.t_from_log_snr(schedule.log_snr(t[::500])), t[::500], rtol=0, atol=1e-12
    )


def test_gamma_derivative_is_the_autograd_derivative():
    schedule = _random_net_schedule(1)
    t = torch.linspace(0, 1, 101, dtype=torch.float64).requires_grad_(True)
    gamma, dgamma = schedule.gamma_and_derivative(t)
    (auto,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(dgamma, auto, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(schedule.dlog_snr_dt(t.detach()), -auto, rtol=1e-10, atol=1e-10)


def test_linear_learned_schedule_loss_equals_fixed_schedule_loss(mixture):
    """s(t) = t on [gamma_min, gamma_max] is the fixed linear log-SNR schedule VE(e^{g_min/2}, e^{g_max/2}):
    the diffusion term is (g_max - g_min)/2 * d * DenoisingLoss(eps) at the same sigma and noise, and the
    prior / decoder terms are vdm_elbo's."""
    gen = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(64, generator=gen)
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    loss = VDMLoss(LearnedNoiseSchedule(G_MIN, G_MAX, shape="linear").double(), prior="ve")
    terms = loss.terms(mixture, x0, t, noise)
    g_min, g_max = (float(g.detach()) for g in loss.schedule.endpoints(torch.float64))  # float32-rounded
    fixed = VE(math.exp(g_min / 2), math.exp(g_max / 2))
    eps_loss = DenoisingLoss(weighting="eps").per_sample(mixture, x0, fixed.sigma_ve(t), noise)
    torch.testing.assert_close(terms["diffusion"], (g_max - g_min) / 2 * 2 * eps_loss, rtol=1e-10, atol=1e-12)
    ref = vdm_elbo(mixture, x0, fixed, prior_variance="ve")
    torch.testing.assert_close(terms["prior"], ref.prior, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["reconstruction"], ref.reconstruction, rtol=1e-10, atol=1e-12)
    # forward() is the batch mean of the same total, in bits per dimension
    torch.manual_seed(5)
    value = loss(mixture, x0)
    torch.manual_seed(5)
    t5 = loss.sample_t(64)
    total = loss.terms(mixture, x0, t5, torch.randn_like(x0))["total"]
    assert value.item() == pytest.approx(total.mean().item() / (2 * math.log(2)), rel=1e-12)


def test_antithetic_times_are_one_shifted_lattice():
    torch.manual_seed(0)
    t = VDMLoss(LearnedNoiseSchedule(shape="linear")).sample_t(8).sort().values
    torch.testing.assert_close(t.diff(), torch.full((7,), 1 / 8), rtol=0, atol=1e-6)
    assert 0 <= t[0] < 1 / 8


def test_vdm_elbo_is_invariant_to_the_learned_shape(mixture):
    """VDM Sec. 5.1: with t ~ U (the schedule's own gamma'), a nonlinear learned schedule gives the ELBO of the
    linear one with the same endpoints; both equal the exact NLL for the exact denoiser."""
    n = 20_000
    x0, _ = mixture.sample(n, generator=torch.Generator().manual_seed(3))
    nll = -mixture.log_prob(x0, 0.0)
    learned = _random_net_schedule(2, gamma_min=2 * math.log(1e-3), gamma_max=2 * math.log(80.0))
    fixed = VE(1e-3, 80.0)
    kw = dict(num_t_samples=4, time_sampling="t")
    res_l = vdm_elbo(mixture, x0, learned, generator=torch.Generator().manual_seed(4), **kw)
    res_f = vdm_elbo(mixture, x0, fixed, generator=torch.Generator().manual_seed(4), **kw)
    assert not res_l.nll_bound.requires_grad  # evaluation builds no graph through the schedule
    for res in (res_l, res_f):
        gap = res.nll_bound - nll
        std_err = gap.std().item() / math.sqrt(n)
        assert std_err < 0.05
        assert abs(gap.mean().item()) < 4 * std_err + 0.01


def _loss_pieces(loss: VDMLoss, denoiser, x0, t, noise):
    terms = loss.terms(denoiser, x0, t, noise)
    return terms["diffusion"], terms["total"]


@pytest.mark.parametrize("variance_minimisation", [True, False])
def test_schedule_gradients_are_brute_force_derivatives(mixture, variance_minimisation):
    """Shape parameters: d mean(L_diff^2) / d eta (VDM's variance minimisation) or d mean(L) / d eta;
    endpoints: d mean(L) / d gamma_{min,max} -- all by central differences of the same loss with fixed t, noise."""
    gen = torch.Generator().manual_seed(6)
    x0, _ = mixture.sample(32, generator=gen)
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    schedule = _random_net_schedule(3, num_features=3, gamma_min=-8.0, gamma_max=4.0)
    loss = VDMLoss(schedule, prior="vp", variance_minimisation=variance_minimisation)
    _, total = _loss_pieces(loss, mixture, x0, t, noise)
    total.mean().backward()

    def numeric(param: torch.Tensor, index: int, objective) -> float:
        h, flat = 1e-6, param.data.view(-1)
        values = []
        for sign in (1, -1):
            flat[index] += sign * h
            with torch.no_grad():
                values.append(objective(*_loss_pieces(loss, mixture, x0, t, noise)).item())
            flat[index] -= sign * h
        return (values[0] - values[1]) / (2 * h)

    def squared(diffusion, total):
        return diffusion.pow(2).mean()

    def plain(diffusion, total):
        return total.mean()

    shape_objective = squared if variance_minimisation else plain
    for param in (schedule.w1, schedule.w2, schedule.b2, schedule.w3):
        for i in range(param.numel()):
            expected = numeric(param, i, shape_objective)
            assert param.grad.view(-1)[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for param in (schedule.gamma_min, schedule.gamma_max):
        assert param.grad.item() == pytest.approx(numeric(param, 0, plain), rel=1e-6, abs=1e-8)
    assert schedule.gamma_min.grad.abs() > 1e-3 and schedule.w2.grad.abs().max() > 1e-3  # not vacuous


def test_denoiser_gets_the_plain_vlb_gradient(mixture):
    """The gradient hook acts on the schedule's shape only: the network's gradient is the VLB's."""
    gen = torch.Generator().manual_seed(7)
    x0, _ = mixture.sample(16, generator=gen)
    t = torch.rand(16, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    shift = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def denoiser(x, sigma, **_):
        return mixture(x, sigma) + shift * sigma[:, None]

    grads = []
    for flag in (True, False):
        loss = VDMLoss(_random_net_schedule(4, num_features=3), variance_minimisation=flag)
        shift.grad = None
        loss.terms(denoiser, x0, t, noise)["total"].mean().backward()
        grads.append(shift.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    assert grads[0].abs().max() > 1e-4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        LearnedNoiseSchedule(5.0, -1.0)
    with pytest.raises(ValueError, match="shape 'cubic'"):
        LearnedNoiseSchedule(shape="cubic")
    with pytest.raises(ValueError, match="num_levels"):
        VDMLoss(num_levels=1)
    with pytest.raises(ValueError, match="prior 'flat'"):
        VDMLoss(prior="flat")
    with pytest.raises(TypeError, match="LearnedNoiseSchedule"):
        VDMLoss(schedule=VE())


@pytest.mark.slow
def test_variance_minimisation_lowers_the_estimators_variance_not_its_mean(mixture):
    """100 Adam steps on the shape alone (exact denoiser, fixed endpoints): the Monte-Carlo variance of
    L_diff(t ~ U) drops (measured 256 -> 216 nats^2) while its mean, the schedule-invariant VLB term, stays."""
    torch.manual_seed(0)
    schedule = LearnedNoiseSchedule(
        2 * math.log(1e-3), 2 * math.log(10.0), num_features=16, learn_endpoints=False
    ).double()
    loss = VDMLoss(schedule, prior="ve")
    x0, _ = mixture.sample(40_000, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(10)
    t = torch.rand(40_000, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def moments() -> tuple[float, float, float]:
        with torch.no_grad():
            diffusion = loss.terms(mixture, x0, t, noise)["diffusion"]
        return diffusion.mean().item(), diffusion.var().item(), diffusion.std().item() / math.sqrt(len(t))

    mean0, var0, se0 = moments()
    opt = torch.optim.Adam(schedule.parameters(), lr=5e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        batch, _ = mixture.sample(256, generator=gen)
        opt.zero_grad()
        loss(mixture, batch).backward()
        opt.step()
    mean1, var1, se1 = moments()
    assert var1 < 0.9 * var0, (var0, var1)
    assert abs(mean1 - mean0) < 4 * math.hypot(se0, se1), (mean0, mean1)
