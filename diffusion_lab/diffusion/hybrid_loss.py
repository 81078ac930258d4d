"""Improved DDPM's hybrid objective for a learned reverse variance (Nichol & Dhariwal 2021, sec. 3.1).

``L_hybrid = L_simple + lambda L_vlb`` (eq. 16, ``lambda = 0.001``) on the schedule's native grid of T steps.
In the VE view ``x_k = x0 + sigma_k eps`` (``sigma_0 = 0`` is the data, ``sigma_k = sigma_ve(k / T)``,
``abar_k = 1 / (1 + sigma_k^2)``; a :class:`~diffusion_lab.diffusion.schedules.DiscreteVP` gives its own
``sigma_k``), for a step k -> k - 1:

* ``q(x_{k-1} | x_k, x0) = N(x0 + c_k (x_k - x0), small_k)`` with ``c_k = sigma_{k-1}^2 / sigma_k^2`` and
  ``small_k = sigma_{k-1}^2 (sigma_k^2 - sigma_{k-1}^2) / sigma_k^2`` (Ho et al. 2020, eqs. 6-7 divided by
  ``sqrt(abar_{k-1})``), the ``small`` step of the ``ddpm`` sampler;
* ``p(x_{k-1} | x_k) = N(D + c_k (x_k - D), exp(frac log large_k + (1 - frac) log small_k))`` (eq. 15):
  ``large_k = beta_k / abar_{k-1}`` is ``beta_k = 1 - abar_k / abar_{k-1}`` in VE units; ``frac = (v + 1)/2``
  is the denoiser's variance head (``Denoiser(learned_variance=True)``).

The KL divergence is invariant under the common rescaling ``x_vp = sqrt(abar_{k-1}) x_ve``, so the VE terms
equal the paper's VP ones. Per sample, with k ~ U{1..T} and ``x_k = x0 + sigma_k eps``:

* ``L_simple = mean_dims (eps - eps_hat)^2 = mean_dims (x0 - D)^2 / sigma_k^2`` (eq. 14);
* ``L_k = KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))`` for k >= 2 and the decoder NLL ``-log p(x0 | x_1)``
  for k = 1, both in bits per dimension, computed with the mean ``D`` *detached* (sec. 3.1: a stop-gradient on
  the mean output in the L_vlb term), so L_vlb trains only the variance head;
* ``L_vlb = sum_k L_k`` is estimated by ``T L_k``; hence ``loss = L_simple + lambda T L_k`` (the reference code's
  ``vb * T / 1000``).

The decoder at k = 1 (``sigma_0 = 0``, mean ``D``) uses the variance of eq. 15 with ``small_1 = 0`` replaced
by ``small_2 / (1 + sigma_1^2)`` (the reference code's ``posterior_log_variance_clipped``), either
discretised on ``num_bins`` equally spaced values in [-1, 1] (Ho et al. 2020, eq. 13; 256 for 8-bit images,
17 for the digits) or, with ``num_bins=None``, the continuous Gaussian density (data not on a grid).
:meth:`HybridLoss.vlb_bits_per_dim` sums all T terms plus the prior term: the paper's NLL bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import append_dims
from diffusion_lab.diffusion.losses import loss_weight
from diffusion_lab.diffusion.samplers.ancestral import ddpm_levels
from diffusion_lab.diffusion.schedules import DiscreteVP, NoiseSchedule, VPCosine

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------
# Gaussian log-densities and divergences (elementwise, natural log)
# ---------------------------------------------------------------------------------------------------
def gaussian_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

    ``(logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1) / 2``.
    """
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1
    )


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-log N(x; mean, e^logvar) per element, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor, num_bins: int) -> Tensor:
    """-log P(x) per element, in nats, for data on ``num_bins`` equally spaced values in [-1, 1]: the Gaussian
    mass of x's bin ``[x - h, x + h]``, ``h = 1/(num_bins - 1)``, with the end bins extended to -inf / +inf
    (Ho et al. 2020, eq. 13)."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2 (values of the data grid in [-1, 1]), got {num_bins}")
    half = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-0.5 * logvar)
    upper = _approx_std_normal_cdf((x - mean + half) * inv_std)
    lower = _approx_std_normal_cdf((x - mean - half) * inv_std)
    tiny = 1e-12
    log_mass = torch.where(
        x < -1 + half / 2,
        torch.log(upper.clamp_min(tiny)),
        torch.where(
            x > 1 - half / 2,
            torch.log((1 - lower).clamp_min(tiny)),
            torch.log((upper - lower).clamp_min(tiny)),
        ),
    )
    return -log_mass


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 data (exact tests), float32 otherwise (also under bf16 / fp16 autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mean_bits(values: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dimensions, converted from nats to bits: (B,)."""
    return values.flatten(1).mean(1) / LN2


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------
class HybridLoss(nn.Module):
    """iDDPM's ``L_hybrid = L_simple + lambda L_vlb`` (Nichol & Dhariwal 2021, eq. 16) on T native steps.

    Same call as ``DenoisingLoss``: ``loss(denoiser, x0, **cond)`` -> scalar batch mean. The denoiser must
    expose ``denoise_with_variance(x, sigma, **cond) -> (x0_hat, frac)`` (a ``Denoiser`` with
    ``learned_variance=True``). See the module docstring for the math.

    Args:
        schedule: noise schedule whose T-step grid is trained (default ``VPCosine()``, iDDPM eq. 17); a
            ``DiscreteVP`` uses its own levels and T.
        num_steps: T (1000 in the paper's ablations, 4000 for its best CIFAR-10 models).
        vlb_weight: lambda (0.001 in the paper).
        num_bins: values of the data grid in [-1, 1] for the discretised decoder (256: 8-bit images); None uses
            the continuous Gaussian decoder density.
    """

    def __init__(
        self,
        schedule: NoiseSchedule | None = None,
        num_steps: int = 1000,
        vlb_weight: float = 0.001,
        num_bins: int | None = 256,
    ) -> None:
        super().__init__()
        schedule = schedule if schedule is not None else VPCosine()
        if isinstance(schedule, DiscreteVP):
            levels = schedule.sigmas.to(torch.float64)
        else:
            if not isinstance(num_steps, int) or num_steps < 2:
                raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
            t = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
            levels = schedule.sigma_ve(t).to(torch.float64)
        if levels.numel() < 2 or not torch.isfinite(levels).all() or not (levels[1:] > levels[:-1]).all():
            raise ValueError(
                f"the schedule's {levels.numel()} levels must be finite and strictly increasing (at least 2)"
            )
        if levels[0] <= 0:
            raise ValueError(f"the first noise level must be > 0, got {float(levels[0])}")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        if num_bins is not None and num_bins < 2:
            raise ValueError(f"num_bins must be None or >= 2, got {num_bins}")
        self.num_steps = levels.numel()
        self.vlb_weight = float(vlb_weight)
        self.num_bins = num_bins
        sigma = torch.cat([levels.new_zeros(1), levels])  # sigma_0 = 0 (data), sigma_1..sigma_T
        log_small, log_large, gap = [0.0], [0.0], [0.0]  # index 0 unused
        for k in range(1, self.num_steps + 1):
            s, s_next = float(sigma[k]), float(sigma[k - 1])
            if k == 1:
                # decoder: beta_1 = 1 - abar_1; small clipped to beta_tilde_2 (VP units = VE units at abar_0 = 1)
                large = s**2 / (1 + s**2)
                small = ddpm_levels(float(sigma[2]), s, "small")[1] ** 2 / (1 + s**2)
            else:
                small = ddpm_levels(s, s_next, "small")[1] ** 2
                large = ddpm_levels(s, s_next, "large")[1] ** 2
            log_small.append(math.log(small))
            log_large.append(math.log(large))
            gap.append((s**2 - s_next**2) / s**2)  # 1 - c_k: mean_q - mean_p = (1 - c_k)(x0 - D)
        # Non-persistent float64 buffers: they follow .to(device) but stay out of checkpoints (rebuilt from the
        # config); each use casts them to the computation's dtype.
        f64 = torch.float64
        self.register_buffer("sigmas", sigma, persistent=False)
        self.register_buffer("log_small", torch.tensor(log_small, dtype=f64), persistent=False)
        self.register_buffer("log_large", torch.tensor(log_large, dtype=f64), persistent=False)
        self.register_buffer("mean_gap", torch.tensor(gap, dtype=f64), persistent=False)

    # ------------------------------------------------------------------ per-step terms
    @staticmethod
    def _denoise_with_variance(
        denoiser: nn.Module, x: Tensor, sigma: Tensor, **cond: Tensor
    ) -> tuple[Tensor, Tensor]:
        fn = getattr(denoiser, "denoise_with_variance", None)
        if fn is None:  # a Denoiser without a head has the method and raises its own error
            raise ValueError(
                f"HybridLoss needs a denoiser with a learned variance head, got {type(denoiser).__name__}: "
                "set the DiffusionModule's learned_variance: true and the network's out_channels to twice "
                "the data channels"
            )
        return fn(x, sigma, **cond)

    def step_log_variance(self, k: Tensor, frac: Tensor) -> Tensor:
        """``frac log large_k + (1 - frac) log small_k`` (iDDPM eq. 15 in VE units), shaped and typed like
        ``frac``; ``k`` (B,) integer steps."""
        k = append_dims(k, frac.ndim)
        return frac * self.log_large[k].to(frac.dtype) + (1 - frac) * self.log_small[k].to(frac.dtype)

    def vlb_term(self, x0: Tensor, k: Tensor, x0_hat: Tensor, frac: Tensor) -> Tensor:
        """``L_k`` per sample (B,) in bits/dim: the KL of step k -> k-1 (k >= 2) or the decoder NLL (k = 1).

        Both means share ``c_k x_k``, so the KL needs only ``mean_q - mean_p = (1 - c_k)(x0 - x0_hat)``.
        Differentiable in ``x0_hat`` and ``frac``; :meth:`terms` passes a detached ``x0_hat``. Computed in
        float64 for float64 inputs, else float32."""
        dtype = compute_dtype(x0)
        x0, x0_hat, frac = x0.to(dtype), x0_hat.to(dtype), frac.to(dtype)
        k = k.reshape(-1)
        logvar_p = self.step_log_variance(k, frac)
        diff = append_dims(self.mean_gap[k].to(dtype), x0.ndim) * (x0 - x0_hat)
        logvar_q = append_dims(self.log_small[k].to(dtype), x0.ndim).expand_as(x0)
        kl = gaussian_kl(diff, logvar_q, torch.zeros_like(diff), logvar_p)
        if self.num_bins is None:
            decoder = gaussian_nll(x0, x0_hat, logvar_p)
        else:
            decoder = discretized_gaussian_nll(x0, x0_hat, logvar_p, self.num_bins)
        return mean_bits(torch.where(append_dims(k == 1, x0.ndim), decoder, kl))

    def terms(
        self, denoiser: nn.Module, x0: Tensor, k: Tensor, noise: Tensor, **cond: Tensor
    ) -> dict[str, Tensor]:
        """``{"simple": L_simple, "vlb": L_k}`` per sample (B,) at integer steps ``k`` (B,) in [1, T], with
        ``x_k = x0 + sigma_k noise``; one denoiser call. ``vlb`` reaches only the variance head."""
        k = torch.as_tensor(k, device=x0.device).long().reshape(-1)
        if k.shape[0] != x0.shape[0] or k.min() < 1 or k.max() > self.num_steps:
            raise ValueError(
                f"k must hold {x0.shape[0]} integer steps in [1, {self.num_steps}], got {k.tolist()}"
            )
        sigma = self.sigmas[k].to(compute_dtype(x0))
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        x0_hat, frac = self._denoise_with_variance(denoiser, x, sigma, **cond)
        error = (x0_hat.to(sigma.dtype) - x0.to(sigma.dtype)) ** 2
        simple = loss_weight("eps", sigma) * error.flatten(1).mean(1)  # = mean (eps - eps_hat)^2
        vlb = self.vlb_term(x0, k, x0_hat.detach(), frac)
        return {"simple": simple, "vlb": vlb}

    def forward(self, denoiser: nn.Module, x0: Tensor, **cond: Tensor) -> Tensor:
        k = torch.randint(1, self.num_steps + 1, (x0.shape[0],), device=x0.device)
        terms = self.terms(denoiser, x0, k, torch.randn_like(x0), **cond)
        return (terms["simple"] + self.vlb_weight * self.num_steps * terms["vlb"]).mean()

    # ------------------------------------------------------------------ the full bound
    def prior_bits(self, x0: Tensor) -> Tensor:
        """``KL(q(x_T | x0) || N(0, I))`` per sample (B,) in bits/dim; in the VE view the VP prior is
        ``N(0, (1 + sigma_T^2) I)`` and ``q(x_T | x0) = N(x0, sigma_T^2 I)``."""
        s2 = self.sigmas[-1] ** 2
        x64 = x0.to(torch.float64)
        zero = torch.zeros_like(x64)
        kl = gaussian_kl(x64, zero + torch.log(s2), zero, zero + torch.log1p(s2))
        return mean_bits(kl).to(compute_dtype(x0))

    @torch.no_grad()
    def vlb_bits_per_dim(
        self, denoiser: nn.Module, x0: Tensor, generator: torch.Generator | None = None, **cond: Tensor
    ) -> Tensor:
        """The full bound ``L_prior + sum_{k=1}^T L_k`` per sample (B,) in bits/dim (iDDPM's NLL), one noise
        draw per step (T denoiser calls)."""
        total = self.prior_bits(x0)
        for k in range(1, self.num_steps + 1):
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            steps = torch.full((x0.shape[0],), k, device=x0.device, dtype=torch.long)
            total = total + self.terms(denoiser, x0, steps, noise, **cond)["vlb"]
        return total


__all__ = [
    "HybridLoss",
    "gaussian_kl",
    "gaussian_nll",
    "discretized_gaussian_nll",
    "mean_bits",
]
