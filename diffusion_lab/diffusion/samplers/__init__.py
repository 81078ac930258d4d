"""The sampler suite: one function per sampler over the denoiser contract, plus a name-based dispatcher.

Contract of every ``sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, **opts)``:

* ``denoiser(x, sigma_batch, **cond) -> x0_hat`` in the VE view ``x = x0 + sigma eps``;
* ``x`` (B, ...) is the initial noise already scaled by ``sigmas[0]`` (``x = sigma_max * randn``);
* ``sigmas`` is a strictly decreasing 1-D tensor ending with 0; the sampler returns x0 at ``sigmas[-1] = 0``;
* ``cond`` is a dict of conditioning keywords passed to every denoiser call (``labels=``, ``guidance_w=``);
* ``callback(dict(i, x, sigma, sigma_next, denoised))`` runs once per step with the state ``x`` at
  ``sigmas[i]`` before the step (progress bars; trajectories for DSNO are these states plus the output);
* ``generator`` makes stochastic samplers reproducible; deterministic ones ignore it.

Bad input raises ValueError naming the bad value. Samplers do not change the autograd mode: call them
under ``torch.no_grad()`` for inference (guidance wrappers enable gradients where they need them).
"""

from __future__ import annotations

from diffusion_lab.diffusion.samplers._base import ancestral_levels, check_sigmas, ddim_step
from diffusion_lab.diffusion.samplers.ancestral import (
    ddpm_levels,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
)
from diffusion_lab.diffusion.samplers.config import SamplerConfig
from diffusion_lab.diffusion.samplers.distilled import distilled_levels, sample_distilled_stochastic
from diffusion_lab.diffusion.samplers.langevin import langevin_update, sample_annealed_langevin, sample_pc
from diffusion_lab.diffusion.samplers.multistep import (
    AB_COEFFICIENTS,
    linear_combination,
    lms_coefficients,
    plms_step,
    rk4_step,
    sample_lms,
    sample_plms,
)
from diffusion_lab.diffusion.samplers.ode import sample_dpmpp_2m, sample_heun
from diffusion_lab.diffusion.samplers.registry import (
    ODE_SAMPLERS,
    SAMPLERS,
    SDE_SAMPLERS,
    get_sampler,
    sample,
    sampler_options,
)
from diffusion_lab.diffusion.samplers.sigma_grids import (
    SIGMA_SCHEDULES,
    get_sigmas,
    karras_sigmas,
    loglinear_sigmas,
    respaced_sigmas,
    vp_sigmas,
)
from diffusion_lab.diffusion.samplers.split import sample_ltsp, sample_stsp, split_guided_denoiser

__all__ = [
    "SAMPLERS",
    "ODE_SAMPLERS",
    "SDE_SAMPLERS",
    "SIGMA_SCHEDULES",
    "SamplerConfig",
    "sample",
    "get_sampler",
    "sampler_options",
    "sample_euler",
    "sample_heun",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_plms",
    "sample_lms",
    "sample_ddpm",
    "sample_euler_ancestral",
    "sample_annealed_langevin",
    "sample_pc",
    "sample_distilled_stochastic",
    "distilled_levels",
    "sample_ltsp",
    "sample_stsp",
    "split_guided_denoiser",
    "ddim_step",
    "ancestral_levels",
    "ddpm_levels",
    "plms_step",
    "AB_COEFFICIENTS",
    "linear_combination",
    "lms_coefficients",
    "rk4_step",
    "langevin_update",
    "check_sigmas",
    "get_sigmas",
    "karras_sigmas",
    "loglinear_sigmas",
    "vp_sigmas",
    "respaced_sigmas",
]
