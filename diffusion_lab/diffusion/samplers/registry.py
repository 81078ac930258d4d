"""Name -> sampler registry and the ``sample`` dispatcher used by YAML configs and the DiffusionModule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import (
    Callback,
    Cond,
    accepted_options,
    check_options,
    check_sigmas,
)
from diffusion_lab.diffusion.samplers.ancestral import (
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
)
from diffusion_lab.diffusion.samplers.distilled import sample_distilled_stochastic
from diffusion_lab.diffusion.samplers.langevin import sample_annealed_langevin, sample_pc
from diffusion_lab.diffusion.samplers.multistep import sample_lms, sample_plms
from diffusion_lab.diffusion.samplers.ode import sample_dpmpp_2m, sample_heun
from diffusion_lab.diffusion.samplers.split import sample_ltsp, sample_stsp

Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "plms": sample_plms,
    "lms": sample_lms,
    "ltsp": sample_ltsp,
    "stsp": sample_stsp,
    "ddpm": sample_ddpm,
    "euler_ancestral": sample_euler_ancestral,
    "annealed_langevin": sample_annealed_langevin,
    "pc": sample_pc,
    "distilled_stochastic": sample_distilled_stochastic,
}
"""Name -> sampler function, for selection from YAML (``sampler: {method: heun}``)."""

ODE_SAMPLERS: tuple[str, ...] = ("euler", "heun", "ddim", "dpmpp_2m", "plms", "lms", "ltsp", "stsp")
"""Samplers that solve the probability-flow ODE (deterministic with default options)."""

SDE_SAMPLERS: tuple[str, ...] = ("ddpm", "euler_ancestral", "annealed_langevin", "pc", "distilled_stochastic")
"""Samplers that draw from the data distribution through noise injection."""

_CONTRACT_ARGS = ("denoiser", "x", "sigmas", "generator", "callback", "cond")


def get_sampler(method: str) -> Sampler:
    """The sampler function registered as ``method``; ValueError listing the valid names otherwise."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler method {method!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[method]


def sampler_options(method: str) -> list[str]:
    """The extra keyword options a sampler takes (e.g. ``['eta']`` for ddim)."""
    return accepted_options(get_sampler(method), _CONTRACT_ARGS)


def _apply_guidance(denoiser: DenoiserFn, guidance: Callable[[DenoiserFn], DenoiserFn]) -> DenoiserFn:
    from diffusion_lab.diffusion.guidance import Guidance

    if isinstance(guidance, Guidance):
        raise ValueError(
            "guidance must be a factory denoiser -> guided denoiser, e.g. "
            "functools.partial(ClassifierFreeGuidance, w=2.0, null_label=10); got an already built "
            f"{type(guidance).__name__}: pass it as the denoiser instead"
        )
    return guidance(denoiser)


def _progress_callback(callback: Callback | None, total: int) -> tuple[Callback, Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sampling", leave=False)

    def step(info: dict[str, Any]) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    return step, bar


def sample(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    method: str = "heun",
    guidance: Callable[[DenoiserFn], DenoiserFn] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    """Run sampler ``method`` (a key of :data:`SAMPLERS`) from ``noise = sigmas[0] * randn`` to x0.

    Args:
        guidance: optional factory turning the denoiser into a guided one, e.g.
            ``functools.partial(ClassifierFreeGuidance, w=2.0, null_label=10)``.
        progress: show a tqdm progress bar over the steps.
        options: the sampler's own options (``eta``, ``s_churn``, ``order``, ...); unknown ones raise.
    """
    fn = get_sampler(method)
    check_options(fn, options, f"sampler {method!r}", exclude=_CONTRACT_ARGS)
    if guidance is not None:
        denoiser = _apply_guidance(denoiser, guidance)
    if not progress:
        return fn(denoiser, noise, sigmas, generator=generator, callback=callback, cond=cond, **options)
    callback, bar = _progress_callback(callback, len(check_sigmas(sigmas)) - 1)
    try:
        return fn(denoiser, noise, sigmas, generator=generator, callback=callback, cond=cond, **options)
    finally:
        bar.close()
