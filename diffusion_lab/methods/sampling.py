"""How a LightningModule draws samples: the sampler choice of ``diffusion.samplers`` plus guidance strength.

Every method (plain diffusion, distilled students, DSNO teachers) samples through ``generate`` so that the sampler,
step count, sigma grid and classifier-free guidance are chosen in one place and the same way in YAML::

    sampler:
      method: heun                 # any name in diffusion_lab.diffusion.samplers.SAMPLERS
      steps: 18
      schedule: karras             # sigma grid: karras | loglinear | vp | respaced
      schedule_kwargs: {sigma_min: 0.002, sigma_max: 80.0, rho: 7.0}
      options: {}                  # sampler-specific keywords (eta, s_churn, order, ...)
      guidance_w: 0.0              # classifier-free guidance strength w: D_u + (1 + w)(D_c - D_u)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance
from diffusion_lab.diffusion.samplers import SamplerConfig, sample


@dataclass
class GuidedSamplerConfig(SamplerConfig):
    """``SamplerConfig`` plus the classifier-free guidance strength used for conditional samples."""

    guidance_w: float = 0.0

    def with_overrides(self, **kw: Any) -> GuidedSamplerConfig:
        """A copy with the given (non-None) fields replaced. A new ``method`` without new ``options`` starts
        from none: the old method's options (e.g. Langevin's ``step_size``) belong to that method."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if kw.get("method", self.method) != self.method and "options" not in kw:
            kw["options"] = {}
        return replace(self, **kw)


@torch.no_grad()
def generate(
    denoiser: DenoiserFn,
    shape: tuple[int, ...],
    config: GuidedSamplerConfig,
    *,
    labels: Tensor | None = None,
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Callable[[dict], None] | None = None,
    unit_noise: Tensor | None = None,
    progress: bool = False,
    **cond: Tensor,
) -> Tensor:
    """Draw ``shape[0]`` samples: x_T = sigmas[0] * N(0, I), then the configured sampler down to sigma = 0.

    With labels and ``config.guidance_w != 0`` the denoiser is wrapped in classifier-free guidance
    (Ho & Salimans 2022): ``D_w = D_u + (1 + w)(D_c - D_u)`` with the unconditional branch on ``null_label``.
    ``unit_noise`` (standard normal, ``shape``) replaces the initial draw, e.g. to give each sample its own seed.
    """
    sigmas = config.sigmas().to(device=device, dtype=torch.float32)
    if unit_noise is None:
        unit_noise = torch.randn(shape, generator=generator, device=device)
    elif tuple(unit_noise.shape) != tuple(shape):
        raise ValueError(f"unit_noise has shape {tuple(unit_noise.shape)}, expected {tuple(shape)}")
    guidance = None
    if labels is not None:
        cond["labels"] = labels.to(device)
        if getattr(config, "guidance_w", 0.0) != 0.0:
            if null_label is None:
                raise ValueError("classifier-free guidance needs the model's null label")
            guidance = partial(ClassifierFreeGuidance, w=config.guidance_w, null_label=null_label)
    return sample(
        denoiser,
        unit_noise * sigmas[0],
        sigmas,
        method=config.method,
        guidance=guidance,
        generator=generator,
        callback=callback,
        cond=cond,
        progress=progress,
        **config.options,
    )
