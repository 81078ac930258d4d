"""DDLM: low-dose CT denoising by a short, data-consistent reverse process of a pretrained diffusion prior.

Li (2023, "Diffusion Denoising for Low-Dose-CT Model", arXiv 2301.11482) denoises with a pretrained diffusion
model by conditioned sampling, with no training or tuning on low-dose data; the paper's code and full text are
not public, so the conditioning below is this codebase's reading of it (docs/ddlm.md gives the reasoning).

In the VE view (``x = x0 + sigma eps``, :mod:`diffusion_lab.diffusion.denoiser`) a low-dose image is already a
noisy state of the forward process: ``y = x0 + sigma_y n``. So:

1. **Noise level.** ``sigma_y`` is estimated from ``y`` alone by the median absolute deviation of the finest
   diagonal Haar coefficients, ``sigma_hat = median |HH| / 0.6745`` (Donoho & Johnstone 1994), times
   ``sigma_scale``.
2. **Matched start.** The reverse process starts at ``sigma_start = start_scale * sigma_y`` from ``y`` itself
   (``start_scale = 1``); a larger level first adds fresh noise, ``x = y + sqrt(sigma_start^2 - sigma_y^2) z``
   (SDEdit, Meng et al. 2022), which is the exact forward process from ``sigma_y`` to ``sigma_start``.
3. **Conditioned reverse steps** on a Karras grid from ``sigma_start`` to 0 (``steps`` denoiser calls). With
   ``x0 = D(x, sigma)`` and the model's noise direction ``eps = (x - x0) / sigma``, a plain step is
   ``x' = x0 + sigma_down eps + sigma_up z`` (DDIM(eta), :mod:`diffusion_lab.diffusion.samplers.ancestral`).
   The consistency options:

   * ``ddlm`` (default): noise-matched data consistency, DDNM+ (Wang et al. 2023, eqs. 17-19) for the
     denoising operator ``A = I`` in the VE view: the next state takes part of its noise budget from the
     measurement residual ``n = (y - x0) / sigma_y``,
     ``x' = x0 + lambda (y - x0) + sqrt(sigma'^2 - lambda^2 sigma_y^2) [eta-split eps / z]`` with
     ``lambda = strength * min(1, sigma' / sigma_y)``. At ``strength = 1`` all of the next state's noise is the
     measured noise (none is invented), and above ``sigma_y`` the state is ``y`` itself plus the remaining
     noise budget; at ``strength = 0`` this is the plain step.
   * ``none``: plain steps (SDEdit when ``start_scale > 1``; the matched start alone when 1).
   * ``ilvr``: ILVR (Choi et al. 2021, eq. 8): ``x' += strength (P(y') - P(x'))`` with the exact low-pass pair
     ``P = up_N(down_N(.))`` (N x N block mean, then nearest upsampling; ``down_N(up_N(v)) = v``, so ``P`` is an
     orthogonal projection) and ``y'`` the measurement at the next level (``y`` noised forward when
     ``sigma' > sigma_y``).
   * ``dps``: gradient consistency on the denoised estimate (DPS, Chung et al. 2023, Alg. 1):
     ``x' -= strength * grad_x ||y - D(x, sigma)||_2`` (the norm, not its square), the gradient taken through the
     denoiser with :class:`~diffusion_lab.diffusion.guidance.LossGuidance` (one extra backward per step).

With ``steps = 0`` nothing runs and the input is returned. With ``steps = 1`` and the matched start the output is
``D(y, sigma_y)``, the posterior mean (Tweedie) if the prior were exact and the noise white.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn, append_dims, broadcast_sigma
from diffusion_lab.diffusion.guidance import LossGuidance

Consistency = Literal["ddlm", "none", "ilvr", "dps"]
CONSISTENCIES: tuple[str, ...] = ("ddlm", "none", "ilvr", "dps")
MAD_TO_STD = 0.6744897501960817
"""Median of |N(0, 1)|: ``sigma = median |e| / 0.6745`` for Gaussian e."""


# ---------------------------------------------------------------------------------------------------
# Noise level
# ---------------------------------------------------------------------------------------------------
def haar_diagonal(x: Tensor) -> Tensor:
    """Finest diagonal Haar detail ``(a - b - c + d) / 2`` of each 2 x 2 block of (B, C, H, W) images.

    Orthonormal, so white noise of std sigma gives coefficients of std sigma; smooth regions give ~0.
    """
    if x.ndim != 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"expected images (B, C, H, W) with H, W >= 2, got shape {tuple(x.shape)}")
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2


def estimate_noise_std(y: Tensor) -> Tensor:
    """Per-image noise std (B,) of (B, C, H, W) images: ``median |HH| / 0.6745`` (Donoho & Johnstone 1994).

    Coefficients that are exactly zero (constant blocks, e.g. outside the reconstruction circle of an FBP
    image) are left out of the median, since they carry no noise; an image with no other coefficient gets 0.
    """
    detail = haar_diagonal(y.float()).abs().flatten(1)  # (B, M)
    out = torch.zeros(detail.shape[0], device=y.device)
    for b, row in enumerate(detail):
        row = row[row > 0]
        if row.numel():
            out[b] = row.median() / MAD_TO_STD
    return out


# ---------------------------------------------------------------------------------------------------
# Grid and steps
# ---------------------------------------------------------------------------------------------------
def batch_karras_sigmas(
    sigma_start: Tensor, steps: int, sigma_min: float = 0.002, rho: float = 7.0
) -> Tensor:
    """Per-sample Karras grids (B, steps + 1) from ``sigma_start`` (B,) down to ``sigma_min``, then 0.

    Row b is :func:`~diffusion_lab.diffusion.samplers.karras_sigmas` on ``[min(sigma_min, sigma_start_b / 2),
    sigma_start_b]``. One step gives ``[sigma_start, 0]``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if (sigma_start <= 0).any() or not torch.isfinite(sigma_start).all():
        raise ValueError(f"start levels must be finite and > 0, got {sigma_start.tolist()}")
    start = sigma_start.double()[:, None]
    low = torch.clamp(start / 2, max=sigma_min)
    ramp = (
        torch.linspace(0, 1, steps, dtype=torch.float64, device=start.device)
        if steps > 1
        else start.new_zeros(1)
    )
    levels = (start ** (1 / rho) + ramp * (low ** (1 / rho) - start ** (1 / rho))) ** rho
    levels[:, 0] = start[:, 0]
    return torch.cat([levels, torch.zeros_like(start)], dim=1)


def eta_split(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """``(sigma_down, sigma_up)`` of the DDIM(eta) step per sample; the tensor form of
    :func:`~diffusion_lab.diffusion.samplers.ancestral_levels` (``sigma_up`` capped at ``sigma_next``)."""
    up = torch.minimum(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2).clamp_min(0).sqrt() / sigma)
    return (sigma_next**2 - up**2).clamp_min(0).sqrt(), up


def block_lowpass(x: Tensor, factor: int) -> Tensor:
    """``P = up_N(down_N(x))``: N x N block means, nearest-upsampled (ILVR's exact low-pass projection)."""
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"ILVR factor {factor} must be >= 1 and divide the image size {tuple(x.shape[-2:])}")
    if factor == 1:
        return x
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


@dataclass
class DDLMConfig:
    """The DDLM sampler's settings (YAML: ``ddlm:`` of the LDCT module); see the module docstring.

    Args:
        steps: reverse steps = denoiser evaluations (``dps`` adds one backward per step); 0 returns the input.
        consistency: ``ddlm`` (noise-matched data consistency), ``none`` (plain / SDEdit), ``ilvr``, ``dps``.
        strength: consistency strength: ``ddlm`` and ``ilvr`` in [0, 1] (1 = full), ``dps`` a step size >= 0.
        start_scale: start level as a multiple of the noise level (1 = matched start; > 1 SDEdit-style).
        sigma_scale: multiplier of the estimated noise level (a known calibration of the estimator).
        eta: stochasticity of the steps (0 deterministic DDIM, 1 ancestral / DDPM posterior).
        sigma_min, rho: the Karras grid from the start level down to ``sigma_min`` (then 0).
        ilvr_factor: block size N of ILVR's low-pass filter.
    """

    steps: int = 10
    consistency: str = "ddlm"
    strength: float = 1.0
    start_scale: float = 1.0
    sigma_scale: float = 1.0
    eta: float = 0.0
    sigma_min: float = 0.002
    rho: float = 7.0
    ilvr_factor: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.consistency not in CONSISTENCIES:
            raise ValueError(f"unknown consistency {self.consistency!r}; expected one of {CONSISTENCIES}")
        if self.consistency in ("ddlm", "ilvr") and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"{self.consistency} strength must be in [0, 1], got {self.strength}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        for name in ("start_scale", "sigma_scale", "sigma_min", "rho"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not isinstance(self.ilvr_factor, int) or self.ilvr_factor < 1:
            raise ValueError(f"ilvr_factor must be an integer >= 1, got {self.ilvr_factor!r}")

    @property
    def nfe(self) -> int:
        """Denoiser forward evaluations per image."""
        return self.steps


def _residual_norm(y: Tensor) -> Callable[..., Tensor]:
    """Per-sample ``||y - x0_hat||_2``: DPS's measurement loss for ``A = I``."""

    def loss(x0_hat: Tensor, **_: Any) -> Tensor:
        return (y - x0_hat).flatten(1).norm(dim=1)

    return loss


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ddlm_denoise(
    denoiser: DenoiserFn,
    y: Tensor,
    config: DDLMConfig | None = None,
    *,
    sigma_y: Tensor | float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Denoise low-dose images ``y`` (B, C, H, W), in the prior's [-1, 1] scale, by DDLM (module docstring).

    Args:
        denoiser: the prior ``D(x, sigma, **cond) -> x0_hat`` (e.g. a DiffusionModule's ``ema.averaged``).
        config: sampler settings (default ``DDLMConfig()``).
        sigma_y: the noise level (float or (B,)) when known; default: estimated from ``y``, times
            ``config.sigma_scale``.
        generator: random source of SDEdit start noise and of stochastic steps.
        callback: called after every step with ``dict(i, x, x0, sigma, sigma_next, sigma_y)``.
        cond: extra keyword conditioning passed to every denoiser call.
    """
    config = DDLMConfig() if config is None else config
    if not isinstance(y, Tensor) or y.ndim != 4 or not y.is_floating_point():
        raise ValueError(f"y must be a float tensor (B, C, H, W), got {getattr(y, 'shape', type(y))}")
    if config.steps == 0:
        return y.clone()
    cond = dict(cond or {})
    if sigma_y is None:
        sigma_y = estimate_noise_std(y) * config.sigma_scale
    sigma_y = broadcast_sigma(sigma_y, y).to(y.dtype)
    if (sigma_y <= 0).any():
        raise ValueError(
            f"noise level must be > 0 for every image, got {sigma_y.tolist()}; a noise-free input needs no DDLM"
        )
    sigmas = batch_karras_sigmas(sigma_y * config.start_scale, config.steps, config.sigma_min, config.rho)
    sigmas = sigmas.to(y.dtype)  # (B, steps + 1)

    def nd(t: Tensor) -> Tensor:
        return append_dims(t, y.ndim)

    # Start: y itself, noised forward when the start level lies above its own noise level (SDEdit).
    extra = (sigmas[:, 0] ** 2 - sigma_y**2).clamp_min(0).sqrt()
    x = y + nd(extra) * _randn(y, generator) if (extra > 0).any() else y.clone()
    model: DenoiserFn = denoiser
    if config.consistency == "dps":
        model = LossGuidance(denoiser, _residual_norm(y), scale=0.0)
    for i in range(config.steps):
        sigma, sigma_next = sigmas[:, i], sigmas[:, i + 1]
        if config.consistency == "dps":
            # LossGuidance returns D - s sigma^2 grad L; the DDIM step moves x by (1 - sigma'/sigma) of that, so
            # s = strength / ((1 - sigma'/sigma) sigma^2) makes the total correction -strength * grad L (DPS).
            model.scale = config.strength / ((1 - sigma_next / sigma) * sigma**2)
        x0 = model(x, sigma, **cond)
        eps = (x - x0) / nd(sigma)
        down, up = eta_split(sigma, sigma_next, config.eta)
        if config.consistency == "ddlm":
            lam = config.strength * torch.minimum(torch.ones_like(sigma_y), sigma_next / sigma_y)
            budget = (sigma_next**2 - lam**2 * sigma_y**2).clamp_min(0).sqrt()
            ratio = torch.where(
                sigma_next > 0, budget / sigma_next.clamp_min(1e-30), torch.zeros_like(budget)
            )
            x_next = x0 + nd(lam) * (y - x0)
            down, up = down * ratio, up * ratio
        else:
            x_next = x0
        x_next = x_next + nd(down) * eps
        if (up > 0).any():
            x_next = x_next + nd(up) * _randn(x, generator)
        if config.consistency == "ilvr" and config.strength > 0:
            noise = (sigma_next**2 - sigma_y**2).clamp_min(0).sqrt()
            y_next = y + nd(noise) * _randn(y, generator) if (noise > 0).any() else y
            x_next = x_next + config.strength * (
                block_lowpass(y_next, config.ilvr_factor) - block_lowpass(x_next, config.ilvr_factor)
            )
        x = x_next.detach()
        if callback is not None:
            callback(
                {
                    "i": i,
                    "x": x,
                    "x0": x0.detach(),
                    "sigma": sigma,
                    "sigma_next": sigma_next,
                    "sigma_y": sigma_y,
                }
            )
    return x


__all__ = [
    "CONSISTENCIES",
    "DDLMConfig",
    "batch_karras_sigmas",
    "block_lowpass",
    "ddlm_denoise",
    "estimate_noise_std",
    "eta_split",
    "haar_diagonal",
]
