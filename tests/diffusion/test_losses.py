"""DenoisingLoss: weightings reproduce each formulation's own loss; sigma samplers follow their laws;
the exact (Tweedie) denoiser minimises the loss."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.denoiser import Denoiser, preconditioning
from diffusion_lab.diffusion.losses import (
    DenoisingLoss,
    GeometricLevelsSigma,
    LogNormalSigma,
    LogUniformSigma,
    UniformTimeSigma,
    loss_weight,
)


class RandomNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, c_noise, **_):
        return self.lin(torch.cat([x, c_noise.reshape(-1, 1).expand(-1, 1)], 1))


@pytest.mark.parametrize("param,weighting", [("eps", "eps"), ("v", "v"), ("x0", "x0"), ("edm", "edm")])
def test_weighting_equals_native_parametrisation_loss(param, weighting):
    """lambda(sigma)||D - x0||^2 == ||F - F_target||^2 of the parametrisation's own raw target (EDM eq. 8)."""
    torch.manual_seed(0)
    den = Denoiser(RandomNet(), param, sigma_data=0.5)
    x0, noise = torch.randn(64, 2), torch.randn(64, 2)
    sigma = torch.exp(torch.randn(64))
    loss = DenoisingLoss(weighting=weighting, sigma_data=0.5)
    ours = loss.per_sample(den, x0, sigma, noise)
    _, _, c_in = preconditioning(param, sigma, 0.5)
    x = x0 + sigma[:, None] * noise
    raw = den.network(c_in[:, None] * x, den.c_noise(sigma))
    native = ((raw - den.raw_target(x0, noise, sigma)) ** 2).mean(1)
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-5)


def test_eps_weighting_is_ddpm_simple_loss():
    """With an eps-predicting net, weighting 'eps' gives exactly ||eps - eps_hat||^2 (Ho et al. 2020, L_simple)."""
    torch.manual_seed(1)
    net = RandomNet()
    den = Denoiser(net, "eps")
    x0, noise, sigma = torch.randn(32, 2), torch.randn(32, 2), torch.rand(32) * 3 + 0.1
    x = x0 + sigma[:, None] * noise
    eps_hat = net(x / torch.sqrt(1 + sigma[:, None] ** 2), den.c_noise(sigma))
    expected = ((eps_hat - noise) ** 2).mean(1)
    got = DenoisingLoss(weighting="eps").per_sample(den, x0, sigma, noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_snr_trunc_weight():
    sigma = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(loss_weight("snr_trunc", sigma), torch.tensor([4.0, 1.0, 1.0]))


def test_lognormal_sigma_law():
    torch.manual_seed(0)
    s = LogNormalSigma(-1.2, 1.2)(200_000)
    assert abs(s.log().mean().item() + 1.2) < 0.01 and abs(s.log().std().item() - 1.2) < 0.01


def test_loguniform_sigma_law():
    torch.manual_seed(0)
    s = LogUniformSigma(0.01, 50.0)(200_000)
    u = (s.log() - math.log(0.01)) / (math.log(50.0) - math.log(0.01))
    assert s.min() >= 0.01 and s.max() <= 50.0
    # uniform on [0, 1]: mean 1/2, variance 1/12
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_geometric_levels_are_ncsn_levels_drawn_uniformly():
    """NCSN / NCSNv2: sigma_i = geomspace(sigma_max, sigma_min, L), i ~ U{1..L} (chi-square test of the counts);
    the levels are the annealed-Langevin grid (``loglinear`` with steps = L)."""
    import numpy as np

    from diffusion_lab.diffusion.samplers import get_sigmas

    sampler = GeometricLevelsSigma(sigma_min=0.01, sigma_max=50.0, num_levels=232)
    levels = np.geomspace(50.0, 0.01, 232)
    np.testing.assert_allclose(sampler.levels.numpy(), levels, rtol=1e-12)
    np.testing.assert_allclose(
        sampler.levels.numpy(),
        get_sigmas("loglinear", 232, sigma_min=0.01, sigma_max=50.0)[:-1].numpy(),
        rtol=1e-12,
    )
    torch.manual_seed(0)
    small = GeometricLevelsSigma(0.01, 20.0, num_levels=10)
    raw = small(100_000)
    assert raw.dtype == torch.get_default_dtype()
    s = raw.double()
    # every draw is one of the levels (to float32 rounding) ...
    dist = (s[:, None].log() - small.levels[None].log()).abs()
    assert dist.min(1).values.max() < 1e-6
    # ... with equal probabilities: Pearson chi-square, 9 dof (99.9% quantile 27.9)
    counts = torch.bincount(dist.argmin(1), minlength=10).double()
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum().item()
    assert chi2 < 27.9
    with pytest.raises(ValueError, match="num_levels"):
        GeometricLevelsSigma(0.01, 1.0, num_levels=1)
    with pytest.raises(ValueError, match="sigma_min"):
        GeometricLevelsSigma(1.0, 0.01, num_levels=10)


def test_vp_sigma_matches_vp_sde_marginal():
    """sigma = sigma_vp/alpha of the linear VP SDE: 1/(1+sigma^2) = exp(-int_0^t beta) (Song et al. 2021, eq. 33)."""
    torch.manual_seed(0)
    from diffusion_lab.diffusion.schedules import VPLinear

    sampler = UniformTimeSigma(VPLinear(beta_min=0.1, beta_max=20.0), t_min=1e-3)
    s = sampler(100_000).double()
    t = torch.linspace(1e-3, 1, 50001, dtype=torch.float64)
    alpha2 = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))  # beta_max - beta_min = 19.9
    sigma_grid = torch.sqrt((1 - alpha2) / alpha2)
    # the law of sigma is the push-forward of U[eps_t, 1]: compare quantiles
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    expected = torch.quantile(sigma_grid, q)
    torch.testing.assert_close(torch.quantile(s, q), expected, rtol=0.03, atol=1e-3)


def test_exact_denoiser_minimises_loss():
    """Tweedie's posterior mean is the MMSE estimator: any perturbation of it raises the DSM loss."""
    torch.manual_seed(0)
    mix = toy_mixture_2d()
    x0, _ = mix.sample(20_000, generator=torch.Generator().manual_seed(0))
    x0 = x0.float()
    noise = torch.randn_like(x0)
    sigma = torch.full((len(x0),), 0.4)
    loss = DenoisingLoss(weighting="x0")
    optimum = loss.per_sample(mix, x0, sigma, noise).mean()
    for delta in (0.05, -0.05):

        def shifted(x, s, delta=delta, **c):
            return mix(x, s, **c) + delta

        assert loss.per_sample(shifted, x0, sigma, noise).mean() > optimum + 0.5 * delta**2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="weighting 'foo'"):
        DenoisingLoss(weighting="foo")
    with pytest.raises(ValueError, match="sigma_min"):
        LogUniformSigma(1.0, 0.5)
