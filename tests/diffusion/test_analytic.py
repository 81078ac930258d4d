"""The analytic Gaussian-mixture denoiser against brute force: quadrature, autograd and sampling."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal


def _noisy_log_density(mixture, x, sigma, labels=None):
    """log p_sigma(x) computed independently with torch.distributions, optionally for one class."""
    keep = (
        torch.ones_like(mixture.weights, dtype=torch.bool)
        if labels is None
        else mixture.component_labels == labels
    )
    covs = mixture.covs[keep] + sigma**2 * torch.eye(2, dtype=torch.float64)
    comps = MultivariateNormal(mixture.means[keep], covariance_matrix=covs)
    log_w = torch.log(mixture.weights[keep] / mixture.weights[keep].sum())
    return torch.logsumexp(comps.log_prob(x[:, None, :]) + log_w, -1)


SPACING = 0.0125


@pytest.fixture(scope="module")
def grid(mixture):
    """A 361 x 361 quadrature grid on [-2.25, 2.25]^2 and the clean log-density there (all, class 1)."""
    axis = torch.arange(-180, 181, dtype=torch.float64) * SPACING
    points = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return points, {
        None: _noisy_log_density(mixture, points, 0.0),
        1: _noisy_log_density(mixture, points, 0.0, 1),
    }


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.5])
@pytest.mark.parametrize("label", [None, 1])
def test_denoiser_equals_quadrature_posterior_mean(mixture, grid, gen, sigma, label):
    """E[x0 | x] = int x0 p(x0) N(x; x0, sigma^2) dx0 / int p(x0) N(x; x0, sigma^2) dx0 on a fine grid."""
    points, log_prior = grid
    x0, _ = mixture.sample(6, generator=gen)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    log_lik = -((x[:, None, :] - points[None]) ** 2).sum(-1) / (2 * sigma**2)  # (B, G)
    post = torch.softmax(log_prior[label][None] + log_lik, -1)
    expected = post @ points
    labels = None if label is None else torch.full((6,), label)
    torch.testing.assert_close(
        mixture(x, torch.full((6,), sigma, dtype=torch.float64), labels), expected, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("sigma", [0.0, 0.2, 3.0])
def test_log_prob_matches_independent_density(mixture, gen, sigma):
    x = 2 * torch.randn(16, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(x, sigma), _noisy_log_density(mixture, x, sigma))
    torch.testing.assert_close(
        mixture.log_prob(x, sigma, torch.full((16,), 2)), _noisy_log_density(mixture, x, sigma, 2)
    )


def test_log_prob_normalises(mixture, grid):
    mass = mixture.log_prob(grid[0], 0.1).exp().sum() * SPACING**2
    assert mass.item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 4.0])
def test_score_is_gradient_of_log_prob(mixture, gen, sigma):
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach(), torch.tensor(sigma, dtype=torch.float64)), grad)
    labels = torch.zeros(10, dtype=torch.long)
    (grad_c,) = torch.autograd.grad(mixture.log_prob(x, sigma, labels).sum(), x)
    torch.testing.assert_close(
        mixture.score(x.detach(), torch.tensor(sigma, dtype=torch.float64), labels), grad_c
    )


def test_class_posterior_is_bayes(mixture, gen):
    x, sigma = torch.randn(12, 2, generator=gen, dtype=torch.float64), 0.4
    prior = torch.stack([mixture.weights[mixture.component_labels == c].sum() for c in range(3)])
    joint = torch.stack([_noisy_log_density(mixture, x, sigma, c) for c in range(3)], -1) + prior.log()
    expected = joint - torch.logsumexp(joint, -1, keepdim=True)
    torch.testing.assert_close(
        mixture.class_log_posterior(x, torch.tensor(sigma, dtype=torch.float64)), expected
    )


def test_samples_match_mean_covariance_and_class_weights(mixture):
    n = 100_000
    x, labels = mixture.sample(n, generator=torch.Generator().manual_seed(0))
    mean, cov = mixture.mean_and_cov()
    std_err = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * std_err).all()
    # sample covariance: the std error of an entry is below sqrt(2 max var^2 / n)
    assert (torch.cov(x.T) - cov).abs().max() < 4 * (2 * cov.diagonal().max() ** 2 / n) ** 0.5
    freq = torch.bincount(labels, minlength=3).double() / n
    prior = torch.stack([mixture.weights[mixture.component_labels == c].sum() for c in range(3)])
    assert ((freq - prior).abs() < 4 * (prior * (1 - prior) / n).sqrt()).all()
    x1, lab1 = mixture.sample(20_000, labels=torch.tensor(1), generator=torch.Generator().manual_seed(1))
    assert (lab1 == 1).all()
    mean1, cov1 = mixture.mean_and_cov(1)
    assert ((x1.mean(0) - mean1).abs() < 4 * (cov1.diagonal() / 20_000).sqrt()).all()


def test_null_label_is_unconditional(mixture, gen):
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    sigma = torch.full((7,), 0.3, dtype=torch.float64)
    null = torch.full((7,), mixture.null_label)
    torch.testing.assert_close(mixture(x, sigma, null), mixture(x, sigma))
    assert mixture.null_label == mixture.num_classes == 3
