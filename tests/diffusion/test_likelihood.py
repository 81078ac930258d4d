"""Likelihoods of the exact mixture denoiser against its exact log-density, and the estimators' statistics."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.likelihood import (
    bits_per_dim,
    dequantize,
    divergence,
    gaussian_log_prob,
    make_probes,
    ode_likelihood,
    vdm_elbo,
)
from diffusion_lab.diffusion.schedules import VE, VPCosine, VPLinear

SIGMA_MIN, SIGMA_MAX = 1e-3, 80.0


@pytest.fixture(scope="module")
def data(mixture):
    x0, labels = mixture.sample(12, generator=torch.Generator().manual_seed(7))
    return x0, labels


def test_ode_nll_matches_exact_log_density(mixture, data):
    """PF-ODE with the exact denoiser reproduces -log p_{sigma_min}(x0); RK4 converges at 4th order."""
    x0, _ = data
    exact = -mixture.log_prob(x0, SIGMA_MIN)
    errors = {}
    for steps in (24, 48):
        res = ode_likelihood(mixture, x0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_steps=steps)
        assert res.nfe == 4 * steps
        # integration error alone: swap the N(0, sigma_max^2) prior for the exact p_{sigma_max}
        errors[steps] = (
            (-(res.delta_log_prob + mixture.log_prob(res.x_T, SIGMA_MAX)) - exact).abs().max().item()
        )
    assert errors[48] < 2e-3, errors
    assert errors[24] / errors[48] > 8, errors  # ~2^4 for RK4
    # with the Gaussian prior: + the prior mismatch, O(|mean| |x_T| / sigma_max^2) ~ 4e-3 nats here
    assert (res.nll - exact).abs().max() < 1e-2
    torch.testing.assert_close(res.bpd, res.nll / (2 * math.log(2)))


def test_ode_nll_heun_and_conditional(mixture, data):
    """Heun on the class-conditional density: second-order convergence to -log p(x0 | c)."""
    x0, labels = data
    exact = -mixture.log_prob(x0, SIGMA_MIN, labels)
    errors = {}
    for steps in (64, 128):
        res = ode_likelihood(mixture, x0, num_steps=steps, solver="heun", cond={"labels": labels})
        errors[steps] = (res.nll - exact).abs().max().item()
        assert res.nfe == 2 * steps
    assert errors[128] < 0.06 and errors[64] / errors[128] > 3, errors


def test_exact_divergence_of_linear_map_is_trace(gen):
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    out, div = divergence(lambda z: z @ a.T, x)
    torch.testing.assert_close(div, torch.full((5,), a.trace().item(), dtype=torch.float64))
    torch.testing.assert_close(out, x @ a.T)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(mixture, gen, kind):
    """Mean of many single-probe estimates of div D = exact divergence within 4 standard errors."""
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    sigma = torch.full((4,), 0.2, dtype=torch.float64)
    fn = lambda z: mixture(z, sigma)  # noqa: E731
    _, exact = divergence(fn, x)
    n = 4000
    probes = make_probes(x.expand(n, 4, 2).reshape(n * 4, 2), 1, kind, gen)[0].reshape(n, 4, 2)
    # estimates per probe: v^T J v with J from the exact Jacobian (J computed once, then n quadratic forms)
    jac = torch.autograd.functional.jacobian(fn, x).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (B, 2, 2)
    estimates = torch.einsum("npd,pde,npe->np", probes, jac, probes)
    mean, std_err = estimates.mean(0), estimates.std(0) / math.sqrt(n)
    assert ((mean - exact).abs() < 4 * std_err).all(), (mean, exact, std_err)
    # the divergence() estimator averages exactly these quadratic forms
    _, est = divergence(fn, x, probes[:10])
    torch.testing.assert_close(est, estimates[:10].mean(0))


def test_ode_nll_with_hutchinson_is_unbiased(mixture, data, gen):
    """The path does not depend on the probes, so the Hutchinson NLL is unbiased: 64 runs per point average
    to the exact-divergence NLL within 4 standard errors."""
    x0, _ = data
    reps = 64
    exact_div = ode_likelihood(mixture, x0, num_steps=24)
    res = ode_likelihood(mixture, x0.repeat(reps, 1), num_steps=24, hutchinson=True, generator=gen)
    runs = res.nll.reshape(reps, -1)
    std_err = runs.std(0) / math.sqrt(reps)
    assert ((runs.mean(0) - exact_div.nll).abs() < 4 * std_err + 1e-6).all()
    assert runs.std(0).max() > 0.1  # a single run is noisy: the average is what is tested


def test_vdm_elbo_bounds_and_approaches_exact_nll(mixture):
    """With the exact denoiser the VDM bound is tight up to endpoint terms: E[bound] = NLL within MC error."""
    n = 25_000
    x0, _ = mixture.sample(n, generator=torch.Generator().manual_seed(3))
    nll = -mixture.log_prob(x0, 0.0)
    for schedule in [VE(SIGMA_MIN, SIGMA_MAX), VPLinear(t_min=1e-5)]:
        res = vdm_elbo(mixture, x0, schedule, num_t_samples=4, generator=torch.Generator().manual_seed(4))
        gap = res.nll_bound - nll
        std_err = gap.std() / math.sqrt(n)
        assert std_err < 0.05
        assert gap.mean() > -4 * std_err, (schedule, gap.mean(), std_err)  # an upper bound ...
        assert gap.mean() < 4 * std_err + 0.01, (schedule, gap.mean(), std_err)  # ... that is nearly tight


def test_vdm_elbo_sampling_choices_share_the_expectation(mixture):
    """Uniform-t (VDM) and uniform-log-SNR sampling, with and without control variate, estimate one number."""
    n = 20_000
    x0, _ = mixture.sample(n, generator=torch.Generator().manual_seed(5))
    schedule = VE(SIGMA_MIN, SIGMA_MAX)
    runs = [
        vdm_elbo(mixture, x0, schedule, num_t_samples=2, generator=torch.Generator().manual_seed(6), **kw)
        for kw in [
            {},
            {"time_sampling": "t", "control_variate_sigma_data": None},
            {"control_variate_sigma_data": 1.0},
        ]
    ]
    means = torch.stack([r.nll_bound.mean() for r in runs])
    errs = torch.stack([r.nll_bound.std() / math.sqrt(n) for r in runs])
    assert (means - means[0]).abs().max() < 4 * (errs**2 + errs[0] ** 2).sqrt().max()
    # the closed-form terms do not depend on the sampling
    torch.testing.assert_close(runs[0].prior + runs[0].reconstruction, runs[1].prior + runs[1].reconstruction)


def test_vdm_elbo_grows_by_the_denoisers_excess_error(mixture):
    """E||x - D - delta||^2 = MMSE + ||delta||^2, so delta = c sigma (1, 1) adds exactly
    int c^2 d sigma^2 / sigma^3 dsigma = 2 c^2 log(sigma_max / sigma_min) nats."""
    n, c = 2000, 0.3
    x0, _ = mixture.sample(n, generator=torch.Generator().manual_seed(8))
    schedule = VE(SIGMA_MIN, SIGMA_MAX)
    shifted = lambda x, sigma, **k: mixture(x, sigma) + c * sigma[:, None]  # noqa: E731
    base = vdm_elbo(mixture, x0, schedule, num_t_samples=4, generator=torch.Generator().manual_seed(9))
    worse = vdm_elbo(shifted, x0, schedule, num_t_samples=4, generator=torch.Generator().manual_seed(9))
    excess = worse.nll_bound - base.nll_bound
    expected = 2 * c**2 * math.log(SIGMA_MAX / SIGMA_MIN)
    # stratified sampling of a sigma-independent integrand in log-SNR: exact up to the cross term's noise
    assert abs(excess.mean().item() - expected) < 4 * excess.std().item() / math.sqrt(n) + 1e-9


def test_vdm_elbo_schedule_with_clipped_log_snr(mixture):
    """The cosine schedule's range [e^-10, e^10] gives a valid bound too (log-SNR sampling)."""
    n = 20_000
    x0, _ = mixture.sample(n, generator=torch.Generator().manual_seed(10))
    res = vdm_elbo(mixture, x0, VPCosine(), num_t_samples=4, generator=torch.Generator().manual_seed(11))
    gap = res.nll_bound - (-mixture.log_prob(x0, 0.0))
    assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(n) + 0.01


def test_bits_per_dim_dequantisation_term_is_exact():
    """Uniform density on [-1 - D/2, 1 + D/2]^d (D = 2/255): each 8-bit bin has mass 1/256: 8 bits/dim."""
    d, delta = 3, 2 / 255
    nll_continuous = torch.tensor([d * math.log(2 + delta)])
    assert bits_per_dim(nll_continuous, d, num_levels=256).item() == pytest.approx(8.0)
    assert bits_per_dim(nll_continuous, d).item() == pytest.approx(math.log2(2 + delta))


def test_dequantize_stays_in_its_bin(gen):
    k = torch.randint(0, 256, (1000,), generator=gen)
    x = k / 127.5 - 1
    y = dequantize(x.double(), 256, gen)
    assert torch.equal(torch.round((y + 1) * 127.5).long(), k)
    assert (y - x).abs().max() <= 1 / 255 + 1e-12


def test_gaussian_log_prob(gen):
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 2.0).log_prob(x).sum((1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, 4.0), expected)


def test_bad_arguments_raise(mixture, data):
    x0, _ = data
    with pytest.raises(ValueError, match="sigma_min"):
        ode_likelihood(mixture, x0, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="solver"):
        ode_likelihood(mixture, x0, solver="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probe"):
        make_probes(x0, 1, "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time_sampling"):
        vdm_elbo(mixture, x0, VE(), time_sampling="sigma")  # type: ignore[arg-type]
