"""Likelihoods of a denoiser: probability-flow ODE NLL and the VDM continuous-time ELBO, in nats and bits/dim.

**Probability-flow ODE** (Song et al. 2021, "Score SDE", Sec. 4.3 and App. D.2; Karras et al. 2022, eq. 3).
In the VE view the ODE is ``dx/dsigma = f(x, sigma) = (x - D(x, sigma)) / sigma`` and the instantaneous
change of variables (Chen et al. 2018, FFJORD) ``d log p_sigma(x(sigma)) / dsigma = -div f`` gives::

    log p_{sigma_min}(x0) = log p_{sigma_max}(x(sigma_max)) + int_{sigma_min}^{sigma_max} div f dsigma,
    div f = (d - div_x D) / sigma.

We integrate in ``u = log sigma`` (``dx/du = x - D``, ``d(int)/du = d - div_x D``), so a uniform grid in u
is the log-spaced sigma grid, with fixed-step RK4 or Heun; the prior ``p_{sigma_max}`` is
``N(0, sigma_max^2 I)``.
``div_x D`` is exact (one backward pass per dimension: small d only) or Hutchinson's estimate
``E_v[v^T (dD/dx) v]`` with Rademacher or Gaussian probes ``v`` held fixed along the trajectory.

**VDM ELBO** (Kingma et al. 2021, eqs. 11-17). For ``x_t = alpha x0 + sigma eps``, ``SNR = exp(log_snr)``::

    -log p(x) <= KL(q(x_1 | x) || p(x_1)) + E[-log p(x | x_0)] + L_inf,
    L_inf = -1/2 E_{eps, t ~ U[t_min, t_max]} [(t_max - t_min) SNR'(t) ||x - x_hat(x_t, t)||^2]   (eq. 17)

and ``SNR'(t) = log_snr'(t) SNR(t) = log_snr'(t) / sigma_ve(t)^2``, so in the VE view the integrand is
``-log_snr'(t) ||x - D(x + sigma_ve eps, sigma_ve)||^2 / (2 sigma_ve^2)``. Changing the schedule only changes
the Monte-Carlo distribution of sigma (VDM Sec. 5.1): the expectation is ``int ||x - D||^2 / sigma^3 dsigma``,
so a learned schedule (``diffusion/vdm_schedule.py``) enters only through its endpoints and the variance.
The prior is ``N(0, sigma_max^2 I)`` in the VE view (``prior_variance="ve"``) or VDM's ``N(0, I)`` on the VP
latent ``z_1 = alpha_1 x_1``, i.e. ``N(0, (1 + sigma_max^2) I)`` in the VE view (``"vp"``). Decoders: the
Gaussian ``p(x | x_0) = N(x; x_{sigma_min}, sigma_min^2 I)`` for continuous data (expected NLL
``d/2 (1 + log 2 pi sigma_min^2)``), or VDM's factorised discrete decoder for data on a ``num_levels`` grid
(``p(x_i = v_k | z) = softmax_k(-(z_i - v_k)^2 / (2 sigma_min^2))``), which bounds the discrete NLL directly.

**Bits per dimension with dequantisation.** Data on the 8-bit grid ``x_k = k / 127.5 - 1`` (k = 0..255) has
bins of width ``Delta = 2/255``. With uniform dequantisation ``y = x + u``, ``u ~ U[-Delta/2, Delta/2)^d``,
``P(x) = int_bin p(y) dy = Delta^d E_u[p(x + u)] >= ...``, so by Jensen::

    -log2 P(x) / d <= E_u[-log p(x + u)] / (d log 2) + log2(127.5)           (+6.994 bits/dim)

(:func:`bits_per_dim` with ``num_levels=256``). Score SDE's convention, data ``(k + u)/128 - 1``, gives +7.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn, append_dims
from diffusion_lab.diffusion.schedules import NoiseSchedule

Probe = Literal["rademacher", "gaussian"]
Prior = Literal["ve", "vp"]
Decoder = Literal["gaussian", "discrete"]


# ---------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------
def bits_per_dim(nll_nats: Tensor, num_dims: int, num_levels: int | None = None) -> Tensor:
    """NLL in nats per sample -> bits/dim; ``num_levels`` (e.g. 256) adds ``log2((num_levels - 1) / 2)``, the
    bin-width term of uniform dequantisation for data in [-1, 1] (module docstring)."""
    bpd = nll_nats / (num_dims * math.log(2))
    if num_levels is not None:
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        bpd = bpd + math.log2((num_levels - 1) / 2)
    return bpd


def dequantize(x: Tensor, num_levels: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of data on the grid ``k / ((num_levels - 1)/2) - 1``: add
    ``U[-Delta/2, Delta/2)`` noise, ``Delta = 2 / (num_levels - 1)``."""
    delta = 2 / (num_levels - 1)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + (u - 0.5) * delta


def gaussian_log_prob(x: Tensor, variance: float) -> Tensor:
    """log N(x; 0, variance I) per sample, (B,)."""
    d = x[0].numel()
    sq = x.reshape(x.shape[0], -1).pow(2).sum(-1)
    return -0.5 * (sq / variance + d * math.log(2 * math.pi * variance))


# ---------------------------------------------------------------------------------------------------
# The ELBO's endpoint terms (differentiable in the noise levels, for learned schedules)
# ---------------------------------------------------------------------------------------------------
def prior_variance_for(sigma_max: Tensor | float, prior: Prior | float | None) -> Tensor | float:
    """Variance of the VE-view prior at ``sigma_max``: ``"ve"`` / None -> ``sigma_max^2``; ``"vp"`` -> VDM's
    ``N(0, I)`` on ``z_1 = x_1 / sqrt(1 + sigma_max^2)``, i.e. ``1 + sigma_max^2``; a number is used as is."""
    if prior is None or prior == "ve":
        return sigma_max**2
    if prior == "vp":
        return 1 + sigma_max**2
    if isinstance(prior, str):
        raise ValueError(f"unknown prior {prior!r}; expected 've', 'vp' or a variance")
    if prior <= 0:
        raise ValueError(f"prior variance must be > 0, got {prior}")
    return prior


def prior_kl(x0: Tensor, sigma_max: Tensor | float, prior_variance: Tensor | float) -> Tensor:
    """``KL(N(x0, sigma_max^2 I) || N(0, prior_variance I))`` per sample (B,), differentiable in both levels.

    ``d/2 (r - 1 - log r) + ||x0||^2 / (2 v)`` with ``r = sigma_max^2 / v``; with ``v = 1 + sigma_max^2`` this
    is VDM's latent loss ``1/2 sum(sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2)`` in VP units."""
    d = x0[0].numel()
    sq = x0.reshape(x0.shape[0], -1).pow(2).sum(-1)
    var = torch.as_tensor(prior_variance, dtype=x0.dtype, device=x0.device)
    ratio = torch.as_tensor(sigma_max, dtype=x0.dtype, device=x0.device) ** 2 / var
    return 0.5 * (d * (ratio - 1 - torch.log(ratio)) + sq / var)


def gaussian_decoder_nll(x0: Tensor, sigma_min: Tensor | float) -> Tensor:
    """``E_eps[-log N(x0; x0 + sigma_min eps, sigma_min^2 I)] = d/2 (1 + log 2 pi sigma_min^2)``, (B,)."""
    d = x0[0].numel()
    s = torch.as_tensor(sigma_min, dtype=x0.dtype, device=x0.device)
    return (0.5 * d * (1 + math.log(2 * math.pi) + 2 * torch.log(s))).expand(x0.shape[0])


def grid_values(
    num_levels: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Tensor:
    """The ``num_levels`` data values ``k / ((num_levels - 1) / 2) - 1`` in [-1, 1] (k = 0..num_levels-1)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    return torch.linspace(-1.0, 1.0, num_levels, dtype=dtype, device=device)


def discrete_decoder_nll(x0: Tensor, sigma_min: Tensor | float, num_levels: int, noise: Tensor) -> Tensor:
    """``-log p(x0 | z_0)`` of VDM's factorised discrete decoder (VDM App. / public code ``EncDec.decode``),
    (B,): ``z = x0 + sigma_min noise`` (VE view), ``p(x_i = v_k | z) = softmax_k(-(z_i - v_k)^2 / (2 sigma^2))``
    over the grid :func:`grid_values`. ``x0`` must lie on that grid (to 1e-3)."""
    values = grid_values(num_levels, x0.dtype, x0.device)
    index = torch.round((x0 + 1) * (num_levels - 1) / 2)
    off_grid = (
        (index < 0)
        | (index > num_levels - 1)
        | ((x0 - values[index.clamp(0, num_levels - 1).long()]).abs() > 1e-3)
    )
    if off_grid.any():
        bad = x0[off_grid].flatten()[0].item()
        raise ValueError(
            f"the discrete decoder needs data on the {num_levels}-level grid k/{(num_levels - 1) / 2:g} - 1, "
            f"got the value {bad}"
        )
    s = torch.as_tensor(sigma_min, dtype=x0.dtype, device=x0.device)
    z = (x0 + s * noise).reshape(x0.shape[0], -1, 1)
    logits = -0.5 * ((z - values) / s) ** 2  # (B, d, K)
    log_probs = torch.log_softmax(logits, -1)
    true = torch.gather(log_probs, -1, index.long().reshape(x0.shape[0], -1, 1)).squeeze(-1)
    return -true.sum(-1)


# ---------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------
def make_probes(
    x: Tensor, num_probes: int = 1, kind: Probe = "rademacher", generator: torch.Generator | None = None
) -> Tensor:
    """(P, B, ...) probe vectors with E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
    shape = (num_probes, *x.shape)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    raise ValueError(f"unknown probe kind {kind!r}; expected rademacher or gaussian")


def divergence(
    fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(fn(x) detached, div_x fn(x) per sample (B,)); ``fn`` maps (B, ...) -> (B, ...) sample-wise.

    Exact (``probes=None``: one backward pass per dimension) or Hutchinson's estimator averaged over the
    probes (P, B, ...): ``mean_p v_p . (J^T v_p)`` (Hutchinson 1989; Grathwohl et al. 2019).
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        out = fn(x_in)
        if out.shape != x.shape:
            raise ValueError(f"divergence needs fn(x) of x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
        if probes is None:
            flat = out.reshape(x.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x_in, retain_graph=True)
                div = div + g.reshape(x.shape[0], -1)[:, i]
        else:
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for p, v in enumerate(probes):
                (g,) = torch.autograd.grad((out * v).sum(), x_in, retain_graph=p < len(probes) - 1)
                div = div + (g * v).reshape(x.shape[0], -1).sum(-1)
            div = div / len(probes)
    return out.detach(), div.detach()


# ---------------------------------------------------------------------------------------------------
# Probability-flow ODE likelihood
# ---------------------------------------------------------------------------------------------------
@dataclass
class LikelihoodResult:
    """Per-sample results (B,): ``nll`` in nats, ``bpd`` bits/dim; ``prior_log_prob`` = log p_T(x_T),
    ``delta_log_prob`` = the integral of the divergence; ``x_T`` the encoding; ``nfe`` denoiser calls."""

    nll: Tensor
    bpd: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    x_T: Tensor
    nfe: int


def ode_likelihood(
    denoiser: DenoiserFn,
    x0: Tensor,
    *,
    sigma_min: float = 1e-3,
    sigma_max: float = 80.0,
    num_steps: int = 64,
    solver: Literal["rk4", "heun"] = "rk4",
    hutchinson: bool = False,
    num_probes: int = 1,
    probe: Probe = "rademacher",
    generator: torch.Generator | None = None,
    prior_variance: float | None = None,
    num_levels: int | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> LikelihoodResult:
    """NLL of ``x0`` under the probability-flow ODE of ``denoiser`` (module docstring), i.e. of the model's
    ``p_{sigma_min}``.

    Args:
        denoiser: ``D(x, sigma, **cond)``.
        x0: (B, ...) data (already dequantised for discrete data).
        sigma_min, sigma_max: integration range; ``num_steps`` intervals, uniform in log sigma.
        solver: ``rk4`` (4 evaluations per step) or ``heun`` (2).
        hutchinson: estimate div D with ``num_probes`` ``probe`` vectors (fixed along the path), drawn from
            ``generator``; otherwise exact (d backward passes per evaluation).
        prior_variance: variance of the Gaussian prior at ``sigma_max`` (default ``sigma_max^2``).
        num_levels: e.g. 256 to add the dequantisation term to ``bpd``.
        cond: conditioning keywords for the denoiser.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if solver not in ("rk4", "heun"):
        raise ValueError(f"unknown solver {solver!r}; expected rk4 or heun")
    cond = dict(cond or {})
    d = x0[0].numel()
    probes = make_probes(x0, num_probes, probe, generator) if hutchinson else None
    nfe = 0

    def dynamics(x: Tensor, u: float) -> tuple[Tensor, Tensor]:
        """(dx/du, d(log-det integral)/du) = (x - D, d - div D) at sigma = e^u."""
        nonlocal nfe
        nfe += 1
        sigma = torch.full((x.shape[0],), math.exp(u), dtype=x.dtype, device=x.device)
        den, div = divergence(lambda z: denoiser(z, sigma, **cond), x, probes)
        return x - den, d - div

    us = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_steps + 1, dtype=torch.float64).tolist()
    x = x0.detach().clone()
    delta = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for u0, u1 in zip(us[:-1], us[1:]):
        h = u1 - u0
        k1, l1 = dynamics(x, u0)
        if solver == "heun":
            k2, l2 = dynamics(x + h * k1, u1)
            x, delta = x + h / 2 * (k1 + k2), delta + h / 2 * (l1 + l2)
            continue
        k2, l2 = dynamics(x + h / 2 * k1, u0 + h / 2)
        k3, l3 = dynamics(x + h / 2 * k2, u0 + h / 2)
        k4, l4 = dynamics(x + h * k3, u1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    prior = gaussian_log_prob(x, sigma_max**2 if prior_variance is None else prior_variance)
    nll = -(prior + delta)
    return LikelihoodResult(nll, bits_per_dim(nll, d, num_levels), prior, delta, x, nfe)


# ---------------------------------------------------------------------------------------------------
# VDM continuous-time ELBO
# ---------------------------------------------------------------------------------------------------
@dataclass
class ElboResult:
    """Per-sample upper bounds on the NLL (B,): ``nll_bound`` (nats) = ``prior`` + ``reconstruction`` +
    ``diffusion``; ``bpd`` in bits/dim; ``diffusion_std_err`` the Monte-Carlo standard error of ``diffusion``
    (conservative: computed as if the stratified draws were independent; ``inf`` for one draw)."""

    nll_bound: Tensor
    bpd: Tensor
    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    diffusion_std_err: Tensor


def vdm_elbo(
    denoiser: DenoiserFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    num_t_samples: int = 1,
    generator: torch.Generator | None = None,
    prior_variance: float | Prior | None = None,
    time_sampling: Literal["log_snr", "t"] = "log_snr",
    control_variate_sigma_data: float | None = 0.5,
    decoder: Decoder = "gaussian",
    num_levels: int | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> ElboResult:
    """VDM continuous-time ELBO (Kingma et al. 2021, eq. 17; module docstring) of ``x0`` under any schedule.

    The schedule sets the range ``[sigma_ve(t_min), sigma_ve(t_max)]``; any ``NoiseSchedule`` works, including
    a learned one (``vdm_schedule.LearnedNoiseSchedule``, evaluated without gradients here).
    ``time_sampling="t"`` draws ``t ~ U[t_min, t_max]`` as VDM does (the integrand weight is the schedule's
    own ``-log_snr'(t)``); the default ``"log_snr"`` draws the log-SNR uniformly, the same expectation (VDM
    Sec. 5.1: only the endpoints matter) without the heavy ``1/t`` tail that VP schedules have near ``t = 0``.
    Draws are stratified, ``(u + i) / n`` with one uniform ``u`` per sample (VDM's low-discrepancy sampler).
    ``control_variate_sigma_data`` (``s``) subtracts the zero-mean terms of ``||x - D||^2 / sigma^2`` that an
    ideal denoiser of N(0, s^2 I) data would have, ``(s^4 (||eps||^2 - d) - 2 sigma s^2 x . eps) /
    (s^2 + sigma^2)^2``: the estimate stays unbiased for any ``s`` and its variance drops sharply (the
    ``||eps||^2`` fluctuation dominates at small sigma). ``None`` turns it off.

    ``prior_variance``: ``"ve"``/None (``sigma_max^2``), ``"vp"`` (VDM's ``N(0, I)`` in VP units) or a number.
    ``decoder="gaussian"`` bounds the density of continuous data, and ``num_levels`` (e.g. 256) then adds the
    dequantisation term to ``bpd``; ``decoder="discrete"`` (VDM's decoder, one ``eps_0`` draw) bounds
    ``-log P(x)`` of data on the ``num_levels`` grid directly, so ``bpd`` needs no dequantisation term.
    """
    if num_t_samples < 1:
        raise ValueError(f"num_t_samples must be >= 1, got {num_t_samples}")
    if decoder not in ("gaussian", "discrete"):
        raise ValueError(f"unknown decoder {decoder!r}; expected gaussian or discrete")
    if decoder == "discrete" and num_levels is None:
        raise ValueError("decoder='discrete' needs num_levels (the size of the data grid)")
    cond = dict(cond or {})
    b, d = x0.shape[0], x0[0].numel()
    t_min, t_max = schedule.t_min, schedule.t_max
    as_t = dict(dtype=x0.dtype, device=x0.device)
    with torch.no_grad():  # a learned schedule's parameters get no graph from an evaluation
        s_min = float(schedule.sigma_ve(torch.tensor(t_min, dtype=torch.float64)))
        s_max = float(schedule.sigma_ve(torch.tensor(t_max, dtype=torch.float64)))
    prior = prior_kl(x0, s_max, prior_variance_for(s_max, prior_variance))

    # stratified uniforms, one offset per sample: (u + i) / n, i = 0..n-1
    u = torch.rand(b, 1, generator=generator, **as_t)
    strata = ((u + torch.arange(num_t_samples, **as_t)[None]) / num_t_samples).reshape(-1)  # (B n,)
    if time_sampling == "log_snr":  # lambda ~ U[lambda_min, lambda_max]: weight (lambda range) / 2
        lam_min, lam_max = -2 * math.log(s_max), -2 * math.log(s_min)
        sigma = torch.exp(-(lam_min + (lam_max - lam_min) * strata) / 2)
        weight = torch.full_like(sigma, (lam_max - lam_min) / 2)
    elif time_sampling == "t":  # t ~ U[t_min, t_max]: weight -(t_max - t_min) log_snr'(t) / 2
        t = t_min + (t_max - t_min) * strata
        with torch.no_grad():
            sigma = schedule.sigma_ve(t).to(x0.dtype)
            weight = -schedule.dlog_snr_dt(t).to(x0.dtype) * (t_max - t_min) / 2
    else:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; expected log_snr or t")
    x_rep = x0.repeat_interleave(num_t_samples, 0)
    eps = torch.randn(x_rep.shape, generator=generator, **as_t)
    if decoder == "gaussian":
        reconstruction = gaussian_decoder_nll(x0, s_min)
    else:
        eps_0 = torch.randn(x0.shape, generator=generator, **as_t)
        reconstruction = discrete_decoder_nll(x0, s_min, num_levels, eps_0)
    rep_cond = {
        k: v.repeat_interleave(num_t_samples, 0)
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b
        else v
        for k, v in cond.items()
    }
    den = denoiser(x_rep + append_dims(sigma, x0.ndim) * eps, sigma, **rep_cond)
    err = (x_rep - den).reshape(b * num_t_samples, -1).pow(2).sum(-1) / sigma**2
    if control_variate_sigma_data is not None:
        s2 = control_variate_sigma_data**2
        eps_sq = eps.reshape(b * num_t_samples, -1).pow(2).sum(-1)
        x_dot_eps = (x_rep * eps).reshape(b * num_t_samples, -1).sum(-1)
        err = err - (s2**2 * (eps_sq - d) - 2 * sigma * s2 * x_dot_eps) / (s2 + sigma**2) ** 2
    terms = (weight * err).reshape(b, num_t_samples)
    diffusion = terms.mean(1)
    std_err = (
        terms.std(1) / math.sqrt(num_t_samples) if num_t_samples > 1 else torch.full_like(diffusion, math.inf)
    )
    nll = prior + reconstruction + diffusion
    bpd = bits_per_dim(nll, d, num_levels if decoder == "gaussian" else None)
    return ElboResult(nll, bpd, prior, reconstruction, diffusion, std_err)


__all__ = [
    "LikelihoodResult",
    "ElboResult",
    "bits_per_dim",
    "dequantize",
    "gaussian_log_prob",
    "prior_variance_for",
    "prior_kl",
    "gaussian_decoder_nll",
    "grid_values",
    "discrete_decoder_nll",
    "make_probes",
    "divergence",
    "ode_likelihood",
    "vdm_elbo",
]
