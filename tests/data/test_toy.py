"""GaussianMixture2D: samples follow the exact mixture (moments, class proportions) and are seeded."""

from __future__ import annotations

import torch

from diffusion_lab.data.toy import GaussianMixture2D
from diffusion_lab.diffusion.analytic import toy_mixture_2d


def _assert_moments_match(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean within 5 standard errors (sqrt(diag(cov)/n)); sample covariance within 5 standard
    errors estimated from the samples' own fourth moments (Var of (x_i - m_i)(x_j - m_j))."""
    x = x.double()
    n = x.shape[0]
    assert ((x.mean(0) - mean).abs() < 5 * (cov.diagonal() / n).sqrt()).all()
    centred = x - mean
    products = centred[:, :, None] * centred[:, None, :]  # (n, 2, 2)
    se = (products.var(0) / n).sqrt()
    assert ((products.mean(0) - cov).abs() < 5 * se).all()


def test_properties_and_mixture():
    dm = GaussianMixture2D(num_classes=4, components_per_class=2, std=0.2, mixture_seed=1)
    assert (dm.num_channels, dm.data_dim, dm.resolution, dm.num_classes, dm.data_shape) == (
        2,
        2,
        None,
        4,
        (2,),
    )
    ref = toy_mixture_2d(4, 2, 0.2, seed=1)
    assert torch.equal(dm.mixture.means, ref.means) and torch.equal(dm.mixture.covs, ref.covs)


def test_samples_match_exact_moments_overall_and_per_class():
    dm = GaussianMixture2D(num_train=20000, num_val=10)
    dm.setup()
    x, y = dm.train_set.images, dm.train_set.labels
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    _assert_moments_match(x, *dm.mixture.mean_and_cov())
    for c in range(3):
        _assert_moments_match(x[y == c], *dm.mixture.mean_and_cov(labels=c))
        p = float(dm.mixture.weights[dm.mixture.component_labels == c].sum())
        assert abs(float((y == c).double().mean()) - p) < 5 * (p * (1 - p) / len(y)) ** 0.5


def test_seeded_and_splits_differ():
    a, b = (
        GaussianMixture2D(num_train=50, num_val=50, seed=7),
        GaussianMixture2D(num_train=50, num_val=50, seed=7),
    )
    a.setup()
    b.setup()
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.train_set.images, a.val_set.images)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (50, 2) and y.shape == (50,)
