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
the Monte-Carlo distribution of sigma (VDM Sec. 5.1): the expectation is ``int ||x - D||^2 / sigma^3 dsigma``.
The prior is ``N(0, sigma_max^2 I)`` in the VE view, the decoder
``p(x | x_0) = N(x; x_{sigma_min}, sigma_min^2 I)`` (expected NLL ``d/2 (1 + log 2 pi sigma_min^2)``).

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
    prior_variance: float | None = None,
    time_sampling: Literal["log_snr", "t"] = "log_snr",
    control_variate_sigma_data: float | None = 0.5,
    num_levels: int | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> ElboResult:
    """VDM continuous-time ELBO (Kingma et al. 2021, eq. 17; module docstring) of ``x0`` under any schedule.

    The schedule sets the range ``[sigma_ve(t_min), sigma_ve(t_max)]``. ``time_sampling="t"`` draws
    ``t ~ U[t_min, t_max]`` as VDM does; the default ``"log_snr"`` draws the log-SNR uniformly, the same
    expectation (VDM Sec. 5.1) without the heavy ``1/t`` tail that VP schedules have near ``t = 0`` (their
    ``log_snr'(t) ~ -1/t``). Draws are stratified, ``(u + i) / n`` with one uniform ``u`` per sample
    (VDM's low-discrepancy sampler). ``control_variate_sigma_data`` (``s``) subtracts the zero-mean terms of
    ``||x - D||^2 / sigma^2`` that an ideal denoiser of N(0, s^2 I) data would have, ``(s^4 (||eps||^2 - d)
    - 2 sigma s^2 x . eps) / (s^2 + sigma^2)^2``: the estimate stays unbiased for any ``s`` and its variance
    drops sharply (the ``||eps||^2`` fluctuation dominates at small sigma). ``None`` turns it off.
    """
    if num_t_samples < 1:
        raise ValueError(f"num_t_samples must be >= 1, got {num_t_samples}")
    cond = dict(cond or {})
    b, d = x0.shape[0], x0[0].numel()
    t_min, t_max = schedule.t_min, schedule.t_max
    as_t = dict(dtype=x0.dtype, device=x0.device)
    s_min = float(schedule.sigma_ve(torch.tensor(t_min, dtype=torch.float64)))
    s_max = float(schedule.sigma_ve(torch.tensor(t_max, dtype=torch.float64)))
    prior_var = s_max**2 if prior_variance is None else prior_variance

    # KL(N(x, s_max^2 I) || N(0, prior_var I)) and the Gaussian decoder's expected NLL, both closed form
    sq = x0.reshape(b, -1).pow(2).sum(-1)
    ratio = s_max**2 / prior_var
    prior = 0.5 * (d * (ratio - 1 - math.log(ratio)) + sq / prior_var)
    reconstruction = torch.full((b,), 0.5 * d * (1 + math.log(2 * math.pi * s_min**2)), **as_t)

    # stratified uniforms, one offset per sample: (u + i) / n, i = 0..n-1
    u = torch.rand(b, 1, generator=generator, **as_t)
    strata = ((u + torch.arange(num_t_samples, **as_t)[None]) / num_t_samples).reshape(-1)  # (B n,)
    if time_sampling == "log_snr":  # lambda ~ U[lambda_min, lambda_max]: weight (lambda range) / 2
        lam_min, lam_max = -2 * math.log(s_max), -2 * math.log(s_min)
        sigma = torch.exp(-(lam_min + (lam_max - lam_min) * strata) / 2)
        weight = torch.full_like(sigma, (lam_max - lam_min) / 2)
    elif time_sampling == "t":  # t ~ U[t_min, t_max]: weight -(t_max - t_min) log_snr'(t) / 2
        t = t_min + (t_max - t_min) * strata
        sigma = schedule.sigma_ve(t).to(x0.dtype)
        weight = -schedule.dlog_snr_dt(t).to(x0.dtype) * (t_max - t_min) / 2
    else:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; expected log_snr or t")
    x_rep = x0.repeat_interleave(num_t_samples, 0)
    eps = torch.randn(x_rep.shape, generator=generator, **as_t)
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
    return ElboResult(nll, bits_per_dim(nll, d, num_levels), prior, reconstruction, diffusion, std_err)


__all__ = [
    "LikelihoodResult",
    "ElboResult",
    "bits_per_dim",
    "dequantize",
    "gaussian_log_prob",
    "make_probes",
    "divergence",
    "ode_likelihood",
    "vdm_elbo",
]
