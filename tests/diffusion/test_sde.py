"""VE / VP / sub-VP SDEs against their closed forms and the NCSN / DDPM chains at the native steps.

Truths used: Score SDE's published formulas written out in the test (sub-VP std ``1 - exp(2 log_mean_coeff)``
of the reference implementation, DDPM's ``linspace(1e-4, 0.02, 1000)``, ``numpy.geomspace`` levels), exact
variance propagation, quadrature, and the samplers of ``diffusion.samplers`` run with the same noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.samplers import sample_ddpm, sample_pc
from diffusion_lab.diffusion.schedules import VE, DiscreteVP, SubVP, VPLinear
from diffusion_lab.diffusion.sde import (
    ddpm_ancestral_step_vp,
    ddpm_betas,
    euler_maruyama_variance,
    ncsn_levels,
    variance_ode_rk4,
    ve_forward_step,
    ve_reverse_step,
    vp_forward_step,
)

BETA_MIN, BETA_MAX = 0.1, 20.0


def _score_sde_subvp_std(t: np.ndarray) -> np.ndarray:
    """Score SDE reference code (sde_lib.subVPSDE.marginal_prob): std = 1 - exp(2 log_mean_coeff)."""
    log_mean_coeff = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    return 1 - np.exp(2 * log_mean_coeff)


# ------------------------------------------------------------------ sub-VP marginal variance
@pytest.mark.parametrize("variance0", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("t1", [0.05, 0.3, 1.0])
def test_subvp_marginal_variance_matches_closed_form(variance0, t1):
    """Var x(t) = e^{-B} Var x(0) + (1 - e^{-B})^2: the variance ODE dS/dt = 2 f S + g^2 solved by RK4."""
    schedule = SubVP(BETA_MIN, BETA_MAX)
    numeric = variance_ode_rk4(schedule, 0.0, t1, variance0, num_steps=400)
    t = np.array(t1)
    closed = math.exp(2 * (-0.25 * t1**2 * (BETA_MAX - BETA_MIN) - 0.5 * t1 * BETA_MIN)) * variance0
    closed += float(_score_sde_subvp_std(t)) ** 2
    assert numeric == pytest.approx(closed, rel=1e-9, abs=1e-12)
    tt = torch.tensor(t1, dtype=torch.float64)
    assert float(schedule.marginal_variance(tt)) == pytest.approx(
        float(_score_sde_subvp_std(t)) ** 2, rel=1e-12
    )


def test_subvp_variance_below_vp_and_euler_maruyama_converges_first_order():
    """Sub-VP variance < VP variance (Score SDE eq. 29), and the discretised chain's variance converges at O(dt)."""
    sub, vp = SubVP(BETA_MIN, BETA_MAX), VPLinear(BETA_MIN, BETA_MAX)
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert (sub.marginal_variance(t) < vp.sigma(t) ** 2).all()
    closed = float(_score_sde_subvp_std(np.array(1.0))) ** 2
    errors = []
    for n in (100, 200, 400):
        chain = euler_maruyama_variance(sub, torch.linspace(0, 1, n + 1, dtype=torch.float64))
        errors.append(abs(float(chain[-1]) - closed))
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.1)
    assert errors[1] / errors[2] == pytest.approx(2, rel=0.1)


def test_subvp_monte_carlo_matches_closed_form():
    """Simulating the sub-VP SDE (fine Euler-Maruyama) from point mass data: empirical variance = closed form."""
    sub = SubVP(BETA_MIN, BETA_MAX)
    gen = torch.Generator().manual_seed(0)
    n, steps, t_end = 200_000, 400, 0.5
    x = torch.zeros(n, dtype=torch.float64)
    t = torch.linspace(0, t_end, steps + 1, dtype=torch.float64)
    f, g2 = sub.sde_drift_coef(t[:-1]), sub.sde_diffusion_sq(t[:-1])
    dt = t_end / steps
    for i in range(steps):
        x = x + f[i] * x * dt + torch.sqrt(g2[i] * dt) * torch.randn(n, generator=gen, dtype=torch.float64)
    closed = float(_score_sde_subvp_std(np.array(t_end))) ** 2
    se = closed * math.sqrt(2 / n)  # standard error of a Gaussian sample variance
    assert float(x.var()) == pytest.approx(closed, abs=5 * se + 0.01 * closed)


# ------------------------------------------------------------------ VE SDE = NCSN chain
def test_ve_native_levels_are_ncsn_geometric_levels():
    levels = ncsn_levels(VE(0.01, 50.0), 232)
    np.testing.assert_allclose(levels.numpy(), np.geomspace(0.01, 50.0, 232), rtol=1e-12)


def test_ve_sde_noise_over_a_native_step_equals_ncsn_increment():
    """int_{t_{i-1}}^{t_i} g^2 dt (Gauss-Legendre) = sigma_i^2 - sigma_{i-1}^2, the NCSN chain's added variance."""
    schedule, n = VE(0.01, 50.0), 10
    levels = ncsn_levels(schedule, n)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    nodes, weights = np.polynomial.legendre.leggauss(20)
    for i in range(1, n):
        a, b = float(t[i - 1]), float(t[i])
        tq = torch.tensor((b - a) / 2 * nodes + (a + b) / 2)
        integral = float((b - a) / 2 * (torch.tensor(weights) * schedule.sde_diffusion_sq(tq)).sum())
        assert integral == pytest.approx(float(levels[i] ** 2 - levels[i - 1] ** 2), rel=1e-10)


def test_ncsn_chain_marginal_equals_perturbation_kernel():
    """x_1 = x0 + sigma_1 z, then the chain: x_i - x0 has std sigma_i exactly (Monte Carlo, fixed seed)."""
    levels = ncsn_levels(VE(0.01, 5.0), 6).tolist()
    gen = torch.Generator().manual_seed(1)
    n = 100_000
    x = levels[0] * torch.randn(n, generator=gen, dtype=torch.float64)
    for prev, nxt in zip(levels[:-1], levels[1:]):
        x = ve_forward_step(x, prev, nxt, torch.randn(n, generator=gen, dtype=torch.float64))
    assert float(x.std()) == pytest.approx(levels[-1], rel=5 * math.sqrt(0.5 / n))


@pytest.mark.parametrize(
    ("predictor", "kind"), [("reverse_diffusion", "reverse_diffusion"), ("ancestral", "ancestral")]
)
def test_pc_predictor_equals_score_sde_ve_step(predictor, kind):
    """One step of the core PC sampler (no corrector) = Score SDE's VE reverse step with the exact score."""
    mixture = toy_mixture_2d().double()
    levels = ncsn_levels(VE(0.01, 5.0), 8).flip(0)
    sigma, sigma_next = float(levels[0]), float(levels[1])
    x = sigma * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64)
    states = []
    sample_pc(
        mixture,
        x.clone(),
        grid,
        predictor=predictor,
        n_corrector_steps=0,
        generator=torch.Generator().manual_seed(3),
        callback=lambda info: states.append(info["x"].clone()),
    )
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = (mixture(x, torch.full((16,), sigma, dtype=torch.float64)) - x) / sigma**2
    expected = ve_reverse_step(x, score, sigma, sigma_next, noise, kind)
    torch.testing.assert_close(states[1], expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ VP SDE = DDPM chain
def test_vp_native_betas_are_ddpm_betas():
    betas = ddpm_betas(VPLinear(BETA_MIN, BETA_MAX), 1000)
    torch.testing.assert_close(
        betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(betas, DiscreteVP().betas, rtol=1e-12, atol=0)


def test_ddpm_chain_marginal_is_alphas_cumprod():
    """DDPM chain from x0 = 1: mean prod sqrt(1 - beta) and variance 1 - prod(1 - beta) (exact propagation)."""
    betas = ddpm_betas(VPLinear(BETA_MIN, BETA_MAX), 1000)
    mean, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for beta in betas.tolist():
        mean = vp_forward_step(mean, beta, torch.zeros((), dtype=torch.float64))
        var = (1 - beta) * var + beta
    abar = DiscreteVP().alphas_cumprod[-1]
    torch.testing.assert_close(mean, abar.sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(var, 1 - abar, rtol=1e-10, atol=0)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_core_ddpm_sampler_equals_ho_et_al_step_at_native_steps(variance, t):
    """sample_ddpm on DDPM's own levels (VE view) = Ho et al. Alg. 2 in VP coordinates, x_vp = sqrt(abar) x_ve."""
    mixture = toy_mixture_2d().double()
    schedule = DiscreteVP()
    abar, sigmas = schedule.alphas_cumprod, schedule.sigmas
    sigma, sigma_next = float(sigmas[t]), float(sigmas[t - 1])
    x_ve = sigma * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    states = []
    sample_ddpm(
        mixture,
        x_ve.clone(),
        torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64),
        variance=variance,
        generator=torch.Generator().manual_seed(5),
        callback=lambda info: states.append(info["x"].clone()),
    )
    noise = torch.randn(x_ve.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = (x_ve - mixture(x_ve, torch.full((8,), sigma, dtype=torch.float64))) / sigma
    x_vp_next = ddpm_ancestral_step_vp(abar[t].sqrt() * x_ve, eps, abar, t, noise, variance)
    torch.testing.assert_close(abar[t - 1].sqrt() * states[1], x_vp_next, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ errors
def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="num_steps"):
        ncsn_levels(VE(), 1)
    with pytest.raises(ValueError, match="beta must be in"):
        vp_forward_step(torch.zeros(1), 1.5, torch.zeros(1))
    with pytest.raises(ValueError, match="sigma_prev <= sigma_next"):
        ve_forward_step(torch.zeros(1), 2.0, 1.0, torch.zeros(1))
    with pytest.raises(ValueError, match="unknown kind"):
        ve_reverse_step(torch.zeros(1), torch.zeros(1), 2.0, 1.0, torch.zeros(1), "bogus")
    with pytest.raises(ValueError, match=r"t must be in \[1, 999\]"):
        ddpm_ancestral_step_vp(torch.zeros(1), torch.zeros(1), DiscreteVP().alphas_cumprod, 0, torch.zeros(1))
    with pytest.raises(ValueError, match="strictly increasing"):
        euler_maruyama_variance(SubVP(), torch.tensor([0.0, 0.0]))
