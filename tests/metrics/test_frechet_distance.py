"""FID / KID / IS from the factory against independent numpy/scipy computations and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion_lab.data.digits import Digits
from diffusion_lab.metrics.distances import frechet_distance, kernel_inception_distance
from diffusion_lab.metrics.factory import (
    QualityConfig,
    build_fid,
    build_inception_score,
    build_kid,
    load_reference_into_fid,
    quality_from_features,
)
from diffusion_lab.metrics.features import PassThroughExtractor, build_feature_extractor
from diffusion_lab.metrics.reference_stats import ReferenceStats


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Heusel et al. 2017 with scipy's matrix square root (the pytorch-fid recipe)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def exact_moment_samples(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose *sample* mean and unbiased covariance equal ``mean`` and ``cov`` exactly."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return z @ whiten @ torch.linalg.cholesky(cov).T + mean


@pytest.fixture(scope="module")
def digits_splits():
    dm = Digits(val_fraction=0.1, seed=0)
    dm.setup("fit")
    return dm.train_set.images, dm.val_set.images


def test_factory_fid_equals_scipy_on_same_features(digits_splits):
    train, val = digits_splits
    extractor = build_feature_extractor("feature_net")
    fid = build_fid(extractor)
    fid.update(train, real=True)
    fid.update(val, real=False)
    got = float(fid.compute())
    expected = scipy_fid(extractor(train)[0].double().numpy(), extractor(val)[0].double().numpy())
    assert got == pytest.approx(expected, rel=1e-3)
    assert expected > 0.1  # a real difference, not a degenerate 0 == 0


def test_fid_of_a_set_with_itself_is_zero(digits_splits):
    train, _ = digits_splits
    fid = build_fid("feature_net")
    fid.update(train, real=True)
    fid.update(train, real=False)
    features = build_feature_extractor("feature_net")(train)[0]
    scale = float(features.var(0).sum())  # trace of the covariance: the size of a typical FID term
    assert abs(float(fid.compute())) < 1e-4 * scale


@pytest.mark.parametrize("dim", [2, 16])
def test_fid_of_shifted_gaussians_matches_closed_form(dim):
    """FID(N(m1, A), N(m2, B)) for diagonal A, B is ||m1 - m2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    g = torch.Generator().manual_seed(dim)
    m1, m2 = (
        torch.randn(dim, generator=g, dtype=torch.float64),
        torch.randn(dim, generator=g, dtype=torch.float64),
    )
    a = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    x = exact_moment_samples(400, m1, torch.diag(a), seed=1)
    y = exact_moment_samples(300, m2, torch.diag(b), seed=2)
    fid = build_fid(PassThroughExtractor(dim))
    fid.update(x.float(), real=True)
    fid.update(y.float(), real=False)
    closed_form = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert float(fid.compute()) == pytest.approx(closed_form, rel=1e-4, abs=1e-4)


def test_fid_same_covariance_shifted_mean_is_squared_shift():
    dim = 8
    g = torch.Generator().manual_seed(0)
    root = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = root @ root.T + 0.1 * torch.eye(dim, dtype=torch.float64)  # a full, non-diagonal covariance
    shift = torch.full((dim,), 0.75, dtype=torch.float64)
    x = exact_moment_samples(500, torch.zeros(dim, dtype=torch.float64), cov, seed=3)
    y = exact_moment_samples(500, shift, cov, seed=4)
    fid = build_fid(PassThroughExtractor(dim))
    fid.update(x.float(), real=True)
    fid.update(y.float(), real=False)
    assert float(fid.compute()) == pytest.approx(float(shift.square().sum()), rel=1e-3)


def test_reference_statistics_give_the_same_fid_as_real_features():
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(300, 6, generator=g), torch.randn(200, 6, generator=g) * 1.3 + 0.2
    direct = build_fid(PassThroughExtractor(6))
    direct.update(real, real=True)
    direct.update(fake, real=False)
    cached = build_fid(PassThroughExtractor(6), reset_real_features=False)
    load_reference_into_fid(cached, ReferenceStats.from_features(real))
    cached.update(fake, real=False)
    assert float(cached.compute()) == pytest.approx(float(direct.compute()), rel=1e-6)
    cached.reset()  # keeps the reference, drops the fakes
    cached.update(real, real=False)
    assert abs(float(cached.compute())) < 1e-5


def test_quality_fid_matches_scipy():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(500, 5, generator=g), torch.randn(400, 5, generator=g) * 0.8 + 0.3
    results = quality_from_features(ReferenceStats.from_features(real), fake, config=QualityConfig(kid=False))
    assert results["fid"] == pytest.approx(scipy_fid(real.double().numpy(), fake.double().numpy()), rel=1e-3)


def numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3 (Binkowski et al. 2018, eq. 3) on the full sets."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = x.shape[0]
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_on_full_sets_matches_numpy_mmd():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g) + 0.5
    kid = build_kid(PassThroughExtractor(4), subsets=1, subset_size=60)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    expected = numpy_kid(real.double().numpy(), fake.double().numpy())
    assert float(kid.compute()[0]) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.01


@pytest.mark.filterwarnings(r"ignore:std\(\). degrees of freedom")
def test_inception_score_matches_definition():
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), one split."""
    logits = torch.randn(100, 10, generator=torch.Generator().manual_seed(8)) * 3
    score = build_inception_score(PassThroughLogits(10), splits=1)
    score.update(logits)
    p = logits.double().softmax(1).numpy()
    marginal = p.mean(0, keepdims=True)
    expected = np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean())
    assert float(score.compute()[0]) == pytest.approx(expected, rel=1e-4)


class PassThroughLogits(PassThroughExtractor):
    """Inputs are logits: the IS head reads them as the classifier output."""

    def __init__(self, num_logits: int) -> None:
        super().__init__(num_logits)
        self.num_logits = num_logits

    def forward(self, x):
        return x, x


def test_quality_is_deterministic_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(9)
    real, fake = torch.randn(200, 4, generator=g), torch.randn(150, 4, generator=g)
    logits = torch.randn(150, 10, generator=g)
    reference = ReferenceStats.from_features(real)
    config = QualityConfig(kid_subsets=5, kid_subset_size=50, is_splits=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = quality_from_features(reference, fake, logits, config=config)
    assert torch.equal(torch.get_rng_state(), state)
    assert quality_from_features(reference, fake, logits, config=config) == first


def test_inception_score_needs_logits():
    with pytest.raises(ValueError, match="no classifier logits"):
        build_inception_score(PassThroughExtractor(4))


def test_feature_dimension_mismatch_is_an_error():
    reference = ReferenceStats.from_features(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        quality_from_features(reference, torch.randn(10, 4))


def test_fast_frechet_distance_equals_torchmetrics_and_scipy():
    g = torch.Generator().manual_seed(10)
    real = torch.randn(300, 20, generator=g) @ torch.randn(20, 20, generator=g)
    fake = torch.randn(250, 20, generator=g) @ torch.randn(20, 20, generator=g) + 0.3
    reference, generated = ReferenceStats.from_features(real), ReferenceStats.from_features(fake)
    fast = float(
        frechet_distance(reference.mean, reference.cov, generated.mean, generated.cov, reference.sqrt_cov())
    )
    fid = build_fid(PassThroughExtractor(20))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert fast == pytest.approx(float(fid.compute()), rel=1e-5)
    assert fast == pytest.approx(scipy_fid(real.double().numpy(), fake.double().numpy()), rel=1e-6)


def test_fast_frechet_distance_handles_singular_covariances():
    """Rank-deficient covariances (fewer samples than dimensions) keep the formula exact."""
    g = torch.Generator().manual_seed(11)
    real, fake = torch.randn(10, 30, generator=g), torch.randn(12, 30, generator=g)
    reference, generated = ReferenceStats.from_features(real), ReferenceStats.from_features(fake)
    fast = float(frechet_distance(reference.mean, reference.cov, generated.mean, generated.cov))
    assert fast == pytest.approx(scipy_fid(real.double().numpy(), fake.double().numpy()), rel=1e-5)


@pytest.mark.parametrize(("subsets", "subset_size"), [(7, 40), (3, 60)])
def test_fast_kid_equals_torchmetrics_under_the_same_seed(subsets, subset_size):
    g = torch.Generator().manual_seed(12)
    real, fake = torch.randn(90, 6, generator=g), torch.randn(60, 6, generator=g) * 1.2 + 0.2
    kid = build_kid(PassThroughExtractor(6), subsets=subsets, subset_size=subset_size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(0)
    expected = kid.compute()
    torch.manual_seed(0)
    got = kernel_inception_distance(real, fake, subsets=subsets, subset_size=subset_size)
    assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert float(got[1]) == pytest.approx(float(expected[1]), rel=1e-5)
    # full sets, one subset: the closed-form unbiased MMD^2
    full = kernel_inception_distance(real[:60], fake, subsets=1, subset_size=60)[0]
    assert float(full) == pytest.approx(
        numpy_kid(real[:60].double().numpy(), fake.double().numpy()), rel=1e-9
    )
