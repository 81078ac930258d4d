"""First-order samplers built on the DDIM step: Euler/DDIM(eta), Euler-ancestral and DDPM ancestral.

All four are one update in the VE view ``x = x0 + sigma eps`` (see :func:`ancestral_levels`)::

    x_next = D + sigma_down * (x - D) / sigma + s_noise * sigma_up * z,       z ~ N(0, I)

and differ only in ``(sigma_down, sigma_up)``:

=====================  =====================================================  ===============================
 sampler                sigma_up                                               sigma_down
=====================  =====================================================  ===============================
 euler / ddim eta=0     0                                                      sigma_next
 ddim(eta)              eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma    sqrt(sigma_next^2 - sigma_up^2)
 ddpm, small variance   ddim(eta=1)                                            sigma_next^2 / sigma
 ddpm, large variance   sqrt((sigma^2 - sigma_next^2)(1 + sigma_next^2)        sigma_next^2 / sigma
                        / (1 + sigma^2))
=====================  =====================================================  ===============================

so DDPM with the posterior ("small") variance, DDIM with eta = 1 and Euler-ancestral with eta = 1 are the
same sampler (a test checks this identity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import (
    Callback,
    Cond,
    GridDenoiser,
    ancestral_levels,
    ddim_step,
    randn_like,
)

LevelSplit = Callable[[float, float], tuple[float, float]]


def _ancestral_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    split: LevelSplit,
    *,
    s_noise: float = 1.0,
    generator: torch.Generator | None,
    callback: Callback | None,
    cond: Cond | None,
) -> Tensor:
    """``x <- D + sigma_down (x - D)/sigma + s_noise sigma_up z`` per step; ``split(s, s') = (down, up)``."""
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    for i in range(model.steps):
        denoised = model.at(x, i)
        model.report(callback, i, x, denoised)
        sigma_down, sigma_up = split(s[i], s[i + 1])
        x = ddim_step(x, denoised, s[i], sigma_down)
        if sigma_up > 0:
            x = x.add_(randn_like(x, generator), alpha=s_noise * sigma_up)
    return x


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Euler's method on the PF-ODE ``dx/dsigma = (x - D)/sigma`` (Karras et al. 2022, Alg. 1 without the
    Heun correction): ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i)(x_i - D_i)/sigma_i``.

    This is exactly deterministic DDIM (Song et al. 2021a, eq. 12, eta = 0): see :func:`ddim_step`.
    N steps cost N denoiser evaluations; global error O(1/N). ``generator`` is unused (deterministic).
    """
    return _ancestral_loop(
        denoiser,
        x,
        sigmas,
        lambda s, s_next: (s_next, 0.0),
        generator=generator,
        callback=callback,
        cond=cond,
    )


def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021a, eq. 12) on an arbitrary grid, written in the VE view.

    The textbook update on ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``::

        x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s_t^2) eps_hat + s_t z

    divided by ``sqrt(abar_{t-1})`` (with ``sigma = sqrt((1 - abar)/abar)``) is
    ``x_next = x0_hat + sigma_down eps_hat + sigma_up z`` with the levels of :func:`ancestral_levels`.
    ``eta = 0`` is the deterministic DDIM ODE solver (= :func:`sample_euler`), ``eta = 1`` is DDPM.
    Each step's ``denoised`` reaches the callback, so teacher trajectories for DSNO and the two-step
    targets of progressive distillation come from the same function (or from :func:`ddim_step`).
    """
    _check_nonnegative("eta", eta)
    return _ancestral_loop(
        denoiser,
        x,
        sigmas,
        lambda s, s_next: ancestral_levels(s, s_next, eta),
        generator=generator,
        callback=callback,
        cond=cond,
    )


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Euler-ancestral (k-diffusion): an Euler step down to ``sigma_down`` then fresh noise up to
    ``sigma_next``: ``x_next = x + (sigma_down - sigma) eps_hat + s_noise sigma_up z``.

    With the DDIM(eta) levels of :func:`ancestral_levels` this is DDIM(eta) with an extra noise scale
    ``s_noise``; at eta = 1 it samples DDPM's posterior ``q(x_next | x, x0 = D)`` (Ho et al. 2020, eq. 7).
    """
    _check_nonnegative("eta", eta)
    _check_nonnegative("s_noise", s_noise)
    return _ancestral_loop(
        denoiser,
        x,
        sigmas,
        lambda s, s_next: ancestral_levels(s, s_next, eta),
        s_noise=s_noise,
        generator=generator,
        callback=callback,
        cond=cond,
    )


def ddpm_levels(sigma: float, sigma_next: float, variance: Literal["small", "large"]) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of DDPM ancestral sampling between two consecutive levels (VE view).

    The forward process from ``sigma_next`` to ``sigma`` adds ``N(0, (sigma^2 - sigma_next^2) I)``, so the
    posterior ``q(x_next | x, x0)`` (Ho et al. 2020, eqs. 6-7, divided by ``sqrt(abar_{t-1})``) has mean
    ``x0 + (sigma_next^2 / sigma^2)(x - x0)`` and variance ``sigma_next^2 (sigma^2 - sigma_next^2)/sigma^2``
    ("small", beta-tilde). "large" keeps the mean and uses the VP ``beta_t = 1 - abar_t/abar_{t-1}`` instead,
    ``(sigma^2 - sigma_next^2)(1 + sigma_next^2)/(1 + sigma^2)`` in the VE scale (Ho et al. 2020, sec. 3.2).
    The last step (``sigma_next = 0``) adds no noise (Algorithm 2, ``z = 0`` at t = 1).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_down = sigma_next**2 / sigma
    if variance == "small":
        return sigma_down, sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
    return sigma_down, math.sqrt((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))


def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    variance: Literal["small", "large"] = "small",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): draw ``x_next ~ q(x_next | x, x0 = D(x, sigma))``
    between consecutive grid levels, ``x_next = D + (sigma_next^2/sigma)(x - D)/sigma + sigma_up z``
    (:func:`ddpm_levels`). On a discrete model's full 1000-level grid this is the original sampler; on a
    respaced grid it is the respaced DDPM of Nichol & Dhariwal (2021, sec. 4).
    """
    if variance not in ("small", "large"):
        raise ValueError(
            f"variance must be 'small' (posterior beta-tilde) or 'large' (beta), got {variance!r}"
        )
    return _ancestral_loop(
        denoiser,
        x,
        sigmas,
        lambda s, s_next: ddpm_levels(s, s_next, variance),
        generator=generator,
        callback=callback,
        cond=cond,
    )


__all__ = [
    "sample_euler",
    "sample_ddim",
    "sample_euler_ancestral",
    "sample_ddpm",
    "ddpm_levels",
]
