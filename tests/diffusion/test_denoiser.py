"""Denoiser contract: target conversions, EDM preconditioning values, every parametrisation recovers x0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.denoiser import (
    Denoiser,
    broadcast_sigma,
    eps_to_x0,
    preconditioning,
    score_to_x0,
    v_to_x0,
    x0_to_eps,
    x0_to_score,
    x0_to_v,
)

PARAMETRIZATIONS = ["edm", "eps", "x0", "v", "score"]


@pytest.fixture
def batch(gen):
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    return x0, eps, sigma, x0 + sigma.reshape(-1, 1, 1, 1) * eps


def test_conversions_round_trip(batch):
    x0, eps, sigma, x = batch
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps_to_x0(x, eps, sigma), x0)
    torch.testing.assert_close(x0_to_eps(x, x0, sigma), eps)
    # v = alpha_vp eps - sigma_vp x0 with the VP quantities of sigma (Salimans & Ho 2022, eq. in Sec. 4)
    alpha_vp, sigma_vp = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    v = alpha_vp * eps - sigma_vp * x0
    torch.testing.assert_close(x0_to_v(x, x0, sigma), v)
    torch.testing.assert_close(v_to_x0(x, v, sigma), x0)
    # Tweedie: score of q(x | x0) is -(x - x0)/sigma^2 = -eps/sigma
    torch.testing.assert_close(x0_to_score(x, x0, sigma), -eps / s)
    torch.testing.assert_close(score_to_x0(x, -eps / s, sigma), x0)
    # x0 = alpha_vp x_vp - sigma_vp v with x_vp = alpha_vp x0 + sigma_vp eps
    x_vp = alpha_vp * x0 + sigma_vp * eps
    torch.testing.assert_close(alpha_vp * x_vp - sigma_vp * v, x0)


def test_edm_preconditioning_values():
    """EDM Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2)."""
    sigma, sd = 1.3, 0.5
    c_skip, c_out, c_in = preconditioning("edm", torch.tensor([sigma], dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.25 / (1.69 + 0.25))
    assert c_out.item() == pytest.approx(1.3 * 0.5 / math.sqrt(1.94))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.94))

    class Zero(nn.Module):
        def forward(self, x, c_noise):
            return torch.zeros_like(x)

    x = torch.randn(2, 3, dtype=torch.float64)
    out = Denoiser(Zero(), "edm", sigma_data=sd)(x, sigma)
    torch.testing.assert_close(out, x * 0.25 / 1.94)


class Oracle(nn.Module):
    """Returns a fixed tensor and records what it was called with."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output, self.calls = output, []

    def forward(self, x_in, c_noise):
        self.calls.append((x_in, c_noise))
        return self.output


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_network_predicting_raw_target_gives_x0(batch, parametrization):
    x0, eps, sigma, x = batch
    target = Denoiser(nn.Identity(), parametrization).raw_target(x0, eps, sigma)
    denoiser = Denoiser(Oracle(target), parametrization)
    torch.testing.assert_close(denoiser(x, sigma), x0)


@pytest.mark.parametrize(
    "parametrization, target",
    [
        ("eps", lambda x0, eps, av, sv: eps),
        ("x0", lambda x0, eps, av, sv: x0),
        ("v", lambda x0, eps, av, sv: av * eps - sv * x0),
        ("score", lambda x0, eps, av, sv: -eps),  # sigma * grad log q(x | x0)
    ],
)
def test_classic_parametrisations_from_their_definitions(batch, parametrization, target):
    """A net predicting the textbook target (computed here, not by raw_target) gives x0; it sees x_vp."""
    x0, eps, sigma, x = batch
    s = sigma.reshape(-1, 1, 1, 1)
    av, sv = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    net = Oracle(target(x0, eps, av, sv))
    torch.testing.assert_close(Denoiser(net, parametrization)(x, sigma), x0)
    torch.testing.assert_close(net.calls[0][0], av * x)  # the VP-scaled input alpha x0 + sigma_vp eps
    torch.testing.assert_close(net.calls[0][1], sigma.log() / 4)


def test_broadcast_sigma():
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert broadcast_sigma(0.5, x).shape == (3,) and broadcast_sigma(0.1, x).dtype == torch.float64
    assert broadcast_sigma(torch.tensor(2, dtype=torch.int64), x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="batch size 3"):
        broadcast_sigma(torch.ones(2), x)


def test_bad_parametrization_raises():
    with pytest.raises(ValueError, match="unknown parametrization"):
        Denoiser(nn.Identity(), "eps2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vp_t"):
        Denoiser(nn.Identity(), "eps", noise_conditioning="vp_t")
