"""Noise schedules: ``x_t = alpha(t) x0 + sigma(t) eps`` and its variance-exploding (VE) view.

Every schedule is a path of Gaussian corruptions. Dividing by ``alpha`` gives the VE view used by the
whole codebase (Karras et al. 2022, "EDM", eq. 1 and Table 1)::

    x_ve = x_t / alpha(t) = x0 + sigma_ve(t) eps,      sigma_ve = sigma / alpha,
    log_snr(t) = log(alpha^2 / sigma^2) = -2 log sigma_ve(t)          (Kingma et al. 2021, "VDM", eq. 2)

so a schedule only decides *which* ``sigma_ve`` a time ``t`` means and how the process is scaled.
For a variance-preserving (VP) schedule ``alpha^2 + sigma^2 = 1``, hence ``alpha = 1/sqrt(1 + sigma_ve^2)``.

The forward SDE with these marginals is ``dx = f(t) x dt + g(t) dw`` with (VDM, appendix; Song et al.
2021, "Score SDE", eqs. 9-11)::

    f(t)   = d log alpha / dt,
    g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2 = -sigma^2 d log_snr / dt.

Schedules take and return tensors. They compute in the dtype of ``t`` (integers become the default float
dtype); the tables of :class:`DiscreteVP` are float64 and are cast to that dtype.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor


def _as_float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class NoiseSchedule:
    """Base class: ``alpha(t)``, ``sigma(t)``, their VE view and the SDE coefficients.

    Subclasses implement ``alpha``, ``sigma`` and ``t_from_sigma``; everything else has a generic
    definition (derivatives by autograd) that subclasses may replace with a closed form.
    ``t_min``/``t_max`` bound the times samplers and likelihoods use; ``sigma_min``/``sigma_max`` are the
    VE noise levels there.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    # ------------------------------------------------------------------ primary quantities
    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale alpha(t) of ``x_t = alpha x0 + sigma eps``."""
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise std sigma(t) of ``x_t = alpha x0 + sigma eps`` (the schedule's native scaling)."""
        raise NotImplementedError

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_ve`: the time at which the VE noise level is ``sigma_ve``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ derived quantities
    def sigma_ve(self, t: Tensor | float) -> Tensor:
        """VE noise level sigma(t) / alpha(t), so that ``x_t / alpha = x0 + sigma_ve eps``."""
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """log(alpha^2 / sigma^2) = -2 log sigma_ve (VDM eq. 2, ``lambda`` in DPM-Solver)."""
        return -2 * torch.log(self.sigma_ve(t))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr`."""
        return self.t_from_sigma(torch.exp(-_as_float(log_snr) / 2))

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        """d log_snr / dt (negative: the SNR decreases with t); autograd unless a subclass overrides."""
        return _derivative(self.log_snr, t)

    def sde_drift_coef(self, t: Tensor | float) -> Tensor:
        """f(t) = d log alpha / dt: the forward SDE drift is ``f(t) x``."""
        return _derivative(lambda s: torch.log(self.alpha(s)), t)

    def sde_diffusion_sq(self, t: Tensor | float) -> Tensor:
        """g(t)^2 = -sigma(t)^2 d log_snr / dt, the squared diffusion coefficient of the forward SDE."""
        return -(self.sigma(t) ** 2) * self.dlog_snr_dt(t)

    @property
    def sigma_min(self) -> float:
        """Smallest VE noise level of the schedule, ``sigma_ve(t_min)``."""
        return float(self.sigma_ve(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        """Largest VE noise level of the schedule, ``sigma_ve(t_max)``."""
        return float(self.sigma_ve(torch.tensor(self.t_max, dtype=torch.float64)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, Tensor))
        return f"{type(self).__name__}({args})"


def _derivative(fn, t: Tensor | float) -> Tensor:
    """Elementwise d fn(t) / dt by autograd (fn acts elementwise)."""
    t = _as_float(t).detach()
    with torch.enable_grad():
        t = t.requires_grad_(True)
        out = fn(t)
        if not out.requires_grad:  # fn does not depend on t
            return torch.zeros_like(t.detach())
        (grad,) = torch.autograd.grad(out.sum(), t, allow_unused=True, materialize_grads=True)
    return grad


class VPSchedule(NoiseSchedule):
    """A variance-preserving schedule defined by its log-SNR: ``alpha^2 = sigmoid(lambda)``,
    ``sigma^2 = sigmoid(-lambda)``, ``sigma_ve = exp(-lambda / 2)``. Subclasses give ``log_snr`` and
    ``t_from_log_snr``; then ``f = sigma^2 lambda' / 2`` and ``g^2 = -sigma^2 lambda'`` (so ``g^2 = -2 f``,
    the VP SDE ``dx = -beta/2 x dt + sqrt(beta) dw`` with ``beta = -sigma^2 lambda'``)."""

    def log_snr(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.sigmoid(self.log_snr(t)).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sigmoid(-self.log_snr(t)).sqrt()

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.log_snr(t) / 2)

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return self.t_from_log_snr(-2 * torch.log(_as_float(sigma_ve)))

    def beta(self, t: Tensor | float) -> Tensor:
        """Instantaneous rate beta(t) = g(t)^2 of the VP SDE."""
        return self.sde_diffusion_sq(t)

    def sde_drift_coef(self, t: Tensor | float) -> Tensor:
        return -self.beta(t) / 2


# ---------------------------------------------------------------------------------------------------
# Linear-beta VP (continuous DDPM) and sub-VP, Song et al. 2021 ("Score SDE", eqs. 11 and 12)
# ---------------------------------------------------------------------------------------------------
class _LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min) and its integral B(t) = int_0^t beta."""

    def __init__(self, beta_min: float, beta_max: float, t_min: float) -> None:
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def linear_beta(self, t: Tensor | float) -> Tensor:
        return self.beta_min + _as_float(t) * (self.beta_max - self.beta_min)

    def integral_beta(self, t: Tensor | float) -> Tensor:
        """B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""
        t = _as_float(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def t_from_integral_beta(self, b: Tensor) -> Tensor:
        """Positive root of (d/2) t^2 + beta_min t - B = 0, written without cancellation (d may be 0)."""
        d = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))


class VPLinear(_LinearBeta, VPSchedule):
    """Continuous-time DDPM (Song et al. 2021, eq. 11; Ho et al. 2020 with T -> infinity).

    ``log alpha^2(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) = -B(t)``, ``sigma_ve = sqrt(e^B - 1)``.
    ``beta_min = 0.1, beta_max = 20`` matches DDPM's 1000 linear betas 1e-4..0.02 (``beta_i ~ beta(t_i)/N``).
    ``t_min`` (default 1e-3, EDM's epsilon_s for VP sampling) sets ``sigma_min``; use 1e-5 for likelihoods.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        super().__init__(beta_min, beta_max, t_min)

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -torch.log(torch.expm1(self.integral_beta(t)))

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(torch.expm1(self.integral_beta(t)))

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.integral_beta(t) / 2)

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.integral_beta(t)))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        return self.t_from_integral_beta(torch.nn.functional.softplus(-_as_float(log_snr)))

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return self.t_from_integral_beta(torch.log1p(_as_float(sigma_ve) ** 2))

    def beta(self, t: Tensor | float) -> Tensor:
        return self.linear_beta(t)

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        # lambda = -log(e^B - 1)  =>  lambda' = -beta e^B / (e^B - 1) = -beta / (1 - e^{-B})
        return -self.linear_beta(t) / -torch.expm1(-self.integral_beta(t))

    def sde_diffusion_sq(self, t: Tensor | float) -> Tensor:
        return self.linear_beta(t)


class SubVP(_LinearBeta, NoiseSchedule):
    """Sub-VP SDE (Song et al. 2021, eq. 12): ``dx = -beta/2 x dt + sqrt(beta (1 - e^{-2B(t)})) dw``.

    Same mean as :class:`VPLinear` (``alpha = e^{-B/2}``) but marginal std ``sigma = 1 - e^{-B}``, so its
    variance ``(1 - e^{-B})^2`` is below the VP variance ``1 - e^{-B}`` everywhere (Score SDE, eq. 29).
    VE view: ``sigma_ve = (1 - e^{-B}) e^{B/2} = 2 sinh(B/2)``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        super().__init__(beta_min, beta_max, t_min)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.integral_beta(t) / 2)

    def sigma(self, t: Tensor | float) -> Tensor:
        return -torch.expm1(-self.integral_beta(t))

    def marginal_variance(self, t: Tensor | float) -> Tensor:
        """Closed form of the sub-VP marginal variance, ``(1 - exp(-int_0^t beta))^2``."""
        return self.sigma(t) ** 2

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return 2 * torch.sinh(self.integral_beta(t) / 2)

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return self.t_from_integral_beta(2 * torch.asinh(_as_float(sigma_ve) / 2))

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        # lambda = -2 log(2 sinh(B/2))  =>  lambda' = -beta coth(B/2)
        return -self.linear_beta(t) / torch.tanh(self.integral_beta(t) / 2)

    def sde_drift_coef(self, t: Tensor | float) -> Tensor:
        return -self.linear_beta(t) / 2

    def sde_diffusion_sq(self, t: Tensor | float) -> Tensor:
        return -self.linear_beta(t) * torch.expm1(-2 * self.integral_beta(t))


# ---------------------------------------------------------------------------------------------------
# Cosine VP, Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17)
# ---------------------------------------------------------------------------------------------------
class VPCosine(VPSchedule):
    """Cosine schedule ``alpha_bar(t) = cos^2(phi(t)) / cos^2(phi(0))``, ``phi(t) = (t + s)/(1 + s) pi/2``.

    iDDPM eq. 17 in continuous time. ``alpha_bar(1) = 0`` makes the log-SNR infinite there, so it is clipped
    to ``[logsnr_min, logsnr_max]`` (Salimans & Ho 2022 clip to [-20, 20]); the VE range is then
    ``[exp(-logsnr_max/2), exp(-logsnr_min/2)]``.
    """

    def __init__(self, s: float = 0.008, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> None:
        if s < 0 or logsnr_min >= logsnr_max:
            raise ValueError(
                f"need s >= 0 and logsnr_min < logsnr_max, got s={s}, [{logsnr_min}, {logsnr_max}]"
            )
        self.s, self.logsnr_min, self.logsnr_max = float(s), float(logsnr_min), float(logsnr_max)

    def _phi(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    @property
    def _cos_0(self) -> float:
        return math.cos(self.s / (1 + self.s) * math.pi / 2)

    def _raw_log_snr(self, t: Tensor) -> Tensor:
        # alpha_bar / (1 - alpha_bar) = cos^2(phi) / (cos^2(phi0) - cos^2(phi))
        cos2 = torch.cos(self._phi(t)) ** 2
        return torch.log(cos2) - torch.log((self._cos_0**2 - cos2).clamp_min(0))

    def log_snr(self, t: Tensor | float) -> Tensor:
        return self._raw_log_snr(_as_float(t)).clamp(self.logsnr_min, self.logsnr_max)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam = _as_float(log_snr).clamp(self.logsnr_min, self.logsnr_max)
        phi = torch.acos(torch.sigmoid(lam).sqrt() * self._cos_0)
        return (phi * 2 / math.pi * (1 + self.s) - self.s).clamp(0, 1)

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        t = _as_float(t)
        phi, dphi = self._phi(t), math.pi / (2 * (1 + self.s))
        cos2 = torch.cos(phi) ** 2
        dcos2 = -torch.sin(2 * phi) * dphi
        grad = dcos2 / cos2 + dcos2 / (self._cos_0**2 - cos2)
        raw = self._raw_log_snr(t)
        inside = (raw > self.logsnr_min) & (raw < self.logsnr_max)
        return torch.where(inside, grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------------
# Variance exploding: NCSN / Score SDE VE, and EDM
# ---------------------------------------------------------------------------------------------------
class VE(NoiseSchedule):
    """Geometric VE schedule ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``alpha = 1``.

    NCSN (Song & Ermon 2019) and the VE SDE (Song et al. 2021, eq. 9): ``f = 0``,
    ``g^2 = d sigma^2/dt = 2 sigma^2 log(sigma_max / sigma_min)``. (The SDE started at t=0 has marginal
    variance ``sigma(t)^2 - sigma_min^2``; like Score SDE we treat ``sigma_min`` as negligible.)
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.smin, self.smax = float(sigma_min), float(sigma_max)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_float(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.smin * (self.smax / self.smin) ** _as_float(t)

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return self.sigma(t)

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return torch.log(_as_float(sigma_ve) / self.smin) / math.log(self.smax / self.smin)

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_as_float(t), -2 * math.log(self.smax / self.smin))

    def sde_drift_coef(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_float(t))


class EDM(NoiseSchedule):
    """EDM (Karras et al. 2022, Table 1): ``sigma(t) = t``, ``alpha = 1``, so t *is* the noise level and runs
    over ``[sigma_min, sigma_max]`` (not [0, 1]). ODE: ``dx/dt = (x - D(x, t)) / t``; SDE ``f = 0, g^2 = 2t``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_float(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_float(t).clone()

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return self.sigma(t)

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return _as_float(sigma_ve).clone()

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        return -2 / _as_float(t)

    def sde_drift_coef(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_float(t))


# ---------------------------------------------------------------------------------------------------
# Discrete-time VP (DDPM / guided-diffusion / diffusers), with a continuous-time view
# ---------------------------------------------------------------------------------------------------
BetaKind = Literal["linear", "cosine", "scaled_linear"]


def make_betas(
    kind: BetaKind = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Discrete betas (float64): ``linear`` (Ho et al. 2020), ``scaled_linear`` (linear in sqrt(beta), Latent
    Diffusion) or ``cosine`` (Nichol & Dhariwal 2021 eq. 17: ``beta_i = 1 - abar(t_{i+1}) / abar(t_i)``,
    clipped at 0.999)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta kind {kind!r}; expected linear, scaled_linear or cosine")


def timestep_from_sigma(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional timestep ``k`` in ``[0, N-1]`` of VE noise level ``sigma``: ``log sigma_k`` interpolated
    linearly in ``k`` between the (ascending) knots ``log_sigmas``; clamped to the end points outside."""
    log_sigmas = log_sigmas.to(device=sigma.device, dtype=torch.float64)
    n = log_sigmas.shape[0]
    if n == 1:
        return torch.zeros_like(sigma)
    log_sigma = sigma.to(torch.float64).clamp_min(1e-300).log()
    hi = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, n - 1)
    lo_val, hi_val = log_sigmas[hi - 1], log_sigmas[hi]
    frac = ((log_sigma - lo_val) / (hi_val - lo_val)).clamp(0, 1)
    return (hi - 1 + frac).to(sigma.dtype if sigma.is_floating_point() else torch.get_default_dtype())


def sigma_from_timestep(timestep: Tensor, log_sigmas: Tensor) -> Tensor:
    """Inverse of :func:`timestep_from_sigma`: exp of the piecewise-linear interpolant of ``log_sigmas``."""
    timestep = _as_float(timestep)
    log_sigmas = log_sigmas.to(device=timestep.device, dtype=torch.float64)
    k = timestep.to(torch.float64).clamp(0, log_sigmas.shape[0] - 1)
    lo = k.floor().long().clamp(max=log_sigmas.shape[0] - 1)
    hi = (lo + 1).clamp(max=log_sigmas.shape[0] - 1)
    frac = k - lo
    return torch.exp(log_sigmas[lo] * (1 - frac) + log_sigmas[hi] * frac).to(timestep.dtype)


Spacing = Literal["linspace", "leading", "trailing"]


def respaced_timesteps(num_train_steps: int, n: int, spacing: Spacing = "linspace") -> Tensor:
    """``n`` integer timesteps out of ``0..num_train_steps-1``, descending.

    ``linspace``: ``round(linspace(0, T-1, n))``, includes both ends (guided-diffusion's ``space_timesteps``
    with one section; k-diffusion). ``leading``: ``0, T//n, 2T//n, ...`` (DDIM, Song et al. 2021a).
    ``trailing``: ``T-1, T-1-T/n, ...`` (Lin et al. 2024, ends at the most noisy step).
    """
    if not 1 <= n <= num_train_steps:
        raise ValueError(f"n must be in [1, {num_train_steps}], got {n}")
    if spacing == "linspace":
        steps = torch.linspace(0, num_train_steps - 1, n, dtype=torch.float64).round().long()
    elif spacing == "leading":
        steps = torch.arange(n) * (num_train_steps // n)
    elif spacing == "trailing":
        steps = (
            (num_train_steps - 1 - torch.arange(n, dtype=torch.float64) * (num_train_steps / n))
            .round()
            .long()
        )
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected linspace, leading or trailing")
    return steps.sort(descending=True).values


class DiscreteVP(VPSchedule):
    """A discrete N-step VP schedule (DDPM) with ``alphas_cumprod = cumprod(1 - betas)``.

    Discrete VE levels ``sigma_k = sqrt((1 - abar_k) / abar_k)``, k = 0..N-1 (ascending). The continuous view
    puts step ``k`` at ``t = k / N`` and interpolates ``log sigma`` linearly in t between steps (so
    ``time_scale=N`` in :class:`~diffusion_lab.diffusion.denoiser.Denoiser` feeds the net its fractional
    training timestep); t outside ``[0, (N-1)/N]`` is clamped to the end steps.

    Args:
        betas: explicit betas (N,); otherwise built by :func:`make_betas` from the other arguments.
    """

    def __init__(
        self,
        betas: Tensor | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_steps: int = 1000,
        kind: BetaKind = "linear",
    ) -> None:
        if betas is None:
            betas = make_betas(kind, num_steps, beta_start, beta_end)
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        if betas.numel() == 0 or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be a non-empty sequence of numbers in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.num_steps = betas.numel()
        self.t_min, self.t_max = 0.0, (self.num_steps - 1) / self.num_steps

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> DiscreteVP:
        """Build from a model's ``alphas_cumprod`` (betas recovered as ``1 - abar_k / abar_{k-1}``)."""
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if (abar <= 0).any() or (abar >= 1).any() or (abar[1:] > abar[:-1]).any():
            raise ValueError("alphas_cumprod must be decreasing numbers in (0, 1)")
        return cls(betas=1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))

    @property
    def sigmas(self) -> Tensor:
        """The N discrete VE noise levels, ascending (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    def timestep_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        """Fractional training timestep in ``[0, N-1]`` for a VE noise level (log-sigma interpolation)."""
        return timestep_from_sigma(_as_float(sigma_ve), self.log_sigmas)

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return sigma_from_timestep(_as_float(t) * self.num_steps, self.log_sigmas)

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * torch.log(self.sigma_ve(t))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        return self.t_from_sigma(torch.exp(-_as_float(log_snr) / 2))

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        return self.timestep_from_sigma(sigma_ve) / self.num_steps

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        # piecewise linear log sigma in k: slope of the segment that contains t (right segment at knots)
        t = _as_float(t)
        log_sigmas = self.log_sigmas.to(t.device)
        k = (t.to(torch.float64) * self.num_steps).clamp(0, self.num_steps - 1)
        lo = k.floor().long().clamp(max=max(self.num_steps - 2, 0))
        slope = log_sigmas[(lo + 1).clamp(max=self.num_steps - 1)] - log_sigmas[lo]
        inside = (t * self.num_steps >= 0) & (t * self.num_steps <= self.num_steps - 1)
        return torch.where(inside, -2 * self.num_steps * slope, torch.zeros_like(slope)).to(t.dtype)

    def respaced_sigmas(self, n: int, spacing: Spacing = "linspace") -> Tensor:
        """Discrete sigmas at ``n`` respaced timesteps (:func:`respaced_timesteps`), descending, then 0."""
        sigmas = self.sigmas[respaced_timesteps(self.num_steps, n, spacing)]
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def schedule_from_spec(spec: NoiseSchedule | Mapping[str, Any] | str) -> NoiseSchedule:
    """A schedule as YAML gives it: an instance (returned as is), ``{class_path: ..., init_args: {...}}``
    (``class_path`` fully qualified, or a class name of this module such as ``VPCosine``), or a bare class name.
    The class must be a :class:`NoiseSchedule`."""
    if isinstance(spec, NoiseSchedule):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise TypeError(
            f"a schedule must be a NoiseSchedule, a class name or {{class_path, init_args}}, got {spec!r}"
        )
    path = str(spec["class_path"])
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or __name__), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import schedule class_path {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, NoiseSchedule)):
        raise TypeError(f"schedule class_path {path!r} is not a NoiseSchedule")
    return cls(**dict(spec.get("init_args") or {}))


__all__ = [
    "schedule_from_spec",
    "NoiseSchedule",
    "VPSchedule",
    "VPLinear",
    "SubVP",
    "VPCosine",
    "VE",
    "EDM",
    "DiscreteVP",
    "make_betas",
    "timestep_from_sigma",
    "sigma_from_timestep",
    "respaced_timesteps",
]
