"""The one contract: a denoiser ``D(x, sigma, **cond) -> x0_hat`` in the VE view ``x = x0 + sigma eps``.

Preconditioning (Karras et al. 2022, "EDM", eq. 7 and Table 1) turns a raw network ``F`` into a
denoiser::

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

Each classic parametrisation is one choice of the four coefficients. With ``alpha = 1/sqrt(1+sigma^2)``
(the VP scaling, ``x_vp = alpha x``, ``sigma_vp = alpha sigma``):

=========  ===================================  ==========================  =====================
 name       c_skip                               c_out                       c_in
=========  ===================================  ==========================  =====================
 edm        sd^2 / (sigma^2 + sd^2)              sigma sd / sqrt(s^2+sd^2)   1 / sqrt(s^2 + sd^2)
 eps        1                                    -sigma                      alpha
 x0         0                                    1                           alpha
 v          alpha^2                              -sigma alpha                alpha
 score      1                                    sigma                       alpha
=========  ===================================  ==========================  =====================

``eps``: F predicts the noise, ``x0 = x - sigma eps`` (Ho et al. 2020). ``v``: F predicts
``v = alpha_vp eps - sigma_vp x0`` (Salimans & Ho 2022), so ``x0 = alpha_vp x_vp - sigma_vp v``.
``score``: F predicts ``sigma * grad log p = -eps`` (NCSN, Song & Ermon 2019, with the 1/sigma output
scaling of NCSNv2). The three equivalent targets of Luo (2022, eqs. 99-101) are related by the
conversion helpers below.

Learned reverse variance (Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.1, eq. 15): with
``learned_variance=True`` the backbone outputs 2C channels; the first C give ``D`` as above and the last C a
raw ``v``, read as the interpolation fraction ``frac = (v + 1) / 2`` of the reverse step's log variance,
``log Sigma = frac log beta + (1 - frac) log beta_tilde`` (``ddpm`` sampler, ``variance='learned'``;
``diffusion/hybrid_loss.py`` trains it). ``D(x, sigma)`` keeps its contract; the fraction comes from
:meth:`Denoiser.denoise_with_variance` (one backbone call for both) or :meth:`Denoiser.variance_fraction`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

Parametrization = Literal["edm", "eps", "x0", "v", "score"]
NoiseConditioning = Literal["log_sigma", "vp_t", "sigma"]


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor (B,) to broadcast against (B, ...) with ``ndim`` dims."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def broadcast_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Per-sample noise levels (B,) from a scalar or (B,) input, on x's device, in float32 or wider
    (a Python number becomes float64 when x is float64, so exact float64 computations stay exact)."""
    if not isinstance(sigma, Tensor) and x.dtype == torch.float64:
        sigma = torch.tensor(sigma, dtype=torch.float64, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point() or sigma.dtype in (torch.float16, torch.bfloat16):
        sigma = sigma.float()
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries but x has batch size {x.shape[0]}")
    return sigma


# ---------------------------------------------------------------------------------------------------
# Conversions between prediction targets at noise level sigma (VE view, x = x0 + sigma eps).
# ---------------------------------------------------------------------------------------------------
def eps_to_x0(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x - sigma eps."""
    return x - append_dims(sigma, x.ndim) * eps


def x0_to_eps(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x - x0) / sigma."""
    return (x - x0) / append_dims(sigma, x.ndim)


def x0_to_score(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: grad log p_sigma(x) = (x0_hat - x) / sigma^2."""
    return (x0 - x) / append_dims(sigma, x.ndim) ** 2


def score_to_x0(x: Tensor, score: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x + sigma^2 grad log p_sigma(x)."""
    return x + append_dims(sigma, x.ndim) ** 2 * score


def x0_to_v(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha_vp eps - sigma_vp x0 with alpha_vp = 1/sqrt(1+sigma^2), sigma_vp = sigma alpha_vp."""
    s = append_dims(sigma, x.ndim)
    alpha = torch.rsqrt(1 + s**2)
    return alpha * (x - x0) / s - s * alpha * x0


def v_to_x0(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = alpha_vp x_vp - sigma_vp v with x_vp = alpha_vp x."""
    s = append_dims(sigma, x.ndim)
    alpha2 = 1 / (1 + s**2)
    return alpha2 * x - s * alpha2.sqrt() * v


# ---------------------------------------------------------------------------------------------------
# Preconditioning
# ---------------------------------------------------------------------------------------------------
def preconditioning(
    parametrization: Parametrization, sigma: Tensor, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for a parametrisation (table in the module docstring), each (B,)."""
    if parametrization == "edm":
        denom = sigma**2 + sigma_data**2
        return sigma_data**2 / denom, sigma * sigma_data * torch.rsqrt(denom), torch.rsqrt(denom)
    alpha = torch.rsqrt(1 + sigma**2)
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    if parametrization == "eps":
        return one, -sigma, alpha
    if parametrization == "x0":
        return zero, one, alpha
    if parametrization == "v":
        return alpha**2, -sigma * alpha, alpha
    if parametrization == "score":
        return one, sigma, alpha
    raise ValueError(f"unknown parametrization {parametrization!r}; expected one of edm, eps, x0, v, score")


class Denoiser(nn.Module):
    """Wrap a raw backbone ``F(x_in, c_noise, **cond)`` as ``D(x, sigma, **cond) -> x0_hat`` (EDM eq. 7).

    Args:
        network: the backbone; called as ``network(c_in * x, c_noise, **cond)``.
        parametrization: what the backbone predicts (see module docstring).
        sigma_data: data standard deviation used by the ``edm`` preconditioning.
        noise_conditioning: what the backbone sees as its noise input ``c_noise``:
            ``log_sigma`` -> ln(sigma)/4 (EDM), ``sigma`` -> sigma, ``vp_t`` -> ``time_scale * t(sigma)``
            from ``schedule`` (DDPM-style nets trained on a 0..999 timestep).
        schedule: anything with ``t_from_sigma(sigma) -> t``; needed for ``vp_t``.
        time_scale: multiplier of t for ``vp_t`` (1000 for DDPM-style embeddings).
        learned_variance: the backbone outputs twice the data channels; the second half is the iDDPM
            variance output ``v`` (see module docstring), read by :meth:`denoise_with_variance`.
    """

    def __init__(
        self,
        network: nn.Module,
        parametrization: Parametrization = "edm",
        sigma_data: float = 0.5,
        noise_conditioning: NoiseConditioning = "log_sigma",
        schedule: object | None = None,
        time_scale: float = 1000.0,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        preconditioning(parametrization, torch.ones(1))  # validate the name early
        if noise_conditioning not in ("log_sigma", "vp_t", "sigma"):
            raise ValueError(
                f"unknown noise_conditioning {noise_conditioning!r}; expected log_sigma, vp_t or sigma"
            )
        if noise_conditioning == "vp_t" and not hasattr(schedule, "t_from_sigma"):
            raise ValueError("noise_conditioning='vp_t' needs a schedule with t_from_sigma(sigma)")
        self.network = network
        self.parametrization = parametrization
        self.sigma_data = sigma_data
        self.noise_conditioning = noise_conditioning
        self.schedule = schedule
        self.time_scale = time_scale
        self.learned_variance = bool(learned_variance)

    def c_noise(self, sigma: Tensor) -> Tensor:
        if self.noise_conditioning == "log_sigma":
            return sigma.clamp_min(1e-20).log() / 4
        if self.noise_conditioning == "sigma":
            return sigma
        return self.time_scale * self.schedule.t_from_sigma(sigma)  # type: ignore[union-attr]

    def _evaluate(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> tuple[Tensor, Tensor | None]:
        """One backbone call: (``x0_hat``, raw variance output ``v`` or None without a variance head)."""
        sigma = broadcast_sigma(sigma, x)
        c_skip, c_out, c_in = preconditioning(self.parametrization, sigma, self.sigma_data)
        out = self.network(append_dims(c_in, x.ndim) * x, self.c_noise(sigma), **cond)
        v = None
        if self.learned_variance:
            channels = x.shape[1]
            if out.ndim != x.ndim or out.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned_variance=True needs a network with {2 * channels} output channels (twice the "
                    f"data's {channels}: mean and variance), got output shape {tuple(out.shape)}; set the "
                    f"network's out_channels to {2 * channels}"
                )
            out, v = out[:, :channels], out[:, channels:]
        x0 = (append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * out.to(x.dtype)).to(x.dtype)
        return x0, v

    def forward(
        self, x: Tensor, sigma: Tensor | float, *, return_variance: bool = False, **cond: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``D(x, sigma)``; with ``return_variance`` also the learned variance fraction (see
        :meth:`denoise_with_variance`), from the same backbone call (one call of this module either way, so
        forward hooks, e.g. NFE counters, see every evaluation)."""
        if return_variance and not self.learned_variance:
            raise ValueError(
                "this Denoiser has no variance head: build it with learned_variance=True and a network "
                "with twice the data channels (DiffusionModule: learned_variance: true)"
            )
        x0, v = self._evaluate(x, sigma, **cond)
        if not return_variance:
            return x0
        return x0, (v.to(x.dtype) + 1) / 2  # type: ignore[union-attr]

    def denoise_with_variance(
        self, x: Tensor, sigma: Tensor | float, **cond: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(D(x, sigma), frac)`` from one backbone call; ``frac = (v + 1)/2`` (iDDPM eq. 15), shaped like x,
        in x's dtype (not clamped: iDDPM lets the fraction leave [0, 1]). Needs ``learned_variance=True``."""
        return self(x, sigma, return_variance=True, **cond)

    def variance_fraction(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """The learned fraction ``frac(x, sigma)`` alone (see :meth:`denoise_with_variance`)."""
        return self.denoise_with_variance(x, sigma, **cond)[1]

    def raw_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The target of F implied by D = x0: (x0 - c_skip x) / c_out, with x = x0 + sigma noise."""
        c_skip, c_out, _ = preconditioning(self.parametrization, sigma, self.sigma_data)
        x = x0 + append_dims(sigma, x0.ndim) * noise
        return (x0 - append_dims(c_skip, x0.ndim) * x) / append_dims(c_out, x0.ndim)


DenoiserFn = Callable[..., Tensor]
"""Anything callable as ``D(x, sigma, **cond) -> x0_hat``: a Denoiser, a guidance wrapper, a mixture."""


__all__ = [
    "Denoiser",
    "DenoiserFn",
    "append_dims",
    "broadcast_sigma",
    "eps_to_x0",
    "x0_to_eps",
    "x0_to_score",
    "score_to_x0",
    "x0_to_v",
    "v_to_x0",
    "preconditioning",
]
