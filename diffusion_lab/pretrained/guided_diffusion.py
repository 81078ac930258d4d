"""openai/guided-diffusion checkpoints (ADM, Dhariwal & Nichol 2021) as VE-view denoisers and classifiers.

A guided-diffusion UNet predicts ``eps`` from ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at integer
timesteps (linear betas 1e-4..0.02 over 1000 steps; the 64x64 model: cosine, Nichol & Dhariwal 2021
eq. 17). :func:`adm_denoiser` wraps it with :class:`~diffusion_lab.diffusion.discrete.DiscreteEpsDenoiser`
as ``D(x, sigma, labels=...)`` in the VE view ``x = x_t / sqrt(abar_t)``, ``sigma = sqrt((1 - abar_t) /
abar_t)``; the learned-variance channels are dropped (ODE samplers need only eps).

:class:`NoisyClassifierVE` adapts the noisy classifier to the same view: ``logits = f(x / sqrt(1 + sigma^2),
t(sigma))``, so ``grad_x log softmax(logits)[y]`` is the classifier-guidance term in VE coordinates
(ADM Algorithm 1 up to the chain rule through ``x_vp = x / sqrt(1 + sigma^2)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import append_dims, broadcast_sigma
from diffusion_lab.diffusion.discrete import DiscreteEpsDenoiser
from diffusion_lab.diffusion.schedules import DiscreteVP, timestep_from_sigma
from diffusion_lab.nets.adm import PRESETS, ADMClassifier, ADMUNet, from_preset, is_classifier_preset
from diffusion_lab.pretrained.safe_load import load_state_dict_file

DOWNLOAD_ROOT = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"
# Noise schedule each checkpoint was trained with (a classifier shares its diffusion model's schedule).
NOISE_SCHEDULE = {
    "64x64_diffusion": "cosine",
    "64x64_classifier": "cosine",
    "128x128_diffusion": "linear",
    "128x128_classifier": "linear",
    "256x256_diffusion": "linear",
    "256x256_diffusion_uncond": "linear",
    "256x256_classifier": "linear",
}


def where_to_get(preset: str) -> str:
    """Download address of a public guided-diffusion checkpoint (the guided-diffusion README's links)."""
    return f"{DOWNLOAD_ROOT}/{preset}.pt (listed in the openai/guided-diffusion README)"


def adm_alphas_cumprod(noise_schedule: str = "linear", num_steps: int = 1000) -> Tensor:
    """``abar_k`` (float64, (N,)) of guided-diffusion's named schedules (``linear`` scales its 1e-4..0.02
    range by 1000 / N, as guided-diffusion does for N != 1000)."""
    scale = 1000 / num_steps
    if noise_schedule not in ("linear", "cosine"):
        raise ValueError(
            f"unknown guided-diffusion noise_schedule {noise_schedule!r}; expected linear or cosine"
        )
    schedule = DiscreteVP(
        beta_start=scale * 1e-4, beta_end=scale * 0.02, num_steps=num_steps, kind=noise_schedule
    )
    return schedule.alphas_cumprod


def adm_denoiser(
    model: ADMUNet, noise_schedule: str = "linear", num_steps: int = 1000, **kwargs: object
) -> DiscreteEpsDenoiser:
    """Wrap an eps-predicting :class:`ADMUNet` as ``D(x, sigma, labels=...)``, learned-sigma channels dropped.

    ``kwargs`` go to :class:`DiscreteEpsDenoiser` (``clip_denoised``, ``round_timesteps``).
    """
    return DiscreteEpsDenoiser(
        model,
        adm_alphas_cumprod(noise_schedule, num_steps),
        prediction="eps",
        learned_sigma=model.out_channels == 2 * model.in_channels,
        cond_rename={"labels": "y"},
        **kwargs,  # type: ignore[arg-type]
    )


class NoisyClassifierVE(nn.Module):
    """A noisy classifier ``f(x_t, t)`` of a discrete VP process in the VE view: ``(x, sigma) -> logits``.

    ``x_t = x / sqrt(1 + sigma^2)`` and ``t`` is the (fractional) timestep of ``sigma`` on the classifier's
    schedule, interpolated in log-sigma exactly as :class:`DiscreteEpsDenoiser` does for the UNet.
    """

    def __init__(self, classifier: nn.Module, alphas_cumprod: Tensor, round_timesteps: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.round_timesteps = round_timesteps
        log_sigmas = DiscreteVP.from_alphas_cumprod(alphas_cumprod).log_sigmas
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """(B, C, H, W) VE input, scalar or (B,) sigma -> (B, num_classes) logits."""
        sigma = broadcast_sigma(sigma, x)
        x_vp = (x * torch.rsqrt(1 + append_dims(sigma, x.ndim) ** 2)).to(x.dtype)
        t = timestep_from_sigma(sigma, self.log_sigmas)
        return self.classifier(x_vp, (t.round() if self.round_timesteps else t).float())

    def log_prob(self, x: Tensor, sigma: Tensor | float, labels: Tensor) -> Tensor:
        """``log p(labels | x, sigma)`` per sample (B,), differentiable in ``x`` for classifier guidance."""
        logits = self(x, sigma)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float16 logits -> float32
        return torch.log_softmax(logits, dim=-1).gather(1, labels.reshape(-1, 1)).squeeze(1)


def load_adm_network(
    preset: str,
    path: str | os.PathLike,
    *,
    use_fp16: bool = False,
    device: torch.device | str = "cpu",
    **flag_overrides: object,
) -> ADMUNet | ADMClassifier:
    """Build the network of ``preset`` and load a guided-diffusion checkpoint into it strictly.

    The network is built on the meta device and the file's tensors are assigned to it (no double allocation
    of the ~550M-parameter 256x256 models). ``use_fp16`` casts the torso to float16 afterwards (GPU only).
    ``flag_overrides`` change published flags (e.g. ``num_channels`` for a model fine-tuned at another width).
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown guided-diffusion checkpoint {preset!r}; available: {sorted(PRESETS)}")
    state = load_state_dict_file(path, what=f"guided-diffusion {preset}", where_to_get=where_to_get(preset))
    fp16_flag = "classifier_use_fp16" if is_classifier_preset(preset) else "use_fp16"
    model = from_preset(preset, device="meta", **{**flag_overrides, fp16_flag: False})
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        missing = sorted(set(model.state_dict()) - set(state))[:5]
        unexpected = sorted(set(state) - set(model.state_dict()))[:5]
        raise ValueError(
            f"'{Path(path)}' does not match the guided-diffusion preset {preset!r} (missing keys {missing}, "
            f"unexpected keys {unexpected}; see the error above for shape mismatches). Is it the file "
            f"{preset}.pt from {DOWNLOAD_ROOT}?"
        ) from err
    model = model.to(device).eval()
    if use_fp16:
        model.convert_to_fp16()
    return model


def load_guided_diffusion(
    preset: str,
    path: str | os.PathLike,
    *,
    use_fp16: bool = False,
    device: torch.device | str = "cpu",
    flag_overrides: Mapping[str, Any] | None = None,
    **denoiser_kwargs: Any,
) -> DiscreteEpsDenoiser | NoisyClassifierVE:
    """A public guided-diffusion checkpoint, ready to use: a denoiser (UNet presets) or a VE classifier.

    The raw network is ``.model`` (denoiser) or ``.classifier`` (classifier). ``flag_overrides`` change
    published flags (see :func:`load_adm_network`); ``denoiser_kwargs`` go to :class:`DiscreteEpsDenoiser`.
    """
    net = load_adm_network(preset, path, use_fp16=use_fp16, device=device, **dict(flag_overrides or {}))
    schedule = NOISE_SCHEDULE.get(preset, "linear")
    if isinstance(net, ADMClassifier):
        return NoisyClassifierVE(net, adm_alphas_cumprod(schedule)).to(device)
    return adm_denoiser(net, schedule, **denoiser_kwargs).to(device)


__all__ = [
    "NOISE_SCHEDULE",
    "NoisyClassifierVE",
    "adm_alphas_cumprod",
    "adm_denoiser",
    "load_adm_network",
    "load_guided_diffusion",
    "where_to_get",
]
