"""Score-based stochastic samplers: annealed Langevin dynamics (NCSN) and predictor-corrector (score SDE).

The score comes from the denoiser by Tweedie's formula, ``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2``,
and one unadjusted Langevin step with step size ``alpha`` is

    x <- x + (alpha / 2) grad log p_sigma(x) + sqrt(alpha) z,       z ~ N(0, I).

Both samplers end with a denoising step ``x0 = D(x, sigma_min)`` at the last positive level (the "noise
removal" of Song et al. 2021b and Jolicoeur-Martineau et al. 2021), so they return x0 like every sampler.
"""

from __future__ import annotations

import math
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


def langevin_update(x: Tensor, denoised: Tensor, sigma: float, step: Tensor | float, noise: Tensor) -> Tensor:
    """``x + (step/2)(denoised - x)/sigma^2 + sqrt(step) noise``: one Langevin step on ``p_sigma``.

    ``step`` is a float or a 0-d tensor (the score-SDE corrector's data-dependent step stays on device).
    """
    drift = torch.lerp(x, denoised, step / (2 * sigma**2))
    return drift.add_(noise * step**0.5) if isinstance(step, Tensor) else drift.add_(noise, alpha=step**0.5)


def sample_annealed_langevin(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    step_size: float = 2e-5,
    n_steps_each: int = 100,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, "NCSN", Algorithm 1).

    For each positive level ``sigma_i`` run ``n_steps_each`` Langevin steps with step size
    ``alpha_i = step_size * sigma_i^2 / sigma_L^2`` (``sigma_L`` the smallest positive level), then denoise
    once at ``sigma_L``. NCSN's CIFAR-10 settings: 10 geometric levels 1..0.01, ``step_size=2e-5``,
    ``n_steps_each=100``. Since ``alpha_i / (2 sigma_i^2) = step_size / (2 sigma_L^2)`` for every level,
    the drift pulls x towards ``D`` by the same fraction at each step. Cost: ``L * n_steps_each + 1``
    evaluations; the callback runs once per level with the state on entering it.
    """
    if step_size <= 0 or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ValueError(
            f"need step_size > 0 and an integer n_steps_each >= 1, got {step_size}, {n_steps_each!r}"
        )
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    sigma_last = s[-2]
    for i in range(model.steps):
        alpha = step_size * s[i] ** 2 / sigma_last**2
        for t in range(n_steps_each):
            denoised = model.at(x, i)
            if t == 0:
                model.report(callback, i, x, denoised)
            x = langevin_update(x, denoised, s[i], alpha, randn_like(x, generator))
    return model.at(x, model.steps - 1)


Predictor = Literal["reverse_diffusion", "ancestral", "euler", "none"]


def sample_pc(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    predictor: Predictor = "reverse_diffusion",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021b, "Score SDE", Algorithms 2 and 4) in the VE view.

    Predictor from ``sigma_i`` to ``sigma_{i+1}``, with ``D = D(x, sigma_i)``:

    * ``reverse_diffusion`` (VE-SDE discretisation, eq. 47):
      ``x + (sigma_i^2 - sigma_{i+1}^2) grad log p + sqrt(sigma_i^2 - sigma_{i+1}^2) z``;
    * ``ancestral``: DDPM/NCSN ancestral sampling (the posterior step, eta = 1);
    * ``euler``: the probability-flow ODE Euler step (= DDIM), deterministic;
    * ``none``: corrector only.

    Corrector: ``n_corrector_steps`` Langevin steps at ``sigma_{i+1}`` with
    ``eps = 2 (snr ||z|| / ||grad log p||)^2``, ``x <- x + eps grad log p + sqrt(2 eps) z`` (Algorithm 4;
    ``alpha_i = 1`` for VE, and the VP corrector is the same chain seen through ``x_vp = alpha x``).
    As in the reference implementation the norms are per-sample norms averaged over the batch, so the step
    does not depend on the sample's own draw ``z``. Song et al. use ``snr=0.16`` for VE CIFAR-10.
    The last step to ``sigma = 0`` is the noise-free ``x0 = D``. Cost ``N + (N - 1) n_corrector_steps``.
    """
    if predictor not in ("reverse_diffusion", "ancestral", "euler", "none"):
        raise ValueError(
            f"unknown predictor {predictor!r}; expected reverse_diffusion, ancestral, euler or none"
        )
    if snr <= 0 or not isinstance(n_corrector_steps, int) or n_corrector_steps < 0:
        raise ValueError(
            f"need snr > 0 and an integer n_corrector_steps >= 0, got {snr}, {n_corrector_steps!r}"
        )
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    for i in range(model.steps):
        denoised = model.at(x, i)
        model.report(callback, i, x, denoised)
        sigma, sigma_next = s[i], s[i + 1]
        if sigma_next == 0:
            return denoised
        if predictor == "reverse_diffusion":
            x = torch.lerp(x, denoised, 1 - sigma_next**2 / sigma**2)
            x = x.add_(randn_like(x, generator), alpha=math.sqrt(sigma**2 - sigma_next**2))
        elif predictor == "ancestral":
            sigma_down, sigma_up = ancestral_levels(sigma, sigma_next, 1.0)
            x = ddim_step(x, denoised, sigma, sigma_down).add_(randn_like(x, generator), alpha=sigma_up)
        elif predictor == "euler":
            x = ddim_step(x, denoised, sigma, sigma_next)
        for _ in range(n_corrector_steps):
            corrector_denoised = model.at(x, i + 1)
            noise = randn_like(x, generator)
            score_norm = (corrector_denoised - x).flatten(1).norm(dim=1).mean() / sigma_next**2
            noise_norm = noise.flatten(1).norm(dim=1).mean()
            eps = 2 * (snr * noise_norm / score_norm) ** 2
            # A zero score norm (D(x) == x: the score is below the dtype's resolution, e.g. bfloat16 at tiny
            # sigma) makes the step infinite and the sample NaN; with no score there is no Langevin move.
            eps = torch.where(torch.isfinite(eps), eps, torch.zeros_like(eps))
            x = langevin_update(x, corrector_denoised, sigma_next, 2 * eps, noise)
    return x


__all__ = ["langevin_update", "sample_annealed_langevin", "sample_pc"]
