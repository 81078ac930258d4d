"""Stable Target Field: the target against brute-force ideal denoisers, the DSM limit n = 1, the streamed
log-sum-exp against the naive B x n x D computation (values and memory), numerics at sigma -> 0 / large, the
variance reduction on digits, and the reference sampling of ``StableTargetLoss``."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffusion_lab.data.digits import Digits, load_digits_tensors
from diffusion_lab.diffusion.denoiser import x0_to_eps
from diffusion_lab.diffusion.losses import DenoisingLoss, LogNormalSigma, LogUniformSigma, UniformTimeSigma
from diffusion_lab.diffusion.schedules import VPLinear
from diffusion_lab.diffusion.stf import stable_target, target_covariance_trace
from diffusion_lab.diffusion.stf_loss import ReferenceLoader, StableTargetLoss


def brute_force_denoiser(y: torch.Tensor, sigma: torch.Tensor, sets: list[torch.Tensor]) -> torch.Tensor:
    """E[x0 | y_b] of the empirical distribution of ``sets[b]`` (R_b, D): explicit differences, float64."""
    rows = []
    for yb, sb, refs in zip(y.double(), sigma.double(), sets):
        logw = -((yb[None] - refs.double()) ** 2).sum(1) / (2 * sb**2)
        rows.append(torch.softmax(logw, 0) @ refs.double())
    return torch.stack(rows)


def naive_target(y, sigma, own, refs, exclude=None, labels=None, ref_labels=None):
    """The public code's way (one (B, n, D) difference tensor), with the same own/exclude/label semantics."""
    allrefs = torch.cat([own[:, None], refs[None].expand(len(y), -1, -1)], 1)  # (B, 1 + n, D)
    logits = -((y[:, None] - allrefs) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
    keep = torch.ones(logits.shape, dtype=torch.bool)
    if exclude is not None:
        keep[:, 1:] &= exclude[:, None] != torch.arange(len(refs))[None]
    if labels is not None:
        keep[:, 1:] &= (labels[:, None] < 0) | (labels[:, None] == ref_labels[None])
    weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), 1)
    return (weights[..., None] * allrefs).sum(1)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_tensors()


# ------------------------------------------------------------------------------------------ the target
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 3.0, 30.0])
def test_whole_dataset_as_reference_is_the_ideal_denoiser(digits, sigma):
    """References = the whole data set (own point excluded from the shared part, so every point counts once):
    the stable target is E[x0 | y] of the empirical distribution, computed here by brute force."""
    images = digits[0][:300].reshape(300, -1).double()
    g = torch.Generator().manual_seed(0)
    index = torch.randint(300, (24,), generator=g)
    y = images[index] + sigma * torch.randn(24, 64, generator=g, dtype=torch.float64)
    sig = torch.full((24,), sigma, dtype=torch.float64)
    got = stable_target(y, sig, images[index], images, exclude=index, chunk_size=37)
    expected = brute_force_denoiser(y, sig, [images] * 24)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_loss_target_with_whole_small_dataset_is_the_ideal_denoiser(digits):
    """StableTargetLoss with the minibatch = reference batch = the whole data set (n = B = N): same limit."""
    images = digits[0][:128]
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.randn(128, generator=g))
    y = images + sigma[:, None, None, None] * torch.randn(images.shape, generator=g)
    loss = StableTargetLoss(reference_size=128, chunk_size=50)
    got = loss.target(images.double(), y.double(), sigma.double())
    flat = images.reshape(128, -1)
    expected = brute_force_denoiser(y.reshape(128, -1), sigma, [flat] * 128).reshape(images.shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_reference_size_one_is_exactly_dsm():
    """n = 1: the only reference is the generating point, so target == x0 bit for bit and the loss is DSM's."""
    torch.manual_seed(0)
    x0, noise, sigma = torch.randn(16, 1, 4, 4), torch.randn(16, 1, 4, 4), torch.exp(torch.randn(16))
    y = x0 + sigma[:, None, None, None] * noise
    stf = StableTargetLoss(reference_size=1)  # no reference pool needed
    assert torch.equal(stf.target(x0, y, sigma), x0)
    assert torch.equal(StableTargetLoss(reference_size=1).target(x0[:1], y[:1], sigma[:1]), x0[:1])  # B = n
    denoiser = lambda x, s, **_: 0.7 * x  # noqa: E731
    torch.testing.assert_close(
        stf.per_sample(denoiser, x0, sigma, noise), DenoisingLoss().per_sample(denoiser, x0, sigma, noise)
    )


@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
def test_chunked_equals_naive(chunk):
    """Streamed log-sum-exp over chunks == one softmax over the full (B, n, D) tensor, with exclusions and
    class masks; float64 to 1e-6 (in fact ~1e-15), float32 to 2e-5."""
    g = torch.Generator().manual_seed(chunk)
    B, n, D = 12, 300, 20
    refs = torch.randn(n, D, generator=g, dtype=torch.float64)
    own = refs[:B]
    sigma = torch.exp(torch.randn(B, generator=g, dtype=torch.float64))
    y = own + sigma[:, None] * torch.randn(B, D, generator=g, dtype=torch.float64)
    exclude = torch.arange(B)
    labels = torch.randint(-1, 3, (B,), generator=g)
    ref_labels = torch.randint(0, 3, (n,), generator=g)
    for kwargs in (
        {},
        {"exclude": exclude},
        {"exclude": exclude, "labels": labels, "ref_labels": ref_labels},
    ):
        expected = naive_target(y, sigma, own, refs, **kwargs)
        got = stable_target(y, sigma, own, refs, chunk_size=chunk, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        got32 = stable_target(y.float(), sigma.float(), own.float(), refs.float(), chunk_size=chunk, **kwargs)
        torch.testing.assert_close(got32.double(), expected, rtol=0, atol=2e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_B_by_n_by_D_tensor_is_built():
    """Every intermediate is at most the reference batch itself (n x D): logits live in (B, chunk) pieces.
    The same probe sees the naive computation build its (B, n, D) tensor."""
    B, n, D, chunk = 32, 512, 64, 64
    y, refs = torch.randn(B, D), torch.randn(n, D)
    with LargestTensor() as probe:
        stable_target(y, torch.ones(B), y, refs, exclude=torch.arange(B), chunk_size=chunk)
    assert probe.largest <= max(n * D, B * D, B * chunk)
    with LargestTensor() as naive_probe:
        naive_target(y, torch.ones(B), y, refs)
    assert naive_probe.largest >= B * n * D


def test_sigma_to_zero_and_to_infinity_stay_finite(digits):
    """sigma -> 0: the target is the generating point (exactly at sigma = 0); sigma large: the weights are
    uniform, the target is the mean of the references (own included). No NaN in float32 anywhere."""
    images = digits[0][:200].reshape(200, -1)
    own, noise = images[:8], torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for sigma in [0.0, 1e-30, 1e-12, 1e-6, 1e-3]:
        y = own + sigma * noise
        got = stable_target(y, torch.full((8,), sigma), own, images, exclude=torch.arange(8))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, own, rtol=0, atol=1e-6)
    for sigma in [1e4, 1e6, 1e8]:
        y = own + sigma * noise
        got = stable_target(y, torch.full((8,), sigma), own, images, exclude=torch.arange(8))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, images.mean(0).expand(8, -1), rtol=0, atol=1e-3)


def test_vp_view_gives_the_same_weights():
    """VP coordinates x_t = alpha (x0 + sigma eps), sigma_vp = alpha sigma: the target is alpha times the VE
    one (the logits are identical), so one implementation serves EDM, VE and VP."""
    g = torch.Generator().manual_seed(3)
    refs = torch.randn(50, 6, generator=g, dtype=torch.float64)
    for sigma in [0.3, 1.0, 5.0]:
        y = refs[:5] + sigma * torch.randn(5, 6, generator=g, dtype=torch.float64)
        alpha = (1 + sigma**2) ** -0.5
        ve = stable_target(y, sigma, refs[:5], refs[5:])
        vp = stable_target(alpha * y, alpha * sigma, alpha * refs[:5], alpha * refs[5:])
        torch.testing.assert_close(vp, alpha * ve, rtol=0, atol=1e-12)


def test_eps_weighting_is_the_eps_loss_on_the_stable_eps_target():
    """weighting 'eps': lambda ||D - T||^2 == ||eps_hat - eps_T||^2 with eps_T = (y - T) / sigma, the eps-space
    stable target (what an eps- or score-parametrised model regresses)."""
    torch.manual_seed(0)
    pool = torch.randn(40, 3)
    loss = StableTargetLoss(weighting="eps", reference_size=24)
    loss.set_reference_pool(pool)
    x0, noise, sigma = torch.randn(8, 3), torch.randn(8, 3), torch.rand(8) + 0.1
    denoiser = lambda x, s, **_: 0.5 * x  # noqa: E731
    y = x0 + sigma[:, None] * noise
    torch.manual_seed(5)
    got = loss.per_sample(denoiser, x0, sigma, noise)
    torch.manual_seed(5)
    target = loss.target(x0, y, sigma)
    expected = ((x0_to_eps(y, denoiser(y, sigma), sigma) - x0_to_eps(y, target, sigma)) ** 2).mean(1)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------ variance
def test_stf_target_has_lower_covariance_than_dsm_on_digits(digits):
    """Xu et al. 2023, Fig. 1 on digits: at intermediate sigma the trace of the (conditional) covariance of the
    target drops below DSM's, more so for larger n; n = N (all 1,797 digits) is the ideal denoiser (zero).
    The Monte Carlo estimator is checked against the exact DSM value (n = 1 is DSM)."""
    images = digits[0]
    kw = {"num_points": 32, "num_draws": 32}
    dsm, stf_1 = target_covariance_trace(images, 4.0, 1, generator=torch.Generator().manual_seed(0), **kw)
    assert abs(stf_1 - dsm) < 0.15 * dsm
    for sigma in [2.0, 4.0]:
        dsm, stf_16 = target_covariance_trace(
            images, sigma, 16, generator=torch.Generator().manual_seed(1), **kw
        )
        _, stf_256 = target_covariance_trace(
            images, sigma, 256, generator=torch.Generator().manual_seed(1), **kw
        )
        _, stf_all = target_covariance_trace(
            images, sigma, 1797, generator=torch.Generator().manual_seed(1), **kw
        )
        assert stf_256 < stf_16 < 0.6 * dsm, (sigma, dsm, stf_16, stf_256)
        assert stf_all < 1e-12 * dsm


def test_large_sigma_variance_is_that_of_a_sample_mean_without_replacement(digits):
    """sigma -> inf: weights uniform and x_1 uniform, so T is the mean of a uniform n-subset of the N points and
    tr Cov[T] = tr Sigma / n * (N - n) / (N - 1) (finite-population correction), while DSM's x_1 has tr Sigma
    (Sigma the population covariance): the closed form the Monte Carlo estimator must reproduce."""
    images = digits[0][:300].reshape(300, -1).double()
    total = images.var(0, unbiased=False).sum().item()  # tr Sigma
    n, N = 30, 300
    dsm, stf = target_covariance_trace(
        images, 1e3, n, num_points=16, num_draws=200, generator=torch.Generator().manual_seed(0)
    )
    assert dsm == pytest.approx(total, rel=1e-3)
    assert stf == pytest.approx(total / n * (N - n) / (N - 1), rel=0.15)


# ------------------------------------------------------------------------------------------ the loss
def test_reference_layout_and_class_masks_match_brute_force():
    """n >= B: each sample sees the whole minibatch + the drawn images; n < B: its own image + the drawn ones.
    Labelled samples see only their class (dropped minibatch labels count as no class), null-label samples all.
    The pool is exactly the size to be drawn, so the reference sets are known."""
    g = torch.Generator().manual_seed(0)
    B, D, K = 10, 5, 3
    x0, pool = (
        torch.randn(B, D, generator=g, dtype=torch.float64),
        torch.randn(6, D, generator=g, dtype=torch.float64),
    )
    pool_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])  # 3 = null label (dropped)
    sigma = torch.full((B,), 0.8, dtype=torch.float64)
    y = x0 + sigma[:, None] * torch.randn(B, D, generator=g, dtype=torch.float64)
    for n, drawn in [(16, 6), (7, 6)]:
        loss = StableTargetLoss(reference_size=n, chunk_size=4)
        loss.set_reference_pool(pool[:drawn], pool_labels[:drawn], num_classes=K)
        got = loss.target(x0, y, sigma, labels=labels)
        sets = []
        for b in range(B):
            mates = [
                x0[j] for j in range(B) if j != b and (n >= B) and (labels[b] == K or labels[j] == labels[b])
            ]
            drawn_ok = [pool[j] for j in range(drawn) if labels[b] == K or pool_labels[j] == labels[b]]
            sets.append(torch.stack([x0[b], *mates, *drawn_ok]))
        torch.testing.assert_close(got, brute_force_denoiser(y, sigma, sets), rtol=0, atol=1e-10)
        unconditional = StableTargetLoss(reference_size=n, class_conditional=False)
        unconditional.set_reference_pool(pool[:drawn], pool_labels[:drawn])
        sets = [
            torch.cat([x0[b : b + 1], x0[torch.arange(B) != b] if n >= B else x0[:0], pool[:drawn]])
            for b in range(B)
        ]
        got = unconditional.target(x0, y, sigma, labels=labels)
        torch.testing.assert_close(got, brute_force_denoiser(y, sigma, sets), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "sampler, weighting, weight",
    [
        (LogNormalSigma(-1.2, 1.2), "edm", lambda s: (s**2 + 0.5**2) / (0.5 * s) ** 2),  # EDM eq. 8
        (UniformTimeSigma(VPLinear(), t_min=1e-5), "eps", lambda s: s**-2),  # EDM's VPLoss
        (LogUniformSigma(0.02, 100.0), "eps", lambda s: s**-2),  # EDM's VELoss
    ],
    ids=["edm", "vp", "ve"],
)
def test_formulation_is_kept_edm_vp_ve(sampler, weighting, weight):
    """forward() = mean_b lambda(sigma_b) ||D(y_b) - T(y_b)||^2 / D with the wrapped formulation's sigma draws
    and weighting (written out here), and only the target differs from that formulation's DSM loss."""
    pool = torch.randn(64, 3, dtype=torch.float64)
    loss = StableTargetLoss(sigma_sampler=sampler, weighting=weighting, sigma_data=0.5, reference_size=40)
    loss.set_reference_pool(pool)
    x0 = torch.randn(16, 3, dtype=torch.float64)
    denoiser = lambda x, s, **_: x / (1 + s[:, None] ** 2)  # noqa: E731
    torch.manual_seed(11)
    got = loss(denoiser, x0)
    torch.manual_seed(11)  # replay forward's draws: sigma, noise, then the reference draw inside target()
    sigma = sampler(16).double()
    y = x0 + sigma[:, None] * torch.randn_like(x0)
    target = loss.target(x0, y, sigma)
    expected = (weight(sigma) * ((denoiser(y, sigma) - target) ** 2).mean(1)).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.manual_seed(11)
    dsm = DenoisingLoss(sigma_sampler=sampler, weighting=weighting, sigma_data=0.5)(denoiser, x0)
    assert not torch.isclose(got, dsm)


def test_eval_mode_uses_the_dsm_target_and_needs_no_references():
    """loss.eval() (Lightning's validation/test mode): target = x0, so val losses of DSM and STF runs match."""
    loss = StableTargetLoss(reference_size=64).eval()
    x0, sigma = torch.randn(8, 4), torch.rand(8) + 0.5
    y = x0 + sigma[:, None] * torch.randn(8, 4)
    assert torch.equal(loss.target(x0, y, sigma), x0)
    loss.train().set_reference_pool(torch.randn(100, 4))
    assert not torch.allclose(loss.target(x0, y, sigma), x0)


def test_sigma_shapes_and_bad_shapes():
    """sigma as (B,), (B, 1, 1, 1) or a scalar gives the same target; wrong sizes are named."""
    g = torch.Generator().manual_seed(0)
    refs, y = torch.randn(20, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    own = refs[:4]
    flat = stable_target(y, torch.full((4,), 0.7), own, refs)
    torch.testing.assert_close(stable_target(y, torch.full((4, 1, 1, 1), 0.7), own, refs), flat)
    torch.testing.assert_close(stable_target(y, 0.7, own, refs), flat)
    with pytest.raises(
        ValueError, match=r"sigma must be a scalar or hold one value per row \(4\), got \(3,\)"
    ):
        stable_target(y, torch.ones(3), own, refs)
    with pytest.raises(ValueError, match=r"exclude must have shape \(4,\), got \(5,\)"):
        stable_target(y, 1.0, own, refs, exclude=torch.arange(5))
    with pytest.raises(ValueError, match=r"ref_labels must have shape \(20,\)"):
        stable_target(y, 1.0, own, refs, labels=torch.zeros(4).long(), ref_labels=torch.zeros(3).long())
    with pytest.raises(ValueError, match="own must have the shape of y"):
        stable_target(y, 1.0, own[:3], refs)


def test_draws_reproduce_under_a_seed_and_differ_across_seeds():
    loss = StableTargetLoss(reference_size=64)
    loss.set_reference_pool(torch.randn(500, 4))
    x0, sigma = torch.randn(8, 4), torch.ones(8)
    torch.manual_seed(7)
    a = loss.target(x0, x0 + 1, sigma)
    torch.manual_seed(7)
    b = loss.target(x0, x0 + 1, sigma)
    torch.manual_seed(8)
    c = loss.target(x0, x0 + 1, sigma)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_setup_reference_from_digits_datamodule():
    """The pool is the DataModule's training split (labels and num_classes included); draws are distinct."""
    data = Digits(val_fraction=0.1, seed=0)
    loss = StableTargetLoss(reference_size=256)
    loss.setup_reference(data)
    assert len(loss.source) == len(data.train_set) and loss.num_classes == 10
    images, labels = loss.draw_references(1000, torch.device("cpu"))
    assert images.shape == (1000, 1, 8, 8) and labels.shape == (1000,)
    flat = images.reshape(1000, -1)
    pool = data.train_set.images.reshape(-1, 64)
    assert torch.cdist(flat, pool).min(1).values.max() == 0  # every drawn image is a training image


def test_loader_source_draws_training_images():
    data = Digits(val_fraction=0.1, seed=0)
    loss = StableTargetLoss(reference_size=256, reference_source="loader")
    loss.setup_reference(data)
    assert isinstance(loss.source, ReferenceLoader)
    torch.manual_seed(0)
    first, labels = loss.draw_references(100, torch.device("cpu"))
    second, _ = loss.draw_references(100, torch.device("cpu"))
    pool = data.train_set.images.reshape(-1, 64)
    assert labels.shape == (100,) and not torch.equal(first, second)
    assert torch.cdist(first.reshape(100, -1), pool).min(1).values.max() == 0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="reference_size must be >= 1, got 0"):
        StableTargetLoss(reference_size=0)
    with pytest.raises(ValueError, match="reference_source must be 'memory' or 'loader', got 'disk'"):
        StableTargetLoss(reference_source="disk")
    loss = StableTargetLoss(reference_size=64)
    with pytest.raises(RuntimeError, match="setup_reference"):
        loss.target(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4))
    loss.set_reference_pool(torch.randn(10, 2))
    with pytest.raises(ValueError, match="cannot draw 60 distinct reference images from a pool of 10"):
        loss.target(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4))
    forced = StableTargetLoss(reference_size=2, class_conditional=True)
    with pytest.raises(ValueError, match="passed no labels"):
        forced.target(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4))
    unlabelled = StableTargetLoss(reference_size=8)  # auto: the model passes labels, the pool has none
    unlabelled.set_reference_pool(torch.randn(10, 2), num_classes=3)
    with pytest.raises(ValueError, match="need labelled reference images.*class_conditional=False"):
        unlabelled.target(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4), labels=torch.zeros(4).long())
