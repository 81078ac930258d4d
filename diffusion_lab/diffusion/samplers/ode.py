"""Second-order samplers: EDM's Heun (deterministic and stochastic) and DPM-Solver++(2M).

Both integrate the probability-flow ODE of the VE view (Karras et al. 2022, eq. 3 with ``sigma(t) = t``)::

    dx/dsigma = (x - D(x, sigma)) / sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import Callback, Cond, GridDenoiser, ddim_step, randn_like


def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when ``s_churn = 0``).

    Per step, optional churn: ``gamma = min(s_churn / N, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax``
    else 0, ``sigma_hat = (1 + gamma) sigma_i``, ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise z``.
    Then Heun's method (explicit trapezoid) from ``sigma_hat`` to ``sigma_{i+1}``::

        d   = (x_hat - D(x_hat, sigma_hat)) / sigma_hat
        x'  = x_hat + (sigma_{i+1} - sigma_hat) d
        d'  = (x' - D(x', sigma_{i+1})) / sigma_{i+1}
        x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2

    except on the last step to ``sigma = 0``, which is the Euler step (``x_N = D``). N steps cost ``2N - 1``
    denoiser evaluations; global error O(1/N^2) when deterministic. The callback also gets ``sigma_hat``
    and the churned state ``x_hat``.
    EDM's ImageNet-64 settings: ``s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003`` (256 steps).
    """
    if s_churn < 0 or s_noise < 0 or s_tmin > s_tmax:
        raise ValueError(
            f"need s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax, got s_churn={s_churn}, "
            f"s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}"
        )
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    gamma_max = min(s_churn / model.steps, math.sqrt(2) - 1)
    for i in range(model.steps):
        gamma = gamma_max if s_tmin <= s[i] <= s_tmax else 0.0
        x_i = x
        if gamma > 0:
            sigma_hat = s[i] * (1 + gamma)
            x = x + randn_like(x, generator) * (s_noise * math.sqrt(sigma_hat**2 - s[i] ** 2))
            denoised = model.at_value(x, sigma_hat)
        else:
            sigma_hat = s[i]
            denoised = model.at(x, i)
        model.report(callback, i, x_i, denoised, sigma_hat=sigma_hat, x_hat=x)
        x_next = ddim_step(x, denoised, sigma_hat, s[i + 1])  # Euler step
        if s[i + 1] > 0:
            # Trapezoid: x_hat + h (d + d')/2 = x_euler + h (d' - d)/2, with h d = x_euler - x_hat.
            denoised_next = model.at(x_next, i + 1)
            h = s[i + 1] - sigma_hat
            d = (x - denoised).div_(sigma_hat)
            d_next = (x_next - denoised_next).div_(s[i + 1])
            x_next = x_next.add_(d_next.sub_(d), alpha=h / 2)
        x = x_next
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction in log-sigma form.

    In the VE view the half log-SNR is ``lambda = -log sigma``. With ``h_i = lambda_{i+1} - lambda_i`` and
    ``r_i = h_{i-1} / h_i``::

        D_i'    = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}                 (first step: D_0' = D_0)
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h_i) D_i'  = lerp(D_i', x_i, sigma_{i+1}/sigma_i)

    which is the exact solution of the ODE if ``D`` is linear in lambda over the step. The last step to
    ``sigma = 0`` (``h = inf``) is first order, ``x_N = D_{N-1}``. One evaluation per step; O(1/N^2).
    """
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    old_denoised = None
    for i in range(model.steps):
        denoised = model.at(x, i)
        model.report(callback, i, x, denoised)
        if old_denoised is None or s[i + 1] == 0:
            target = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            h_last = math.log(s[i - 1] / s[i])
            w = h / (2 * h_last)  # 1 / (2 r)
            target = torch.lerp(denoised, old_denoised, -w)  # (1 + w) D_i - w D_{i-1}
        x = ddim_step(x, target, s[i], s[i + 1])
        old_denoised = denoised
    return x


__all__ = ["sample_heun", "sample_dpmpp_2m"]
