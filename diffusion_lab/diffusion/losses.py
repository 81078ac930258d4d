"""Denoising score-matching losses over the ``Denoiser`` contract (VE view ``x = x0 + sigma eps``).

Every diffusion loss of DDPM, NCSN, score SDE and EDM is one expression (Karras et al. 2022, eq. 8):

    L = E_{sigma ~ p(sigma), x0, eps} [ lambda(sigma) || D(x0 + sigma eps, sigma) - target ||^2 ]

with ``target = x0`` for denoising score matching (DSM). The formulations differ only in the noise-level
distribution ``p(sigma)`` (a ``SigmaSampler``) and the weighting ``lambda(sigma)``; a loss that predicts
eps, v or the score is the same loss with the weighting that maps the error back onto ``x0``:
``||eps - eps_hat||^2 = ||x0 - x0_hat||^2 / sigma^2`` and ``||v - v_hat||^2 = (1 + sigma^2)/sigma^2 ||x0 - x0_hat||^2``.

Subclasses change only ``target`` (e.g. the Stable Target Field of Xu et al. 2023), so swapping the target is
one ``class_path`` in YAML while sigma sampling and weighting stay those of the formulation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import DenoiserFn, append_dims
from diffusion_lab.diffusion.schedules import NoiseSchedule, VPLinear

Weighting = Literal["edm", "x0", "eps", "v", "snr_trunc"]


# ---------------------------------------------------------------------------------------------------
# Noise-level distributions p(sigma)
# ---------------------------------------------------------------------------------------------------
class SigmaSampler(nn.Module):
    """Draws per-sample training noise levels sigma (VE view)."""

    def forward(self, n: int, device: torch.device | str = "cpu") -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LogNormalSigma(SigmaSampler):
    """EDM training distribution: ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__()
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def forward(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, device=device))


class LogUniformSigma(SigmaSampler):
    """VE / NCSN training distribution: ln sigma ~ U[ln sigma_min, ln sigma_max] (Song et al. 2021, VE SDE)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)

    def forward(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        u = torch.rand(n, device=device)
        return torch.exp(self.log_min + u * (self.log_max - self.log_min))


class GeometricLevelsSigma(SigmaSampler):
    """NCSN's discrete training levels (Song & Ermon 2019, Sec. 4.2; NCSNv2, Song & Ermon 2020, technique 2):
    ``sigma_1 > ... > sigma_L`` geometric from ``sigma_max`` to ``sigma_min`` (``numpy.geomspace``), each
    training sample at a level ``i ~ U{1..L}``. NCSN: L = 10 on [0.01, 1]; NCSNv2 CIFAR-10: L = 232 on [0.01, 50].
    The same levels as the ``loglinear`` sampler grid with ``steps = L`` (annealed Langevin's levels).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, num_levels: int = 232) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        levels = torch.linspace(
            math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64
        ).exp()
        levels[0], levels[-1] = sigma_max, sigma_min  # exact end points
        self.register_buffer("levels", levels, persistent=False)  # descending, float64

    def forward(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        index = torch.randint(0, self.levels.shape[0], (n,), device=self.levels.device)
        return self.levels[index].to(device=device, dtype=torch.get_default_dtype())


class UniformTimeSigma(SigmaSampler):
    """Continuous-time training distribution of DDPM / score SDE / VDM: t ~ U[t_min, 1], sigma = sigma_ve(t).

    ``schedule`` is any ``diffusion.schedules.NoiseSchedule``: ``VPLinear()`` gives the VP SDE (the T -> inf limit
    of DDPM's uniform timesteps; with beta_min 0.1, beta_max 20, ``sigma(t) = sqrt(exp(B(t)) - 1)``, Karras et al.
    2022, Table 1 "VP"), ``VPCosine()`` improved DDPM, ``SubVP()`` the sub-VP SDE and ``VE()`` the VE SDE (which
    is log-uniform in sigma, like ``LogUniformSigma``).
    """

    def __init__(self, schedule: NoiseSchedule | None = None, t_min: float = 1e-5) -> None:
        super().__init__()
        if not 0 <= t_min < 1:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        self.schedule = schedule if schedule is not None else VPLinear(t_min=t_min)
        self.t_min = t_min

    def forward(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        t = self.t_min + (1 - self.t_min) * torch.rand(n, device=device)
        return self.schedule.sigma_ve(t).float()


# ---------------------------------------------------------------------------------------------------
# Weightings lambda(sigma)
# ---------------------------------------------------------------------------------------------------
def loss_weight(weighting: Weighting, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) so that the x0-space error reproduces each formulation's own loss.

    ``edm``: (sigma^2 + sd^2) / (sigma sd)^2 (EDM eq. 8 with c_out^-2); ``x0``: 1; ``eps``: 1 / sigma^2 (DDPM's
    L_simple); ``v``: (1 + sigma^2) / sigma^2 (Salimans & Ho 2022); ``snr_trunc``: max(SNR, 1) with
    SNR = 1 / sigma^2 (Salimans & Ho 2022, "truncated SNR").
    """
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "eps":
        return sigma.pow(-2)
    if weighting == "v":
        return (1 + sigma**2) / sigma**2
    if weighting == "snr_trunc":
        return sigma.pow(-2).clamp_min(1.0)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of edm, x0, eps, v, snr_trunc")


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------
def _at_least_float32(x: Tensor) -> Tensor:
    """float32 for half precision (the loss is reduced in fp32 under autocast), float64 kept as it is."""
    return x if x.dtype == torch.float64 else x.float()


class DenoisingLoss(nn.Module):
    """Denoising score matching, EDM eq. 8: E lambda(sigma) ||D(x0 + sigma eps, sigma) - x0||^2.

    Args:
        sigma_sampler: the training distribution of sigma (default EDM's log-normal).
        weighting: lambda(sigma), see ``loss_weight``.
        sigma_data: data std for the ``edm`` weighting.

    ``forward(denoiser, x0, **cond)`` returns the batch mean of the weighted per-sample mean squared error.
    """

    def __init__(
        self,
        sigma_sampler: SigmaSampler | None = None,
        weighting: Weighting = "edm",
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        loss_weight(weighting, torch.ones(1), sigma_data)  # validate the name before any training
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else LogNormalSigma()
        self.weighting = weighting
        self.sigma_data = sigma_data

    def target(self, x0: Tensor, x_noisy: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """The regression target for D: the clean data (DSM). Subclasses return lower-variance targets."""
        return x0

    def per_sample(
        self, denoiser: DenoiserFn, x0: Tensor, sigma: Tensor, noise: Tensor, **cond: Tensor
    ) -> Tensor:
        """lambda(sigma) * mean_dims (D(x0 + sigma noise, sigma) - target)^2, shape (B,)."""
        x_noisy = x0 + append_dims(sigma, x0.ndim) * noise
        with torch.no_grad():
            target = self.target(x0, x_noisy, sigma, **cond)
        error = (_at_least_float32(denoiser(x_noisy, sigma, **cond)) - _at_least_float32(target)) ** 2
        return loss_weight(self.weighting, _at_least_float32(sigma), self.sigma_data) * error.flatten(1).mean(
            1
        )

    def forward(self, denoiser: DenoiserFn, x0: Tensor, **cond: Tensor) -> Tensor:
        sigma = self.sigma_sampler(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        return self.per_sample(denoiser, x0, sigma, noise, **cond).mean()
