"""``SamplerConfig``: the YAML shape of a sampler choice, validated when it is built.

In a config (the DiffusionModule takes it as ``sampler:``)::

    sampler:
      method: heun            # a key of SAMPLERS
      steps: 18               # positive noise levels = sampler steps
      schedule: karras        # a key of SIGMA_SCHEDULES
      schedule_kwargs: {sigma_min: 0.002, sigma_max: 80.0, rho: 7.0}
      options: {s_churn: 0.0} # the sampler's own options (eta, order, snr, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import Callback, Cond, accepted_options, check_options
from diffusion_lab.diffusion.samplers.registry import _CONTRACT_ARGS, get_sampler, sample
from diffusion_lab.diffusion.samplers.sigma_grids import SIGMA_SCHEDULES, get_sigmas


@dataclass
class SamplerConfig:
    """Which sampler, how many steps, which sigma grid; typos fail at construction with the valid names.

    Args:
        method: sampler name (``euler``, ``heun``, ``ddim``, ``dpmpp_2m``, ``plms``, ``lms``, ``ltsp``,
            ``stsp``, ``ddpm``, ``euler_ancestral``, ``annealed_langevin``, ``pc``): a key of ``SAMPLERS``.
        steps: number of positive noise levels (= steps; Heun costs 2 steps - 1 evaluations).
        schedule: sigma grid name (``karras``, ``loglinear``, ``vp``, ``respaced``).
        schedule_kwargs: the grid's arguments; they override the model defaults given to :meth:`sigmas`.
        options: the sampler's own keyword options.
    """

    method: str = "heun"
    steps: int = 18
    schedule: str = "karras"
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(
            get_sampler(self.method), self.options, f"sampler {self.method!r}", exclude=_CONTRACT_ARGS
        )
        if self.schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"unknown sigma schedule {self.schedule!r}; expected one of {', '.join(SIGMA_SCHEDULES)}"
            )
        check_options(
            SIGMA_SCHEDULES[self.schedule], self.schedule_kwargs, f"sigma schedule {self.schedule!r}", ("n",)
        )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")

    def sigmas(self, **model_defaults: Any) -> Tensor:
        """The grid (float64, ends with 0). ``model_defaults`` (e.g. ``sigma_min``/``sigma_max`` of the model,
        ``model_sigmas`` of a discrete model) fill the grid arguments not given in ``schedule_kwargs``;
        defaults the grid does not take are ignored."""
        accepted = accepted_options(SIGMA_SCHEDULES[self.schedule], ("n",))
        kwargs = {k: v for k, v in model_defaults.items() if k in accepted} | self.schedule_kwargs
        return get_sigmas(self.schedule, self.steps, **kwargs)

    def __call__(
        self,
        denoiser: DenoiserFn,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        cond: Cond | None = None,
        guidance: Callable[[DenoiserFn], DenoiserFn] | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        model_defaults: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Draw ``x = sigmas[0] * randn(shape)`` from ``generator`` and run the configured sampler."""
        sigmas = self.sigmas(**dict(model_defaults or {}))
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) * sigmas[0].item()
        return sample(
            denoiser,
            noise,
            sigmas,
            method=self.method,
            guidance=guidance,
            generator=generator,
            callback=callback,
            cond=cond,
            progress=progress,
            **self.options,
        )


__all__ = ["SamplerConfig"]
