"""Wrap a discrete-time N-step model (DDPM, guided-diffusion, diffusers) as a VE-view denoiser.

A discrete VP model was trained on ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` at integer steps
``k = 0..N-1``. In the VE view (Karras et al. 2022, Table 1 "VP"; k-diffusion's ``DiscreteEpsDDPMDenoiser``)
that is ``x = x_k / sqrt(abar_k) = x0 + sigma_k eps`` with ``sigma_k = sqrt((1 - abar_k) / abar_k)``. For any
``sigma`` the wrapper therefore

1. rescales to the model's input ``x_vp = x / sqrt(1 + sigma^2)``,
2. finds the fractional timestep by interpolating ``k`` linearly in ``log sigma`` between the knots
   ``log sigma_k`` (or rounds it: ``round_timesteps=True``), and
3. turns the model's prediction into ``x0_hat``: ``eps`` -> ``x - sigma eps`` (Ho et al. 2020);
   ``v`` -> ``alpha x_vp - sigma_vp v`` (Salimans & Ho 2022); ``x0`` as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import append_dims, broadcast_sigma, eps_to_x0, v_to_x0
from diffusion_lab.diffusion.schedules import DiscreteVP, Spacing, timestep_from_sigma

Prediction = Literal["eps", "v", "x0"]


class DiscreteEpsDenoiser(nn.Module):
    """``D(x, sigma, **cond)`` from a discrete-time model ``model(x_vp, timesteps, **cond)``.

    Args:
        model: called as ``model(x_vp, timesteps, **cond)`` with float timesteps (B,) in ``[0, N-1]``;
            may return a tensor, a tuple (first item used) or an object with ``.sample`` (diffusers).
        alphas_cumprod: (N,) the model's cumulative products ``abar_k``.
        prediction: what the model predicts: ``eps``, ``v`` or ``x0``.
        learned_sigma: the model outputs 2C channels (guided-diffusion ``learn_sigma``); the first C are used.
        clip_denoised: clamp ``x0_hat`` to [-1, 1].
        round_timesteps: feed the nearest integer timestep (as the model was trained) instead of the
            interpolated fractional one.
        cond_rename: keyword renames for the model, e.g. ``{"labels": "y"}`` for guided-diffusion.
    """

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: Tensor,
        prediction: Prediction = "eps",
        learned_sigma: bool = False,
        clip_denoised: bool = False,
        round_timesteps: bool = False,
        cond_rename: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}; expected eps, v or x0")
        self.model = model
        self.schedule = DiscreteVP.from_alphas_cumprod(alphas_cumprod)
        self.prediction = prediction
        self.learned_sigma = learned_sigma
        self.clip_denoised = clip_denoised
        self.round_timesteps = round_timesteps
        self.cond_rename = dict(cond_rename or {})
        # non-persistent: follows .to(device) but stays out of the state_dict of the wrapped model
        self.register_buffer("log_sigmas", self.schedule.log_sigmas, persistent=False)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def sigmas(self) -> Tensor:
        """The model's N discrete VE noise levels, ascending (float64)."""
        return self.schedule.sigmas

    @property
    def sigma_min(self) -> float:
        return float(self.schedule.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.schedule.sigmas[-1])

    def respaced_sigmas(self, n: int, spacing: Spacing = "linspace") -> Tensor:
        """``n`` discrete sigmas at uniformly respaced timesteps (DDIM-style), descending, followed by 0."""
        return self.schedule.respaced_sigmas(n, spacing)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Timestep (B,) fed to the model for VE noise levels ``sigma`` (B,): fractional or rounded."""
        t = timestep_from_sigma(sigma, self.log_sigmas)
        return t.round() if self.round_timesteps else t

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        s = append_dims(sigma, x.ndim)
        x_vp = (x * torch.rsqrt(1 + s**2)).to(x.dtype)
        timesteps = self.timestep(sigma).float()
        cond = {self.cond_rename.get(k, k): v for k, v in cond.items()}
        out = self.model(x_vp, timesteps, **cond)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if self.learned_sigma:
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"learned_sigma=True expects {2 * x.shape[1]} output channels, got {out.shape[1]}"
                )
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match input {tuple(x.shape)}")
        out = out.to(x.dtype)
        if self.prediction == "eps":
            x0 = eps_to_x0(x, out, sigma)
        elif self.prediction == "v":
            x0 = v_to_x0(x, out, sigma)
        else:
            x0 = out
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return x0.to(x.dtype)


__all__ = ["DiscreteEpsDenoiser"]
