"""The VE, VP and sub-VP SDEs and their native discretisations: NCSN's and DDPM's Markov chains.

Song et al. 2021 ("Score SDE", Sec. 3.4 and App. B) obtain the SDEs as limits of the two discrete models:

* **VE SDE = NCSN / SMLD** (eqs. 8-9). NCSN's perturbation chain over geometric levels
  ``sigma_i = sigma_min (sigma_max / sigma_min)^{(i-1)/(N-1)}`` is
  ``x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z``. Since ``g(t)^2 = d sigma(t)^2 / dt``, integrating the
  VE SDE's noise exactly over ``[t_{i-1}, t_i]`` gives the same increment: the VE SDE *is* the chain at its
  native levels ``t_i = (i-1)/(N-1)``.
* **VP SDE = DDPM** (eqs. 10-11). DDPM's chain ``x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z`` with
  Score SDE's ``beta_i = beta_min / N + (i - 1)(beta_max - beta_min) / (N (N - 1))`` (``beta(t_i) / N``,
  ``t_i = (i-1)/(N-1)``) has marginals ``prod (1 - beta_i)``; for ``beta_min = 0.1``,
  ``beta_max = 20``, ``N = 1000`` is exactly DDPM's ``linspace(1e-4, 0.02, 1000)``.
* **sub-VP SDE** (eq. 12): ``dx = -beta/2 x dt + sqrt(beta (1 - e^{-2B(t)})) dw``; its marginal variance
  ``Sigma(t)`` solves ``dSigma/dt = 2 f Sigma + g^2`` (Score SDE eq. 33 / App. B), giving
  ``Sigma(t) = e^{-B} Sigma(0) + (1 - e^{-B})^2`` for the closed-form schedule in
  :class:`~diffusion_lab.diffusion.schedules.SubVP`.

Reverse direction: DDPM's ancestral step (Ho et al. 2020, eq. 11 / Alg. 2) in its own (VP) coordinates is
:func:`ddpm_ancestral_step_vp`; NCSN's ancestral step and the VE reverse-diffusion predictor (Score SDE eqs.
45-47) are :func:`ve_reverse_step`. The samplers of ``diffusion.samplers`` perform the same steps in the VE view;
``tests/diffusion/test_sde.py`` checks they coincide at the native steps.

Everything here is plain tensor math on the schedules of ``diffusion.schedules`` (which hold ``f`` and ``g^2``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import VE, NoiseSchedule, VPLinear


# ---------------------------------------------------------------------------------------------------
# Native levels of the two discrete models
# ---------------------------------------------------------------------------------------------------
def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def ncsn_levels(schedule: VE, num_steps: int) -> Tensor:
    """NCSN's ``N`` noise levels (ascending) as the VE SDE at ``t_i = i/(N-1)``, i = 0..N-1 (Score SDE eq. 9)."""
    _check_num_steps(num_steps)
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return schedule.sigma(t)


def ddpm_betas(schedule: VPLinear, num_steps: int) -> Tensor:
    """DDPM's betas as the VP SDE's native discretisation (Score SDE App. B, ``beta_i = beta_bar_i / N``):
    ``beta_i = (beta_min + i/(N-1) (beta_max - beta_min)) / N``, i = 0..N-1 (float64)."""
    _check_num_steps(num_steps)
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return schedule.linear_beta(t) / num_steps


# ---------------------------------------------------------------------------------------------------
# Forward chains
# ---------------------------------------------------------------------------------------------------
def ve_forward_step(x: Tensor, sigma_prev: float, sigma_next: float, noise: Tensor) -> Tensor:
    """NCSN chain / exact VE SDE step: ``x + sqrt(sigma_next^2 - sigma_prev^2) z`` (Score SDE eq. 8)."""
    if not 0 <= sigma_prev <= sigma_next:
        raise ValueError(f"need 0 <= sigma_prev <= sigma_next, got {sigma_prev}, {sigma_next}")
    return x + math.sqrt(sigma_next**2 - sigma_prev**2) * noise


def vp_forward_step(x: Tensor, beta: float, noise: Tensor) -> Tensor:
    """DDPM chain: ``sqrt(1 - beta) x + sqrt(beta) z`` (Ho et al. 2020, eq. 2; Score SDE eq. 10)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    return math.sqrt(1 - beta) * x + math.sqrt(beta) * noise


def euler_maruyama_variance(
    schedule: NoiseSchedule, t_grid: Tensor, variance0: Tensor | float = 0.0
) -> Tensor:
    """Marginal variance of the Euler-Maruyama chain ``x <- x + f x dt + g sqrt(dt) z`` of a schedule's forward
    SDE, propagated exactly: ``Var <- (1 + f dt)^2 Var + g^2 dt`` (f, g^2 at the left end). Returns the variance at
    every grid time (float64); converges to the SDE's marginal variance at first order in ``dt``."""
    t_grid = torch.as_tensor(t_grid, dtype=torch.float64)
    if t_grid.ndim != 1 or t_grid.numel() < 2 or (t_grid[1:] <= t_grid[:-1]).any():
        raise ValueError("t_grid must be a strictly increasing 1-D tensor with at least 2 times")
    f, g2 = schedule.sde_drift_coef(t_grid[:-1]), schedule.sde_diffusion_sq(t_grid[:-1])
    dt = t_grid[1:] - t_grid[:-1]
    out = [torch.as_tensor(variance0, dtype=torch.float64)]
    for i in range(dt.numel()):
        out.append((1 + f[i] * dt[i]) ** 2 * out[-1] + g2[i] * dt[i])
    return torch.stack(out)


def variance_ode_rk4(
    schedule: NoiseSchedule, t0: float, t1: float, variance0: float = 0.0, num_steps: int = 1000
) -> float:
    """``Sigma(t1)`` from ``dSigma/dt = 2 f(t) Sigma + g(t)^2`` (Score SDE eq. 33, isotropic) by classic RK4."""
    _check_num_steps(num_steps)

    def rhs(t: float, s: float) -> float:
        tt = torch.tensor(t, dtype=torch.float64)
        return float(2 * schedule.sde_drift_coef(tt) * s + schedule.sde_diffusion_sq(tt))

    h, s, t = (t1 - t0) / num_steps, float(variance0), float(t0)
    for _ in range(num_steps):
        k1 = rhs(t, s)
        k2 = rhs(t + h / 2, s + h / 2 * k1)
        k3 = rhs(t + h / 2, s + h / 2 * k2)
        k4 = rhs(t + h, s + h * k3)
        s, t = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return s


# ---------------------------------------------------------------------------------------------------
# Reverse steps in each model's own coordinates
# ---------------------------------------------------------------------------------------------------
def ve_reverse_step(
    x: Tensor,
    score: Tensor,
    sigma: float,
    sigma_next: float,
    noise: Tensor,
    kind: Literal["reverse_diffusion", "ancestral"] = "reverse_diffusion",
) -> Tensor:
    """One reverse step of the VE SDE / NCSN from ``sigma`` down to ``sigma_next`` (Score SDE App. E).

    ``reverse_diffusion`` (eq. 45 for the VE SDE): ``x + (sigma^2 - sigma_next^2) s + sqrt(sigma^2 - sigma_next^2) z``.
    ``ancestral`` (eq. 47, SMLD ancestral sampling): ``x + (sigma^2 - sigma_next^2) s
    + sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) z``.
    """
    if not 0 < sigma_next < sigma:
        raise ValueError(f"need 0 < sigma_next < sigma, got {sigma_next}, {sigma}")
    var = sigma**2 - sigma_next**2
    if kind == "reverse_diffusion":
        std = math.sqrt(var)
    elif kind == "ancestral":
        std = math.sqrt(sigma_next**2 * var / sigma**2)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected reverse_diffusion or ancestral")
    return x + var * score + std * noise


def ddpm_ancestral_step_vp(
    x_t: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    t: int,
    noise: Tensor,
    variance: Literal["small", "large"] = "small",
) -> Tensor:
    """DDPM's sampler step from ``t`` to ``t - 1`` in VP coordinates (Ho et al. 2020, Alg. 2, eq. 11)::

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,

    ``sigma_t^2 = beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` ("small") or ``beta_t`` ("large");
    ``t`` is a 0-based index into ``alphas_cumprod`` (t >= 1).
    """
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if not 1 <= t < abar.numel():
        raise ValueError(f"t must be in [1, {abar.numel() - 1}], got {t}")
    abar_t, abar_prev = float(abar[t]), float(abar[t - 1])
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    if variance == "small":
        var = beta_t * (1 - abar_prev) / (1 - abar_t)
    elif variance == "large":
        var = beta_t
    else:
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    mean = (x_t - beta_t / math.sqrt(1 - abar_t) * eps) / math.sqrt(alpha_t)
    return mean + math.sqrt(var) * noise


__all__ = [
    "ncsn_levels",
    "ddpm_betas",
    "ve_forward_step",
    "vp_forward_step",
    "euler_maruyama_variance",
    "variance_ode_rk4",
    "ve_reverse_step",
    "ddpm_ancestral_step_vp",
]
