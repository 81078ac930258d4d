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
same sampler (a test checks this identity). DDPM with a *learned* variance (Nichol & Dhariwal 2021, eq. 15)
keeps ``sigma_down`` and draws the noise with the per-element std ``small^(1 - frac) large^frac`` between
the two ``sigma_up`` above, ``frac`` coming from the denoiser's variance head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

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
Variance = Literal["small", "large", "learned"]


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


def ddpm_learned_std(sigma: float, sigma_next: float, frac: Tensor) -> Tensor:
    """Per-element VE std of iDDPM's learned reverse step from ``sigma`` to ``sigma_next`` (both > 0).

    Nichol & Dhariwal (2021, eq. 15): ``Sigma = exp(frac log beta + (1 - frac) log beta_tilde)``, with the
    step's own betas on any grid as in their respacing (sec. 4): ``beta = 1 - abar(sigma) / abar(sigma_next)``,
    ``beta_tilde = (1 - abar(sigma_next)) / (1 - abar(sigma)) beta``, ``abar(s) = 1 / (1 + s^2)``. Dividing
    ``x_vp`` by ``sqrt(abar(sigma_next))`` scales both variances by the same factor, so in the VE view the
    interpolation is between the two ``sigma_up`` of :func:`ddpm_levels`: ``std = small^(1 - frac) large^frac``
    (exactly ``small`` at frac = 0 and ``large`` at frac = 1). ``frac`` (any shape) gives the std's shape.
    """
    _, small = ddpm_levels(sigma, sigma_next, "small")
    _, large = ddpm_levels(sigma, sigma_next, "large")
    return small ** (1 - frac) * large**frac


def variance_head(denoiser: DenoiserFn) -> tuple[Any, bool]:
    """The module with a learned variance head (``learned_variance`` and ``denoise_with_variance``) behind
    ``denoiser``, following wrappers' ``.denoiser`` (guidance) and ``.averaged`` (EMA) links, and whether it is
    ``denoiser`` itself. ValueError when there is none."""
    node: Any = denoiser
    while node is not None:
        if getattr(node, "learned_variance", False) and hasattr(node, "denoise_with_variance"):
            return node, node is denoiser
        nxt = getattr(node, "denoiser", None)
        node = nxt if nxt is not None else getattr(node, "averaged", None)
    raise ValueError(
        f"variance='learned' needs a denoiser with a learned variance head (Denoiser(learned_variance=True), "
        f"or a wrapper around one); got {type(denoiser).__name__} without one: use variance='small' or 'large'"
    )


def _learned_variance_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None,
    callback: Callback | None,
    cond: Cond | None,
) -> Tensor:
    """DDPM steps with the learned per-element std of :func:`ddpm_learned_std`.

    An unwrapped variance head gives mean and fraction in one call; behind a wrapper (guidance) the mean is the
    wrapper's and the fraction the head's under the same conditioning (one more evaluation per step; GLIDE
    likewise keeps the conditional branch's variance under classifier-free guidance).
    """
    head, direct = variance_head(denoiser)
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    for i in range(model.steps):
        level = model.sigmas[i].expand(x.shape[0])
        if direct:
            model.nfe += 1
            denoised, frac = head.denoise_with_variance(x, level, **model.cond)
        else:
            denoised = model.at(x, i)
            model.nfe += 1
            frac = head.variance_fraction(x, level, **model.cond)
        model.report(callback, i, x, denoised)
        sigma_down, _ = ddpm_levels(s[i], s[i + 1], "small")  # the mean is the posterior's for every variance
        x = ddim_step(x, denoised, s[i], sigma_down)
        if s[i + 1] > 0:  # Algorithm 2: no noise on the last step
            x = x.addcmul_(ddpm_learned_std(s[i], s[i + 1], frac.to(x.dtype)), randn_like(x, generator))
    return x


def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    variance: Variance = "small",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): draw ``x_next ~ q(x_next | x, x0 = D(x, sigma))``
    between consecutive grid levels, ``x_next = D + (sigma_next^2/sigma)(x - D)/sigma + sigma_up z``
    (:func:`ddpm_levels`). On a discrete model's full 1000-level grid this is the original sampler; on a
    respaced grid it is the respaced DDPM of Nichol & Dhariwal (2021, sec. 4).

    ``variance``: ``small`` (posterior beta-tilde), ``large`` (beta) or ``learned`` (iDDPM eq. 15, the fraction
    from the denoiser's variance head, :func:`ddpm_learned_std`; valid on any grid).
    """
    if variance not in ("small", "large", "learned"):
        raise ValueError(
            "variance must be 'small' (posterior beta-tilde), 'large' (beta) or 'learned' (iDDPM), "
            f"got {variance!r}"
        )
    if variance == "learned":
        return _learned_variance_loop(denoiser, x, sigmas, generator=generator, callback=callback, cond=cond)
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
    "ddpm_learned_std",
    "variance_head",
]
