"""MLP backbone: conditioning contract, and that it learns the exact Gaussian-mixture denoiser."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.nets.mlp import MLP


def test_conditioning_contract():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, num_classes=3, scalar_conditions=["guidance_w"]).eval()
    x, c, w = torch.randn(4, 2), torch.randn(4), torch.rand(4)
    with torch.no_grad():
        none = net(x, c, labels=None, guidance_w=w)
        null = net(x, c, labels=torch.full((4,), 3), guidance_w=w)
        cls0 = net(x, c, labels=torch.zeros(4, dtype=torch.long), guidance_w=w)
        other_w = net(x, c, labels=None, guidance_w=w + 1)
        other_c = net(x, c + 1, labels=None, guidance_w=w)
    assert none.shape == (4, 2)
    torch.testing.assert_close(none, null, atol=0, rtol=0)
    for changed in (cls0, other_w, other_c):
        assert (changed - none).abs().min() > 0
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 2\)"):
        net(torch.randn(4, 3), c, guidance_w=w)
    with pytest.raises(ValueError, match="missing conditioning input 'guidance_w'"):
        net(x, c)


def test_gradient_reaches_every_parameter():
    net = MLP(dim=2, hidden=16, depth=2, num_classes=2, scalar_conditions=["guidance_w"])
    out = net(
        torch.randn(5, 2), torch.randn(5), labels=torch.tensor([0, 1, 2, 0, 1]), guidance_w=torch.rand(5)
    )
    out.square().sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_learns_the_exact_class_conditional_mixture_denoiser():
    """Regressing x0 from x0 + sigma eps at sigma = 0.5 approaches the exact E[x0 | x, label]:
    the error to the analytic optimum falls far below that of the best label-blind linear guess."""
    torch.manual_seed(0)
    mixture = toy_mixture_2d(num_classes=3, components_per_class=2, std=0.15, seed=0)
    denoiser = Denoiser(MLP(dim=2, hidden=64, depth=2, num_classes=3), parametrization="edm")
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    sigma = 0.5
    for _ in range(300):
        x0, labels = mixture.sample(512)
        x0 = x0.float()
        x = x0 + sigma * torch.randn_like(x0)
        loss = (denoiser(x, sigma, labels=labels) - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, labels = mixture.sample(4000, generator=torch.Generator().manual_seed(1))
    x = (
        x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=x0.dtype)
    ).float()
    with torch.no_grad():
        learned = denoiser(x, sigma, labels=labels)
    exact = mixture(x, torch.tensor(sigma), labels=labels).float()
    # Baseline: the linear (Wiener) estimator of the whole mixture, mean + S (S + sigma^2 I)^-1 (x - mean).
    mean, cov = (t.float() for t in mixture.mean_and_cov())
    wiener = mean + (x - mean) @ torch.linalg.solve(cov + sigma**2 * torch.eye(2), cov).T
    err_learned = (learned - exact).square().sum(-1).mean()
    err_baseline = (wiener - exact).square().sum(-1).mean()
    assert err_learned < 0.05 * err_baseline, (err_learned, err_baseline)  # measured 0.0027 vs 0.29
