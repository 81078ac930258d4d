"""VDM's learned noise schedule and its continuous-time VLB loss (Kingma et al. 2021, "VDM").

**Schedule.** ``gamma(t) = -log SNR(t) = log sigma_ve(t)^2`` (VE view ``x_t / alpha_t = x + sigma_ve eps``,
``sigma_ve^2 = sigma^2 / alpha^2 = exp(gamma)``, VDM eq. 3 with ``sigma_t^2 = sigmoid(gamma)``), increasing on
``[0, 1]`` and written as its endpoints plus a normalised shape::

    gamma(t) = gamma_min + (gamma_max - gamma_min) s(t),      s(t) = (g(t) - g(0)) / (g(1) - g(0)),

so ``gamma(0) = gamma_min``, ``gamma(1) = gamma_max`` exactly and ``s`` carries the shape only. ``g`` is VDM's
monotone network (App. H; ``NoiseSchedule_NNet`` of the public code): ``g(t) = |w_1| t + (1/n) sum_k |w_3k|
(2 sigmoid(|w_2k| (2t - 1) + b_2k) - 1)``, increasing because every weight on the path from t is non-negative.
``shape="linear"`` is ``s(t) = t``: only the endpoints are learned (``NoiseSchedule_Scalar``, the schedule of the
public CIFAR-10 config). ``gamma'(t)`` is in closed form, so the loss also works under ``torch.inference_mode``.

**Loss** (VDM eqs. 11-17, VP prior ``N(0, I)``), per data point in nats::

    L(x) = KL(q(z_1 | x) || N(0, I)) + E[-log p(x | z_0)] + 1/2 E_{t ~ U[0, 1], eps}[gamma'(t) ||eps - eps_hat||^2]

with ``||eps - eps_hat||^2 = ||x - D(x + sigma eps, sigma)||^2 / sigma^2`` at ``sigma = exp(gamma(t) / 2)``.
Times are VDM's low-discrepancy draws ``t_i = (u + i / B) mod 1``. The decoder is VDM's discrete one for data on a
``num_levels`` grid (images), else the Gaussian one (continuous data); both come from ``likelihood.py``.

**Variance minimisation** (VDM Sec. 5: the continuous-time diffusion loss depends on the schedule only through
``gamma_min`` and ``gamma_max``). The shape parameters ``eta`` cannot change ``E[L]``, so VDM spends them on the
variance of the estimator: ``grad_eta Var[L_diff] = grad_eta E[L_diff^2] = E[2 L_diff grad_eta L_diff]``. One
backward pass gives it: the gradient reaching ``s(t_i)`` and ``s'(t_i)`` (which only ``eta`` feeds) is multiplied
by ``2 L_diff,i`` (detached), so ``eta`` receives ``grad_eta mean(L_diff^2)`` while the endpoints and the denoiser
receive the plain VLB gradient. (Using ``L_diff`` rather than the whole ``L`` drops the term
``E[2 (L_prior + L_rec) grad_eta L_diff]``, whose expectation is zero for every x, from the estimate.)

The loss is a ``DenoisingLoss`` (eps weighting; ``sigma_sampler`` is ``sigma(t)``, ``t ~ U[0, 1]``) so it plugs into
``DiffusionModule`` as ``loss:``; its parameters (the schedule) must be in the optimiser, see docs/foundations.md.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.likelihood import (
    Prior,
    discrete_decoder_nll,
    gaussian_decoder_nll,
    prior_kl,
    prior_variance_for,
)
from diffusion_lab.diffusion.losses import DenoisingLoss, UniformTimeSigma
from diffusion_lab.diffusion.schedules import VPSchedule, _as_float

Shape = Literal["monotone_net", "linear"]


class LearnedNoiseSchedule(nn.Module, VPSchedule):
    """VDM's learnable ``gamma_eta(t) = log sigma_ve(t)^2`` on ``t in [0, 1]`` (module docstring).

    Also a ``VPSchedule`` (``log_snr = -gamma``), so samplers' grids and ``likelihood.vdm_elbo`` take it as any
    other schedule. Computations run in the dtype of ``t`` (parameters are cast).

    Args:
        gamma_min, gamma_max: initial endpoints ``gamma(0) < gamma(1)`` (VDM: -13.3 and 5).
        shape: ``monotone_net`` (VDM's network) or ``linear`` (``s(t) = t``).
        num_features: hidden width ``n`` of the monotone network (VDM: 1024).
        learn_endpoints: train ``gamma_min``/``gamma_max`` (else they are fixed buffers).
    """

    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        shape: Shape = "monotone_net",
        num_features: int = 1024,
        learn_endpoints: bool = True,
    ) -> None:
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got gamma_min={gamma_min}, gamma_max={gamma_max}")
        if shape not in ("monotone_net", "linear"):
            raise ValueError(f"unknown shape {shape!r}; expected monotone_net or linear")
        if shape == "monotone_net" and num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        ends = (torch.tensor(float(gamma_min)), torch.tensor(float(gamma_max)))
        if learn_endpoints:
            self.gamma_min, self.gamma_max = nn.Parameter(ends[0]), nn.Parameter(ends[1])
        else:
            self.register_buffer("gamma_min", ends[0])
            self.register_buffer("gamma_max", ends[1])
        self.shape_kind = shape
        if shape == "monotone_net":
            # VDM's initialisation: l1 = (gamma_max - gamma_min) t, l2 and l3 kernels N(0, 1), l2 bias 0
            self.w1 = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))
            self.w2 = nn.Parameter(torch.randn(num_features))
            self.b2 = nn.Parameter(torch.zeros(num_features))
            self.w3 = nn.Parameter(torch.randn(num_features))

    # ------------------------------------------------------------------ the shape
    def _net(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised monotone network g(t) and g'(t), elementwise."""
        w1, w2, b2, w3 = (p.to(t.dtype) for p in (self.w1, self.w2, self.b2, self.w3))
        pre = (2 * t[..., None] - 1) * w2.abs() + b2
        sig = torch.sigmoid(pre)
        n = w2.shape[0]
        g = w1.abs() * t + ((2 * sig - 1) * w3.abs()).sum(-1) / n
        dg = w1.abs() + (4 * sig * (1 - sig) * w2.abs() * w3.abs()).sum(-1) / n
        return g, dg

    def shape(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Normalised shape ``s(t)`` in [0, 1] (``s(0) = 0``, ``s(1) = 1``) and its derivative ``s'(t) > 0``."""
        t = _as_float(t)
        if self.shape_kind == "linear":
            return t.clone(), torch.ones_like(t)
        g, dg = self._net(t)
        ends, _ = self._net(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, dg / span

    def endpoints(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(gamma_min, gamma_max)`` as tensors of ``dtype`` (differentiable when learned)."""
        return self.gamma_min.to(dtype), self.gamma_max.to(dtype)

    def gamma_and_derivative(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``gamma(t)`` and ``gamma'(t) = (gamma_max - gamma_min) s'(t)``."""
        t = _as_float(t)
        s, ds = self.shape(t)
        lo, hi = self.endpoints(t.dtype)
        return lo + (hi - lo) * s, (hi - lo) * ds

    def forward(self, t: Tensor | float) -> Tensor:
        """``gamma(t) = log sigma_ve(t)^2 = -log SNR(t)``."""
        return self.gamma_and_derivative(t)[0]

    # ------------------------------------------------------------------ the NoiseSchedule view
    @property
    def sigma_min(self) -> float:
        return math.exp(float(self.gamma_min.detach()) / 2)

    @property
    def sigma_max(self) -> float:
        return math.exp(float(self.gamma_max.detach()) / 2)

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -self(t)

    def dlog_snr_dt(self, t: Tensor | float) -> Tensor:
        return -self.gamma_and_derivative(t)[1]

    def t_from_log_snr(self, log_snr: Tensor | float, iterations: int = 60) -> Tensor:
        """Inverse of ``log_snr`` by bisection on [0, 1] (``gamma`` is increasing); clamped to the ends."""
        target = -_as_float(log_snr)
        with torch.no_grad():
            lo, hi = torch.zeros_like(target), torch.ones_like(target)
            for _ in range(iterations):
                mid = (lo + hi) / 2
                below = self(mid) < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def extra_repr(self) -> str:
        lo, hi = (float(v.detach()) for v in self.endpoints(torch.float64))
        return f"shape={self.shape_kind}, gamma_min={lo:.4g}, gamma_max={hi:.4g}"


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``holder["scale"]`` (set after forward)."""

    @staticmethod
    def forward(ctx, x: Tensor, holder: dict) -> Tensor:  # type: ignore[override]
        ctx.holder = holder
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.holder["scale"], None


class VDMLoss(DenoisingLoss):
    """VDM's continuous-time VLB with a learned schedule (module docstring), in bits/dim per batch.

    Args:
        schedule: the ``LearnedNoiseSchedule`` (default: VDM's monotone network on [-13.3, 5]).
        num_levels: data on the grid ``k / ((num_levels - 1) / 2) - 1`` (e.g. 256, or 17 for the digits) uses
            VDM's discrete decoder; None the Gaussian decoder of continuous data.
        prior: ``vp`` (VDM's ``N(0, I)`` on z_1) or ``ve`` (``N(0, sigma_max^2 I)``).
        variance_minimisation: train the schedule's shape on ``E[L_diff^2]`` (VDM); False: on the VLB (whose
            gradient in the shape is zero in expectation).
        antithetic: low-discrepancy times ``(u + i/B) mod 1``; False: i.i.d. uniform.

    ``forward(denoiser, x0, **cond)`` returns ``mean_i L(x_i) / (d ln 2)``, the VLB in bits/dim (an upper bound
    on ``-log2 P(x) / d`` with the discrete decoder). ``terms`` gives the per-sample pieces in nats.
    """

    def __init__(
        self,
        schedule: LearnedNoiseSchedule | None = None,
        num_levels: int | None = None,
        prior: Prior = "vp",
        variance_minimisation: bool = True,
        antithetic: bool = True,
    ) -> None:
        schedule = schedule if schedule is not None else LearnedNoiseSchedule()
        if not isinstance(schedule, LearnedNoiseSchedule):
            raise TypeError(f"schedule must be a LearnedNoiseSchedule, got {type(schedule).__name__}")
        super().__init__(sigma_sampler=UniformTimeSigma(schedule, t_min=0.0), weighting="eps")
        if num_levels is not None and num_levels < 2:
            raise ValueError(f"num_levels must be >= 2 or None, got {num_levels}")
        prior_variance_for(1.0, prior)  # validate the name
        self.num_levels, self.prior = num_levels, prior
        self.variance_minimisation, self.antithetic = variance_minimisation, antithetic

    @property
    def schedule(self) -> LearnedNoiseSchedule:
        """The learned schedule (registered once, inside ``sigma_sampler``)."""
        return self.sigma_sampler.schedule  # type: ignore[return-value]

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """VDM's antithetic times ``(u + i/n) mod 1``, i = 0..n-1 (or i.i.d. uniform)."""
        if self.antithetic:
            return torch.remainder(torch.rand(1, device=device) + torch.arange(n, device=device) / n, 1.0)
        return torch.rand(n, device=device)

    def terms(
        self,
        denoiser: DenoiserFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        noise_0: Tensor | None = None,
        **cond: Tensor,
    ) -> dict[str, Tensor]:
        """Per-sample VLB terms in nats (B,) at given times ``t`` (B,), noise and decoder noise ``noise_0``:
        ``prior``, ``reconstruction``, ``diffusion`` (``1/2 gamma'(t) ||eps - eps_hat||^2``) and ``total``.
        With ``variance_minimisation`` and gradients on, the shape's gradient is that of ``mean(diffusion^2)``
        once ``total.mean()`` is back-propagated."""
        d = x0[0].numel()
        s, ds = self.schedule.shape(t.to(x0.dtype))
        holder: dict[str, Tensor] = {}
        hook = self.variance_minimisation and torch.is_grad_enabled() and s.requires_grad
        if hook:
            s, ds = _ScaleGradient.apply(s, holder), _ScaleGradient.apply(ds, holder)
        lo, hi = self.schedule.endpoints(x0.dtype)
        gamma, dgamma = lo + (hi - lo) * s, (hi - lo) * ds
        sigma = torch.exp(gamma / 2)
        # per_sample with the eps weighting is ||x0 - D||^2 / (d sigma^2) = ||eps - eps_hat||^2 / d
        diffusion = 0.5 * dgamma * d * self.per_sample(denoiser, x0, sigma, noise, **cond)
        if hook:
            holder["scale"] = 2 * diffusion.detach()
        sigma_min, sigma_max = torch.exp(lo / 2), torch.exp(hi / 2)
        prior = prior_kl(x0, sigma_max, prior_variance_for(sigma_max, self.prior))
        if self.num_levels is None:
            reconstruction = gaussian_decoder_nll(x0, sigma_min)
        else:
            noise_0 = noise_0 if noise_0 is not None else torch.randn_like(x0)
            reconstruction = discrete_decoder_nll(x0, sigma_min, self.num_levels, noise_0)
        total = prior + reconstruction + diffusion
        return {"prior": prior, "reconstruction": reconstruction, "diffusion": diffusion, "total": total}

    def forward(self, denoiser: DenoiserFn, x0: Tensor, **cond: Tensor) -> Tensor:
        t = self.sample_t(x0.shape[0], device=x0.device)
        total = self.terms(denoiser, x0, t, torch.randn_like(x0), **cond)["total"]
        return total.mean() / (x0[0].numel() * math.log(2))


__all__ = ["LearnedNoiseSchedule", "VDMLoss"]
