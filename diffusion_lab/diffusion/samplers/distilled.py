"""The N-step stochastic sampler of guided distillation (Meng et al., CVPR 2023, sec. 4.3).

A distilled N-step model is sampled deterministically with N DDIM steps (``sample_ddim`` on the model's grid), or
stochastically: from level ``sigma_i`` take one deterministic DDIM step of *twice* the length, to ``sigma_{i+2}``,
then go back up to ``sigma_{i+1}`` by adding fresh noise with the forward process (VE view, where the forward
process from ``sigma_{i+2}`` to ``sigma_{i+1}`` adds ``N(0, (sigma_{i+1}^2 - sigma_{i+2}^2) I)``)::

    x_down  = x_hat + (sigma_down / sigma_i)(x_i - x_hat)
    x_{i+1} = x_down + sigma_up z,   z ~ N(0, I),   sigma_down^2 + sigma_up^2 = sigma_{i+1}^2

with ``sigma_up = eta sqrt(sigma_{i+1}^2 - sigma_{i+2}^2)``: ``eta = 1`` is the paper's sampler (``sigma_down =
sigma_{i+2}``), ``eta = 0`` is deterministic DDIM. The step to the last positive level goes to ``x_hat`` (the
double step reaches ``sigma = 0``) and renoises to ``sigma_{N-1}``; the final step to 0 is deterministic. One
denoiser evaluation per step, N in all. If ``x_i`` has the right marginal and the DDIM step is exact, so does
``x_{i+1}``: the deterministic step moves along the probability-flow ODE and the noise is the forward process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import Callback, Cond, GridDenoiser, ddim_step, randn_like


def distilled_levels(sigmas: list[float], i: int, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of step ``i`` of the stochastic distilled sampler (module docstring)."""
    target = sigmas[i + 1]
    further = sigmas[i + 2] if i + 2 < len(sigmas) else target
    sigma_up = eta * math.sqrt(max(target**2 - further**2, 0.0))
    return math.sqrt(max(target**2 - sigma_up**2, 0.0)), sigma_up


def sample_distilled_stochastic(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Guided distillation's N-step stochastic sampler (Meng et al. 2023): a DDIM step of twice the length, then
    forward noise back up one level (module docstring). ``eta`` in [0, 1] scales the re-injected noise (0 =
    DDIM). N steps cost N evaluations."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (1 = the paper's sampler, 0 = DDIM), got {eta}")
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    for i in range(model.steps):
        denoised = model.at(x, i)
        model.report(callback, i, x, denoised)
        sigma_down, sigma_up = distilled_levels(s, i, eta)
        x = ddim_step(x, denoised, s[i], sigma_down)
        if sigma_up > 0:
            x = x.add_(randn_like(x, generator), alpha=sigma_up)
    return x


__all__ = ["distilled_levels", "sample_distilled_stochastic"]
