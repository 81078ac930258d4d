"""Sampling grids: descending VE noise levels ``sigma_0 > ... > sigma_{n-1} > 0`` followed by ``sigma_n = 0``.

``n`` is the number of positive levels and therefore of sampler steps (EDM's ``num_steps``). Every grid is
float64; samplers cast it to the sample dtype. :func:`get_sigmas` selects one by name (for YAML).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.samplers._base import check_options
from diffusion_lab.diffusion.schedules import NoiseSchedule, VPLinear, respaced_timesteps, schedule_from_spec


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps n must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if n > 1 and sigma_min == sigma_max:
        raise ValueError(f"n={n} levels need sigma_min < sigma_max, got both {sigma_min}")


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``, i = 0..n-1, then 0. ``rho = 1`` is uniform in sigma, ``rho -> inf``
    geometric; EDM uses rho = 7, n = 18 on [0.002, 80]. A single level (n = 1) is ``sigma_max``."""
    _check_range(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[-1], sigmas[0] = sigma_min, sigma_max  # exact end points (the powers round)
    return _append_zero(sigmas)


def loglinear_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Geometric levels ``exp(linspace(log sigma_max, log sigma_min, n))`` then 0 (NCSN, score-SDE VE)."""
    _check_range(n, sigma_min, sigma_max)
    return _append_zero(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    )


def vp_sigmas(
    n: int, schedule: NoiseSchedule | Mapping[str, Any] | str | None = None, eps_s: float = 1e-3
) -> Tensor:
    """EDM's VP discretisation (Karras et al. 2022, Table 1): times uniform in ``t`` from 1 to ``eps_s``,
    ``t_i = 1 + i/(n-1) (eps_s - 1)``, mapped through the schedule's ``sigma_ve(t)``, then 0.

    The default schedule is the continuous linear-beta VP (``beta_min = 0.1``, ``beta_max = 20``), for which
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` with ``beta_d = 19.9``. From YAML the schedule is
    ``schedule_kwargs: {schedule: {class_path: diffusion_lab.diffusion.schedules.VPCosine, init_args: {...}}}``
    (or a class name of ``diffusion.schedules``), see :func:`~diffusion_lab.diffusion.schedules.schedule_from_spec`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps n must be an integer >= 1, got {n!r}")
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
    schedule = VPLinear() if schedule is None else schedule_from_spec(schedule)
    t = torch.linspace(1.0, eps_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    with torch.no_grad():  # a learned schedule (vdm_schedule) builds no graph here
        return _append_zero(schedule.sigma_ve(t).to(torch.float64))


Respacing = Literal["uniform", "quad", "linspace", "leading", "trailing"]


def respaced_sigmas(n: int, model_sigmas: Tensor, spacing: Respacing = "uniform") -> Tensor:
    """A discrete model's own levels at ``n`` respaced timesteps, descending, then 0.

    ``model_sigmas`` are the model's N levels ``sqrt((1 - abar_k)/abar_k)`` in ascending k (e.g.
    ``DiscreteEpsDenoiser.sigmas``). Spacings: ``uniform`` = DDIM's ``range(0, N, N // n)`` (= ``leading``);
    ``quad`` = DDIM's ``int(linspace(0, sqrt(0.8 N), n)^2)`` (Song et al. 2021a, appendix D.2; repeated
    timesteps at the low end are merged, so the grid may have fewer than n levels); ``linspace``,
    ``leading``, ``trailing`` as in :func:`diffusion_lab.diffusion.schedules.respaced_timesteps`.
    """
    model_sigmas = torch.as_tensor(model_sigmas, dtype=torch.float64).reshape(-1)
    num_train = model_sigmas.numel()
    if num_train < 1 or (model_sigmas[1:] <= model_sigmas[:-1]).any():
        raise ValueError("model_sigmas must be the model's discrete levels in strictly ascending order")
    if not isinstance(n, int) or not 1 <= n <= num_train:
        raise ValueError(f"number of steps n must be an integer in [1, {num_train}], got {n!r}")
    if spacing == "quad":
        steps = (torch.linspace(0, math.sqrt(0.8 * num_train), n, dtype=torch.float64) ** 2).long()
        steps = torch.unique(steps).flip(0)
    elif spacing in ("uniform", "leading"):
        steps = respaced_timesteps(num_train, n, "leading")
    elif spacing in ("linspace", "trailing"):
        steps = respaced_timesteps(num_train, n, spacing)
    else:
        raise ValueError(
            f"unknown spacing {spacing!r}; expected uniform, quad, linspace, leading or trailing"
        )
    return _append_zero(model_sigmas[steps])


SIGMA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras_sigmas,
    "loglinear": loglinear_sigmas,
    "vp": vp_sigmas,
    "respaced": respaced_sigmas,
}


def get_sigmas(name: str, n: int, **kwargs: object) -> Tensor:
    """Grid ``name`` with ``n`` positive levels: ``karras`` (sigma_min, sigma_max, rho), ``loglinear``
    (sigma_min, sigma_max), ``vp`` (schedule, eps_s) or ``respaced`` (model_sigmas, spacing)."""
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; expected one of {', '.join(SIGMA_SCHEDULES)}")
    check_options(SIGMA_SCHEDULES[name], kwargs, f"sigma schedule {name!r}", exclude=("n",))
    return SIGMA_SCHEDULES[name](n, **kwargs)


__all__ = [
    "karras_sigmas",
    "loglinear_sigmas",
    "vp_sigmas",
    "respaced_sigmas",
    "SIGMA_SCHEDULES",
    "get_sigmas",
]
