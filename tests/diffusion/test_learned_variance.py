"""iDDPM's learned reverse variance and hybrid loss (Nichol & Dhariwal 2021, sec. 3.1) against independent truths:
``torch.distributions`` and Monte Carlo for the Gaussian terms, the textbook VP posterior (Ho et al. 2020, eqs. 6-7)
with the closed-form cosine ``abar`` for the VE-view KL, the VP betas for the sampler's interpolated std, the
``small``/``large`` DDPM samplers at frac = 0 / 1, the stop-gradient, the analytic optimal variance of the exact
mixture denoiser (Bao et al. 2022, Analytic-DPM) and the exact mixture NLL as a lower bound of the VLB."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from diffusion_lab.diffusion.analytic import GaussianMixture, toy_mixture_2d
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance
from diffusion_lab.diffusion.hybrid_loss import (
    HybridLoss,
    discretized_gaussian_nll,
    gaussian_kl,
    gaussian_nll,
)
from diffusion_lab.diffusion.samplers import loglinear_sigmas, sample_ddpm, vp_sigmas
from diffusion_lab.diffusion.samplers.ancestral import ddpm_learned_std
from diffusion_lab.diffusion.schedules import VPCosine

F64 = torch.float64
LN2 = math.log(2.0)


def cosine_abar(t: Tensor, s: float = 0.008) -> Tensor:
    """iDDPM eq. 17, written out here independently of ``schedules.py``."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


class FixedFraction(nn.Module):
    """A learned-variance denoiser from any denoiser and a fraction ``frac(sigma)`` (a float or a function)."""

    learned_variance = True

    def __init__(self, denoiser: nn.Module, frac) -> None:
        super().__init__()
        self.denoiser, self.frac = denoiser, frac

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.denoiser(x, sigma, **cond)

    def variance_fraction(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        value = self.frac(sigma) if callable(self.frac) else self.frac
        return torch.as_tensor(value, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()

    def denoise_with_variance(self, x: Tensor, sigma: Tensor, **cond) -> tuple[Tensor, Tensor]:
        return self(x, sigma, **cond), self.variance_fraction(x, sigma, **cond)


class MixtureTwoHead(nn.Module):
    """A backbone whose first half is the exact mixture denoiser (``x0`` parametrisation, ``sigma`` noise
    conditioning: ``F(alpha x, sigma) = D(x, sigma)``) and whose second half is a constant raw ``v``."""

    def __init__(self, mixture: GaussianMixture, v: float) -> None:
        super().__init__()
        self.mixture, self.v = mixture, v

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        x = x_in * torch.sqrt(1 + c_noise[:, None] ** 2)
        return torch.cat([self.mixture(x, c_noise, labels), torch.full_like(x, self.v)], dim=1)


class TinyTwoHead(nn.Module):
    """A small MLP ``F(x, c_noise) -> (B, 2D)`` for 2-D toy data (mean half, variance half)."""

    def __init__(self, dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 2, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * dim),
        )

    def forward(self, x: Tensor, c_noise: Tensor, **_) -> Tensor:
        t = c_noise[:, None].to(x.dtype) / 1000
        return self.net(torch.cat([x, torch.sin(3 * t), torch.cos(3 * t)], dim=1))


def tiny_denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(
        TinyTwoHead(), "eps", noise_conditioning="vp_t", schedule=VPCosine(), learned_variance=True
    )


# ---------------------------------------------------------------------------------------------------
# Gaussian terms
# ---------------------------------------------------------------------------------------------------
def test_gaussian_kl_and_nll_match_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(50, generator=g, dtype=F64)
    torch.testing.assert_close(gaussian_nll(x, m1, lv1), -Normal(m1, (0.5 * lv1).exp()).log_prob(x))
    # Monte Carlo: KL = E_q[log q - log p] for one pair
    q, p = Normal(0.3, 0.7), Normal(-0.2, 1.3)
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean()
    closed = gaussian_kl(
        *(torch.tensor(v, dtype=F64) for v in (0.3, 2 * math.log(0.7), -0.2, 2 * math.log(1.3)))
    )
    assert abs(float(mc) - float(closed)) < 5e-3


@pytest.mark.parametrize("num_bins", [17, 256])
def test_discretized_gaussian_is_a_distribution_on_the_grid(num_bins):
    grid = torch.linspace(-1, 1, num_bins, dtype=F64)
    mean, logvar = torch.tensor(0.37, dtype=F64), torch.tensor(2 * math.log(0.2), dtype=F64)
    probs = torch.exp(-discretized_gaussian_nll(grid, mean.expand_as(grid), logvar.expand_as(grid), num_bins))
    assert abs(float(probs.sum()) - 1) < 1e-9
    # an interior bin is the Gaussian mass of [x - h, x + h]
    normal, h, i = Normal(mean, 0.2), 1 / (num_bins - 1), num_bins // 2
    mass = normal.cdf(grid[i] + h) - normal.cdf(grid[i] - h)
    torch.testing.assert_close(probs[i], mass, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="num_bins"):
        discretized_gaussian_nll(grid, grid, grid, 1)


# ---------------------------------------------------------------------------------------------------
# The per-step terms = the textbook VP posterior KL
# ---------------------------------------------------------------------------------------------------
def test_vlb_terms_equal_textbook_vp_kl_and_decoder():
    """VE-view L_k = KL between Ho et al.'s VP posterior and iDDPM's p with learned variance (eqs. 6-7, 15)."""
    T, d = 1000, 6
    loss = HybridLoss(VPCosine(), T, num_bins=256)
    g = torch.Generator().manual_seed(1)
    ks = [1, 2, 10, 500, 999]
    x0 = torch.randint(0, 256, (len(ks), d), generator=g).to(F64) / 127.5 - 1  # on the 8-bit grid
    # errors of a few decoder stds at k = 1 (beyond ~7 stds the reference code's 1e-12 floor on the bin mass acts)
    scale = torch.tensor([0.004 if k == 1 else 0.05 for k in ks], dtype=F64)[:, None]
    x0_hat = x0 + scale * torch.randn(len(ks), d, generator=g, dtype=F64)
    frac = -0.2 + 1.4 * torch.rand(len(ks), d, generator=g, dtype=F64)
    got = loss.vlb_term(x0, torch.tensor(ks), x0_hat, frac)

    for row, k in enumerate(ks):
        abar_t, abar_prev = (
            cosine_abar(torch.tensor(k / T, dtype=F64)),
            cosine_abar(torch.tensor((k - 1) / T, dtype=F64)),
        )
        beta = 1 - abar_t / abar_prev
        if k == 1:  # decoder; posterior variance clipped to that of step 2 (reference code)
            abar_2 = cosine_abar(torch.tensor(2 / T, dtype=F64))
            beta_tilde = (1 - abar_t) / (1 - abar_2) * (1 - abar_2 / abar_t)
            std = torch.exp(0.5 * (frac[row] * beta.log() + (1 - frac[row]) * beta_tilde.log()))
            normal = Normal(x0_hat[row], std)
            h = 1 / 255
            mass = normal.cdf(x0[row] + h) - normal.cdf(x0[row] - h)
            mass = torch.where(x0[row] <= -1, normal.cdf(x0[row] + h), mass)
            mass = torch.where(x0[row] >= 1, 1 - normal.cdf(x0[row] - h), mass)
            expected = (-mass.log()).mean() / LN2
        else:
            beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta
            x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * torch.randn(d, generator=g, dtype=F64)  # VP x_t
            coef1 = beta * abar_prev.sqrt() / (1 - abar_t)
            coef2 = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar_t)
            mean_q = coef1 * x0[row] + coef2 * x_t[row]
            mean_p = coef1 * x0_hat[row] + coef2 * x_t[row]
            std_p = torch.exp(0.5 * (frac[row] * beta.log() + (1 - frac[row]) * beta_tilde.log()))
            expected = kl_divergence(Normal(mean_q, beta_tilde.sqrt()), Normal(mean_p, std_p)).mean() / LN2
        torch.testing.assert_close(got[row], expected, rtol=1e-6, atol=1e-9)


def test_learned_std_interpolates_the_steps_vp_betas():
    """std^2 = exp(frac log beta + (1 - frac) log beta_tilde) / abar_next on an arbitrary (respaced) step."""
    frac = torch.tensor([-0.3, 0.0, 0.25, 0.5, 1.0, 1.2], dtype=F64)
    for sigma, sigma_next in [(80.0, 35.0), (1.3, 0.9), (0.05, 0.01)]:
        abar, abar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = 1 - abar / abar_next
        beta_tilde = (1 - abar_next) / (1 - abar) * beta
        var_vp = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
        torch.testing.assert_close(
            ddpm_learned_std(sigma, sigma_next, frac) ** 2, var_vp / abar_next, rtol=1e-12, atol=0
        )


# ---------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------
GRIDS = {
    "loglinear": loglinear_sigmas(9, sigma_min=0.01, sigma_max=40.0),
    "cosine_vp": vp_sigmas(7, VPCosine()),
}


@pytest.mark.parametrize("grid", GRIDS, ids=list(GRIDS))
@pytest.mark.parametrize(("v", "fixed"), [(-1.0, "small"), (1.0, "large")])
def test_learned_sampler_at_frac_0_and_1_is_the_small_and_large_sampler(mixture, grid, v, fixed):
    """Through a real Denoiser (2C-channel split), unguided and under classifier-free guidance."""
    sigmas = GRIDS[grid]
    denoiser = Denoiser(MixtureTwoHead(mixture, v), "x0", noise_conditioning="sigma", learned_variance=True)
    x = sigmas[0] * torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    labels = torch.arange(64) % mixture.num_classes
    for wrap in (lambda d: d, lambda d: ClassifierFreeGuidance(d, w=1.5, null_label=mixture.null_label)):
        runs = {
            variance: sample_ddpm(
                wrap(denoiser),
                x.clone(),
                sigmas,
                variance=variance,
                generator=torch.Generator().manual_seed(7),
                cond={"labels": labels},
            )
            for variance in ("learned", fixed)
        }
        torch.testing.assert_close(runs["learned"], runs[fixed], rtol=0, atol=1e-12)
    other = sample_ddpm(
        denoiser,
        x.clone(),
        sigmas,
        variance="large" if fixed == "small" else "small",
        generator=torch.Generator().manual_seed(7),
        cond={"labels": labels},
    )
    assert (other - runs[fixed]).abs().max() > 1e-3  # the variance choice matters on this grid


# ---------------------------------------------------------------------------------------------------
# Denoiser split and errors
# ---------------------------------------------------------------------------------------------------
def test_denoiser_split_keeps_the_contract_and_reads_frac():
    torch.manual_seed(0)
    wide = TinyTwoHead()
    narrow = copy.deepcopy(wide)
    narrow.net[-1] = nn.Linear(64, 2)
    with torch.no_grad():
        narrow.net[-1].weight.copy_(wide.net[-1].weight[:2])
        narrow.net[-1].bias.copy_(wide.net[-1].bias[:2])
    kw = dict(parametrization="eps", noise_conditioning="vp_t", schedule=VPCosine())
    learned, plain = Denoiser(wide, learned_variance=True, **kw), Denoiser(narrow, **kw)
    x, sigma = torch.randn(5, 2), torch.rand(5) * 3
    x0, frac = learned.denoise_with_variance(x, sigma)
    torch.testing.assert_close(learned(x, sigma), plain(x, sigma))
    torch.testing.assert_close(x0, plain(x, sigma))
    raw_v = wide(x * torch.rsqrt(1 + sigma[:, None] ** 2), learned.c_noise(sigma))[:, 2:]
    torch.testing.assert_close(frac, (raw_v + 1) / 2)
    torch.testing.assert_close(learned.variance_fraction(x, sigma), frac)


def test_bad_inputs_raise_clear_errors(mixture):
    one_head = Denoiser(lambda x, c: x, "x0", noise_conditioning="sigma", learned_variance=True)
    with pytest.raises(ValueError, match="out_channels to 4"):
        one_head(torch.randn(3, 2), 1.0)
    plain = Denoiser(lambda x, c: x, "x0", noise_conditioning="sigma")
    with pytest.raises(ValueError, match="no variance head"):
        plain.denoise_with_variance(torch.randn(3, 2), 1.0)
    sigmas = GRIDS["loglinear"]
    with pytest.raises(ValueError, match="learned variance head"):
        sample_ddpm(mixture, torch.randn(3, 2, dtype=F64), sigmas, variance="learned")
    with pytest.raises(ValueError, match="'huge'"):
        sample_ddpm(mixture, torch.randn(3, 2, dtype=F64), sigmas, variance="huge")
    loss = HybridLoss(VPCosine(), 10, num_bins=None)
    with pytest.raises(ValueError, match="learned variance head"):
        loss(mixture, torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="k must hold"):
        loss.terms(tiny_denoiser(), torch.randn(2, 2), torch.tensor([0, 3]), torch.randn(2, 2))
    for kwargs, match in [
        ({"num_steps": 1}, "num_steps"),
        ({"vlb_weight": -1.0}, "vlb_weight"),
        ({"num_bins": 1}, "num_bins"),
    ]:
        with pytest.raises(ValueError, match=match):
            HybridLoss(VPCosine(), **{"num_steps": 10, **kwargs})


# ---------------------------------------------------------------------------------------------------
# Stop-gradient
# ---------------------------------------------------------------------------------------------------
def test_vlb_gradient_reaches_only_the_variance_channels():
    denoiser = tiny_denoiser()
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["out"] = out

    denoiser.network.register_forward_hook(keep)
    loss = HybridLoss(VPCosine(), 100, num_bins=None)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    k = torch.tensor([1, 2, 5, 20, 50, 80, 99, 100])

    def grads(which: str, detach: bool = True) -> tuple[Tensor, Tensor]:
        terms = loss.terms(denoiser, x0, k, noise)
        if not detach:  # control: the same term without the stop-gradient
            x = x0 + loss.sigmas[k].float()[:, None] * noise
            x0_hat, frac = denoiser.denoise_with_variance(x, loss.sigmas[k].float())
            terms = {"vlb": loss.vlb_term(x0, k, x0_hat, frac)}
        terms[which].sum().backward()
        grad = captured["out"].grad
        return grad[:, :2].abs().max(), grad[:, 2:].abs().max()

    mean_grad, var_grad = grads("vlb")
    assert mean_grad == 0 and var_grad > 0
    mean_grad, var_grad = grads("simple")
    assert mean_grad > 0 and var_grad == 0
    mean_grad, _ = grads("vlb", detach=False)
    assert mean_grad > 0  # without the stop-gradient the mean channels would learn from L_vlb


# ---------------------------------------------------------------------------------------------------
# The exact mixture: optimal variance, bound on the NLL
# ---------------------------------------------------------------------------------------------------
def test_optimal_variance_of_the_exact_denoiser_beats_both_fixed_variances():
    """With the exact mixture denoiser, the per-step isotropic variance minimising E L_k is
    ``small_k + (1 - c_k)^2 mmse_k`` (``mmse_1`` for the Gaussian decoder; Bao et al. 2022, Thm. 1). Its VLB
    is below the VLB with beta-tilde (frac 0) and with beta (frac 1), and every VLB bounds the exact NLL."""
    mixture = toy_mixture_2d()
    T = 25
    loss = HybridLoss(VPCosine(), T, num_bins=None)
    g = torch.Generator().manual_seed(11)
    # MMSE per step from independent samples
    x0, _ = mixture.sample(20_000, generator=g)
    log_var_opt = torch.zeros(T + 1, dtype=F64)
    for k in range(1, T + 1):
        sigma = loss.sigmas[k]
        mmse = ((x0 - mixture(x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64), sigma)) ** 2).mean()
        small = loss.log_small[k].exp()
        log_var_opt[k] = (mmse if k == 1 else small + loss.mean_gap[k] ** 2 * mmse).log()
    frac_opt = (log_var_opt - loss.log_small) / (loss.log_large - loss.log_small)

    def frac_of(sigma: Tensor) -> Tensor:
        k = (sigma[:, None].log() - loss.sigmas[None, 1:].log()).abs().argmin(1) + 1
        return frac_opt[k]

    x0, _ = mixture.sample(4_000, generator=g)
    bounds = {
        name: loss.vlb_bits_per_dim(
            FixedFraction(mixture, frac), x0, generator=torch.Generator().manual_seed(5)
        )
        for name, frac in [("optimal", frac_of), ("small", 0.0), ("large", 1.0)]
    }
    means = {name: float(b.mean()) for name, b in bounds.items()}
    assert means["optimal"] < means["small"] - 0.05 and means["optimal"] < means["large"] - 0.05, means
    nll = -mixture.log_prob(x0) / (2 * LN2)  # exact NLL in bits/dim
    for name, b in bounds.items():
        gap = b - nll
        assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(len(gap)), (
            name,
            means,
            float(nll.mean()),
        )


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def test_short_training_lowers_the_hybrid_loss():
    mixture = toy_mixture_2d()
    denoiser = tiny_denoiser(seed=1)
    loss = HybridLoss(VPCosine(), 1000, num_bins=None)
    g = torch.Generator().manual_seed(2)
    x_eval = mixture.sample(2048, generator=g)[0].float()
    k_eval = torch.randint(1, 1001, (2048,), generator=g)
    noise_eval = torch.randn(x_eval.shape, generator=g)

    def hybrid() -> float:
        with torch.no_grad():
            terms = loss.terms(denoiser, x_eval, k_eval, noise_eval)
        return float((terms["simple"] + loss.vlb_weight * loss.num_steps * terms["vlb"]).mean())

    before = hybrid()
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        opt.zero_grad()
        loss(denoiser, mixture.sample(256, generator=g)[0].float()).backward()
        opt.step()
    after = hybrid()
    assert after < 0.8 * before, (before, after)


class ExactMeanLearnedVariance(nn.Module):
    """Backbone: the exact mixture denoiser as the mean half (``x0``/``sigma`` conditioning, no parameters) and a
    small MLP of (x, log sigma) as the variance half, so only the variance head can learn."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture
        self.head = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x_in: Tensor, c_noise: Tensor, **_) -> Tensor:
        x = x_in * torch.sqrt(1 + c_noise[:, None] ** 2)
        mean = self.mixture(x.double(), c_noise.double()).to(x_in.dtype)
        return torch.cat([mean, self.head(torch.cat([x_in, c_noise[:, None].log() / 4], 1))], 1)


def test_hybrid_loss_teaches_the_variance_head_past_both_fixed_variances():
    """With the exact mean frozen, L_hybrid trains the variance head alone; after a short training the VLB with
    the learned variance is below the VLBs with beta-tilde and with beta (the fixed choices)."""
    mixture = toy_mixture_2d()
    torch.manual_seed(3)
    network = ExactMeanLearnedVariance(mixture)
    denoiser = Denoiser(network, "x0", noise_conditioning="sigma", learned_variance=True)
    loss = HybridLoss(VPCosine(), 25, num_bins=None)
    g = torch.Generator().manual_seed(4)
    opt = torch.optim.Adam(network.head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss(denoiser, mixture.sample(256, generator=g)[0].float()).backward()
        opt.step()
    x0 = mixture.sample(2000, generator=g)[0].float()
    bounds = {
        name: float(loss.vlb_bits_per_dim(model, x0, generator=torch.Generator().manual_seed(5)).mean())
        for name, model in [
            ("learned", denoiser),
            ("small", FixedFraction(mixture, 0.0)),
            ("large", FixedFraction(mixture, 1.0)),
        ]
    }
    assert bounds["learned"] < min(bounds["small"], bounds["large"]) - 0.03, bounds


def test_learned_sampler_evaluations_are_seen_by_forward_hooks(mixture):
    """tools/evaluate counts NFE with a forward pre-hook on the denoiser: the learned-variance sampler must
    call the module (not a side method) once per step unguided, twice per step behind a guidance wrapper
    (the wrapper's mean, CFG's two branches batched into one call, plus the head's fraction)."""
    sigmas = GRIDS["loglinear"]
    steps = len(sigmas) - 1
    denoiser = Denoiser(MixtureTwoHead(mixture, 0.3), "x0", noise_conditioning="sigma", learned_variance=True)
    calls = []
    denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    x = sigmas[0] * torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    cond = {"labels": torch.arange(8) % mixture.num_classes}
    sample_ddpm(denoiser, x.clone(), sigmas, variance="learned", cond=cond)
    assert len(calls) == steps
    calls.clear()
    guided = ClassifierFreeGuidance(denoiser, w=1.5, null_label=mixture.null_label)
    sample_ddpm(guided, x.clone(), sigmas, variance="learned", cond=cond)
    assert len(calls) == 2 * steps
