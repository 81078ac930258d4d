"""The math of guided distillation (Meng et al., CVPR 2023) and progressive distillation (Salimans & Ho 2022).

Everything is written in the VE view ``x = x0 + sigma eps`` of the denoiser contract; a VP latent is
``z_t = alpha_t x`` with ``sigma_vp = alpha_t sigma`` (see ``diffusion.denoiser``).

**Guided teacher** (Ho & Salimans 2022; Meng et al. 2023, eq. 3): one class-conditional network trained with
label dropout gives ``x_w = (1 + w) x_c - w x_u``; :func:`guided_teacher` wraps it in
:class:`~diffusion_lab.diffusion.guidance.ClassifierFreeGuidance` with a per-sample ``w`` (one batched call).

**Stage 1** (Meng et al. 2023, sec. 4.1, eq. 5): a student ``x_eta(z_t, w, c)`` that also sees ``w`` regresses the
guided teacher at ``w ~ U[w_min, w_max]`` and ``t ~ U[0, 1]``::

    L_1 = E_{w, t, x, eps} omega(lambda_t) || x_eta(z_t, w) - x_w(z_t) ||^2

**Stage 2** (progressive distillation, Salimans & Ho 2022, Algorithm 2; google-research ``dpm.py``): on the grid
``t_i = i / N`` an N-step student matches two DDIM steps of the 2N-step teacher, ``t -> t - 1/(2N) -> t - 1/N``.
The DDIM step in the VE view is ``x' = x_hat + (sigma' / sigma)(x - x_hat)``. If the teacher's two steps end at
``x''``, the one-step student lands on ``x''`` exactly when it predicts::

    x_tilde = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma)                                      (VE)
            = (z'' - (sigma_vp''/sigma_vp) z_t) / (alpha'' - (sigma_vp''/sigma_vp) alpha_t)         (VP, S&H eq. 7)

(the two lines are the same number: multiply numerator and denominator of the VE form by ``alpha''``). At the
last step ``sigma'' = 0`` and the target is the teacher's second prediction itself.

Both losses are ``omega(sigma) ||x_student - target||^2`` with ``omega`` from :func:`losses.loss_weight`; the
default ``snr_trunc`` is ``max(SNR, 1)`` (Salimans & Ho 2022, "truncated SNR"), ``v`` gives the v-MSE.

**Time grids**: a distillation schedule is any ``NoiseSchedule`` (``t`` in [0, 1] -> ``sigma_ve(t)``): the paper's
:class:`~diffusion_lab.diffusion.schedules.VPCosine`, or :class:`KarrasTime` (EDM's rho-spacing as a function of
t) for teachers trained on EDM's noise range. The N-step grid ``sigma_ve(i/N), i = N..1`` followed by 0 contains
the N/2-step grid, which is what makes halving possible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn, append_dims
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance
from diffusion_lab.diffusion.losses import Weighting, loss_weight
from diffusion_lab.diffusion.schedules import NoiseSchedule


def _as_float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------------
# A schedule with EDM's spacing (for teachers trained on sigma in [0.002, 80])
# ---------------------------------------------------------------------------------------------------
class KarrasTime(NoiseSchedule):
    """EDM's step spacing as a continuous schedule (Karras et al. 2022, eq. 5), variance exploding::

        sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,   alpha = 1,

    so the uniform grid ``t_i = i / N`` gives EDM's N-level Karras grid. Use it to distill a teacher trained on
    EDM's noise range, where the cosine schedule's clipped ends (sigma up to e^10) are outside what it has seen.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, rho={rho}"
            )
        self.smin, self.smax, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_float(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        lo, hi = self.smin ** (1 / self.rho), self.smax ** (1 / self.rho)
        return (lo + _as_float(t) * (hi - lo)) ** self.rho

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        return self.sigma(t)

    def t_from_sigma(self, sigma_ve: Tensor | float) -> Tensor:
        lo, hi = self.smin ** (1 / self.rho), self.smax ** (1 / self.rho)
        return (_as_float(sigma_ve) ** (1 / self.rho) - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------
def check_steps(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of sampling steps must be an integer >= 1, got {n!r}")
    return n


def distillation_sigmas(schedule: NoiseSchedule, n: int) -> Tensor:
    """The N-step grid of a distilled model: ``sigma_ve(i/N)`` for i = N, ..., 1, then 0 (float64, N + 1 levels).

    The grid of 2N steps contains this one (every other level), so an N-step student and a 2N-step teacher
    share their levels. Raises ValueError if the schedule maps two grid times to the same level (a clipped
    log-SNR), since samplers need strictly decreasing levels.
    """
    check_steps(n)
    t = torch.arange(n, 0, -1, dtype=torch.float64) / n
    sigmas = schedule.sigma_ve(t).to(torch.float64)
    if not torch.isfinite(sigmas).all() or (sigmas <= 0).any() or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(
            f"{schedule!r} does not give strictly decreasing positive levels on the {n}-step grid t = i/{n} "
            f"(got {sigmas.tolist()[:4]}...); widen its log-SNR clipping or use fewer steps"
        )
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def student_step_levels(
    schedule: NoiseSchedule,
    n: int,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random student steps of the N-step grid: ``i ~ U{1..N}``, levels at ``t = i/N``, ``t - 1/(2N)`` and
    ``t - 1/N`` as three (B,) float32 tensors ``(sigma, sigma_mid, sigma_next)``; ``sigma_next = 0`` when i = 1."""
    grid = distillation_sigmas(schedule, 2 * check_steps(n)).float()  # 2N + 1 levels, grid[2N] = 0
    i = torch.randint(1, n + 1, (batch,), generator=generator)  # student step from t = i/N
    k = 2 * (n - i)  # index of t = i/N in the 2N-step grid
    return grid[k].to(device), grid[k + 1].to(device), grid[k + 2].to(device)


# ---------------------------------------------------------------------------------------------------
# Teachers and targets
# ---------------------------------------------------------------------------------------------------
def guided_teacher(
    teacher: DenoiserFn,
    w: Tensor | float,
    null_label: int | None = None,
    null_cond: Mapping[str, Tensor] | None = None,
) -> ClassifierFreeGuidance:
    """``x_w = (1 + w) x_c - w x_u`` (Meng et al. 2023, eq. 3) from one conditional network, one batched call."""
    return ClassifierFreeGuidance(teacher, w=w, null_label=null_label, null_cond=null_cond)


def ddim_step_to(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Per-sample deterministic DDIM step (VE view): ``x' = x_hat + (sigma'/sigma)(x - x_hat)``.

    Same update as :func:`diffusion_lab.diffusion.samplers.ddim_step`, with (B,) level tensors.
    """
    ratio = append_dims(sigma_next / sigma, x.ndim).to(x.dtype)
    return denoised + ratio * (x - denoised)


def two_step_ddim(
    teacher: DenoiserFn, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor, **cond: Tensor
) -> tuple[Tensor, Tensor]:
    """The teacher's two DDIM steps ``sigma -> sigma_mid -> sigma_next``: returns ``(x'', x_hat_mid)``."""
    x_mid = ddim_step_to(x, teacher(x, sigma, **cond), sigma, sigma_mid)
    denoised_mid = teacher(x_mid, sigma_mid, **cond)
    return ddim_step_to(x_mid, denoised_mid, sigma_mid, sigma_next), denoised_mid


def one_step_target(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The prediction ``x_tilde`` whose DDIM step from ``(x, sigma)`` lands on ``x_next`` at ``sigma_next``::

        x_tilde = (x_next - r x) / (1 - r),   r = sigma_next / sigma   (0 <= r < 1)

    (Salimans & Ho 2022, eq. 7, in the VE view; see the module docstring). ``sigma_next = 0`` gives ``x_next``.
    """
    r = append_dims(sigma_next / sigma, x.ndim).to(x.dtype)
    return (x_next - r * x) / (1 - r)


def vp_one_step_target(
    z_t: Tensor, z_next: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_next: Tensor, sigma_next: Tensor
) -> Tensor:
    """Salimans & Ho's target in VP variables (``dpm.py``): ``(z'' - (s''/s_t) z_t) / (a'' - (s''/s_t) a_t)``."""
    frac = append_dims(sigma_next / sigma_t, z_t.ndim)
    return (z_next - frac * z_t) / (append_dims(alpha_next, z_t.ndim) - frac * append_dims(alpha_t, z_t.ndim))


def progressive_target(
    teacher: DenoiserFn, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor, **cond: Tensor
) -> Tensor:
    """Stage-2 target: :func:`one_step_target` of the teacher's :func:`two_step_ddim` (no gradient)."""
    with torch.no_grad():
        x_next, _ = two_step_ddim(teacher, x, sigma, sigma_mid, sigma_next, **cond)
        return one_step_target(x, x_next, sigma, sigma_next)


def weighted_error(
    prediction: Tensor,
    target: Tensor,
    sigma: Tensor,
    weighting: Weighting = "snr_trunc",
    sigma_data: float = 0.5,
) -> Tensor:
    """Per-sample ``omega(sigma) mean ||prediction - target||^2`` (B,), float32 or wider (``sigma_data`` is used
    by the ``edm`` weighting only)."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    error = (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    return loss_weight(weighting, sigma.to(error.dtype), sigma_data) * error


def sample_guidance_weights(
    batch: int,
    w_min: float,
    w_max: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``w ~ U[w_min, w_max]`` per sample (Meng et al. 2023: [0, 4] in pixel space), (B,) float32."""
    if not 0 <= w_min <= w_max or not math.isfinite(w_max):
        raise ValueError(f"need 0 <= w_min <= w_max < inf, got w_min={w_min}, w_max={w_max}")
    u = torch.rand(batch, generator=generator)
    return (w_min + (w_max - w_min) * u).to(device)


def check_halving(steps: list[int]) -> list[int]:
    """Validate a stage-2 schedule of student step counts: each phase halves the previous one."""
    steps = [check_steps(int(n)) for n in steps]
    if not steps:
        raise ValueError("the stage-2 schedule needs at least one student step count, e.g. [64, 32, ..., 1]")
    for a, b in zip(steps, steps[1:]):
        if a != 2 * b:
            raise ValueError(f"each phase must halve the step count; got {a} followed by {b} in {steps}")
    return steps


__all__ = [
    "KarrasTime",
    "check_halving",
    "check_steps",
    "ddim_step_to",
    "distillation_sigmas",
    "guided_teacher",
    "one_step_target",
    "progressive_target",
    "sample_guidance_weights",
    "student_step_levels",
    "two_step_ddim",
    "vp_one_step_target",
    "weighted_error",
]
