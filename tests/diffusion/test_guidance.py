"""Guidance wrappers on the exact class-conditional mixture: closed forms, Bayes, and the ODE-term split."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.diffusion.analytic import GaussianMixture
from diffusion_lab.diffusion.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    LossGuidance,
    guidance_term,
)


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batch_sizes = inner, []

    def forward(self, x, sigma, **cond):
        self.batch_sizes.append(x.shape[0])
        return self.inner(x, sigma, **cond)


def exact_classifier(mixture):
    return lambda x, sigma: mixture.class_log_posterior(x, sigma)


@pytest.fixture
def noisy(mixture, gen):
    x0, labels = mixture.sample(8, generator=gen)
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 5.0], dtype=torch.float64)
    return x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64), sigma, labels


@pytest.mark.parametrize("w", [0.0, 1.5, "per-sample"])
def test_cfg_equals_closed_form_in_one_batched_call(mixture, noisy, w):
    x, sigma, labels = noisy
    w = torch.linspace(0, 4, 8, dtype=torch.float64) if w == "per-sample" else w
    counting = CountingDenoiser(mixture)
    guided = ClassifierFreeGuidance(counting, w=w, null_label=mixture.null_label)(x, sigma, labels=labels)
    d_c = mixture(x, sigma, labels)
    d_u = mixture(x, sigma, torch.full_like(labels, mixture.null_label))
    w_col = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1) if torch.is_tensor(w) else w
    torch.testing.assert_close(guided, d_u + (1 + w_col) * (d_c - d_u))
    assert counting.batch_sizes == ([8] if isinstance(w, float) and w == 0 else [16])  # w = 0: no uncond half


def test_cfg_is_eps_space_guidance(mixture, noisy):
    """D_w corresponds to eps_w = (1 + w) eps_c - w eps_u (Ho & Salimans 2022, eq. 6)."""
    x, sigma, labels = noisy
    eps = lambda d: (x - d) / sigma[:, None]  # noqa: E731
    d_c = mixture(x, sigma, labels)
    d_u = mixture(x, sigma, torch.full_like(labels, mixture.null_label))
    guided = ClassifierFreeGuidance(mixture, w=2.0, null_label=mixture.null_label)(x, sigma, labels=labels)
    torch.testing.assert_close(eps(guided), 3 * eps(d_c) - 2 * eps(d_u))


def test_cfg_null_cond_for_embeddings():
    """Unconditional half from null_cond (e.g. an empty-prompt embedding); other batch tensors repeated."""
    seen = {}

    def denoiser(x, sigma, text_emb, extra):
        seen.update(text_emb=text_emb, extra=extra)
        return x * 0 + text_emb.sum(-1, keepdim=True) + extra[:, None]

    x, emb, null = torch.zeros(3, 2), torch.ones(3, 4), torch.full((4,), -1.0)
    extra = torch.tensor([1.0, 2.0, 3.0])
    out = ClassifierFreeGuidance(denoiser, w=1.0, null_cond={"text_emb": null})(
        x, 0.5, text_emb=emb, extra=extra
    )
    assert torch.equal(seen["text_emb"], torch.cat([emb, null.expand(3, 4)]))
    assert torch.equal(seen["extra"], torch.cat([extra, extra]))
    # D_c = 4 + extra, D_u = -4 + extra: D_u + 2 (D_c - D_u) = 12 + extra
    torch.testing.assert_close(out, (12 + extra)[:, None].expand(3, 2))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_classifier_guidance_with_exact_classifier_is_bayes(mixture, noisy, scale):
    """D_u + s sigma^2 grad log p(c|x) = D_u + s (D_c - D_u): at s = 1 the conditional denoiser exactly."""
    x, sigma, labels = noisy
    guided = ClassifierGuidance(mixture, exact_classifier(mixture), scale=scale)(x, sigma, labels=labels)
    d_c = mixture(x, sigma, labels)
    d_u = mixture(x, sigma)
    torch.testing.assert_close(guided, d_u + scale * (d_c - d_u))
    cfg = ClassifierFreeGuidance(mixture, w=scale - 1, null_label=mixture.null_label)(x, sigma, labels=labels)
    torch.testing.assert_close(guided, cfg)


def test_loss_guidance_on_gaussian_data_matches_closed_form(gen):
    """Data N(m, v I): D(x) = m + a (x - m), a = v/(v + sigma^2). With L = 1/2 ||D - y||^2,
    grad_x L = a (D - y), so D_guided = D - s sigma^2 a (D - y)."""
    v, m = 0.3, torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    gaussian = GaussianMixture(m, v * torch.eye(2, dtype=torch.float64)[None])
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    sigma = torch.linspace(0.1, 3, 6, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    loss = lambda x0_hat, **_: 0.5 * ((x0_hat - y) ** 2).sum(-1)  # noqa: E731
    a = (v / (v + sigma**2))[:, None]
    d = m + a * (x - m)
    for scale in [0.7, torch.linspace(0, 1, 6, dtype=torch.float64)]:
        s = scale[:, None] if torch.is_tensor(scale) else scale
        guided = LossGuidance(gaussian, loss, scale)
        torch.testing.assert_close(guided(x, sigma), d - s * sigma[:, None] ** 2 * a * (d - y))
    # sign convention: a small positive scale lowers the loss of the denoised estimate
    small = LossGuidance(gaussian, loss, 0.1)(x, sigma)
    assert (loss(small) < loss(d)).all()


def test_guidance_term_is_the_ode_split(mixture, noisy):
    """(x - D_base)/sigma + guidance_term = (x - D_guided)/sigma for every guidance."""
    x, sigma, labels = noisy
    target = torch.zeros(1, 2, dtype=torch.float64)
    guides = [
        ClassifierFreeGuidance(mixture, w=2.0, null_label=mixture.null_label),
        ClassifierGuidance(mixture, exact_classifier(mixture), scale=3.0),
        LossGuidance(mixture, lambda x0, **_: ((x0 - target) ** 2).sum(-1), scale=0.5),
    ]
    s = sigma[:, None]
    for guide in guides:
        base_drift = (x - guide.base(x, sigma, labels=labels)) / s
        guided_drift = (x - guide(x, sigma, labels=labels)) / s
        torch.testing.assert_close(base_drift + guidance_term(guide, x, sigma, labels=labels), guided_drift)
        torch.testing.assert_close(
            guide.ode_term(x, sigma, labels=labels), guidance_term(guide, x, sigma, labels=labels)
        )
    # classifier guidance's term needs no denoiser call, and equals -s sigma grad log p(c|x)
    counting = CountingDenoiser(mixture)
    term = guidance_term(
        ClassifierGuidance(counting, exact_classifier(mixture), 3.0), x, sigma, labels=labels
    )
    assert counting.batch_sizes == []
    torch.testing.assert_close(term, -3.0 * (mixture(x, sigma, labels) - mixture(x, sigma)) / s)


def test_gradient_guidance_works_under_no_grad(mixture, noisy):
    x, sigma, labels = noisy
    guide = ClassifierGuidance(mixture, exact_classifier(mixture), scale=1.0)
    with torch.no_grad():
        out = guide(x, sigma, labels=labels)
    torch.testing.assert_close(out, mixture(x, sigma, labels))


def test_missing_conditioning_raises(mixture, noisy):
    x, sigma, _ = noisy
    with pytest.raises(ValueError, match="labels"):
        ClassifierFreeGuidance(mixture, w=1.0, null_label=3)(x, sigma)
    with pytest.raises(ValueError, match="labels"):
        ClassifierGuidance(mixture, exact_classifier(mixture), 1.0)(x, sigma)
    with pytest.raises(ValueError, match="null_label or null_cond"):
        ClassifierFreeGuidance(mixture, w=1.0)
    with pytest.raises(ValueError, match="per-sample"):
        ClassifierFreeGuidance(mixture, w=torch.ones(3), null_label=3)(
            x, sigma, labels=torch.zeros(8, dtype=torch.long)
        )
