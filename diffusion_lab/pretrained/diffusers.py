"""Hugging Face diffusers models from a local folder: UNets as VE-view denoisers, the VAE as a latent codec.

Optional dependency: ``pip install -e '.[diffusers]'``. Nothing is downloaded: folders are opened with
``from_pretrained(folder, local_files_only=True, use_safetensors=True)`` after the weights file has been
checked by :func:`~diffusion_lab.pretrained.safe_load.check_safetensors_file` (pickle ``.bin`` weights are
refused; convert them with ``tools/convert_checkpoint.py`` where you trust them).

* UNet (``UNet2DModel``, ``UNet2DConditionModel``): a discrete-time VP model wrapped by
  :class:`~diffusion_lab.diffusion.discrete.DiscreteEpsDenoiser`; the schedule and prediction type come from
  the pipeline's ``scheduler/scheduler_config.json`` (``epsilon`` / ``v_prediction`` / ``sample``;
  ``linear`` / ``scaled_linear`` / ``squaredcos_cap_v2`` betas). Conditioning: ``labels=`` becomes
  ``class_labels``, ``text_emb=`` becomes ``encoder_hidden_states``.
* VAE (``AutoencoderKL``): Latent Diffusion (Rombach et al. 2022, sec. 3) runs diffusion on
  ``z = s (E(x) - b)`` with the scaling factor ``s`` (0.18215 for Stable Diffusion 1.x) and shift ``b`` of
  the VAE config (0 unless set); :class:`LatentCodec` applies and inverts that map.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.discrete import DiscreteEpsDenoiser
from diffusion_lab.diffusion.schedules import DiscreteVP
from diffusion_lab.pretrained.safe_load import (
    CorruptWeightsError,
    MissingWeightsError,
    check_safetensors_file,
)

INSTALL_HINT = "diffusers is not installed: pip install -e '.[diffusers]' (or pip install diffusers)"
WHERE_UNET = (
    "a diffusers model folder (config.json + diffusion_pytorch_model.safetensors), e.g. "
    "`huggingface-cli download google/ddpm-cifar10-32 --local-dir PATH` on a machine with internet, "
    "or the unet/ folder of a pipeline such as stable-diffusion-v1-5/stable-diffusion-v1-5"
)
WHERE_VAE = (
    "a diffusers AutoencoderKL folder, e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse "
    "--local-dir PATH` on a machine with internet, or the vae/ folder of a Stable Diffusion pipeline"
)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# Project conditioning keywords -> diffusers keyword arguments.
COND_RENAME = {"labels": "class_labels", "text_emb": "encoder_hidden_states"}


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return diffusers


def _model_folder(path: str | os.PathLike, subfolder: str, what: str, where_to_get: str) -> Path:
    """The folder with ``config.json`` and the weights: ``path`` itself or ``path/subfolder`` (pipeline)."""
    root = Path(path).expanduser()
    for folder in (root, root / subfolder):
        if (folder / "config.json").is_file():
            _check_weights(folder, what, where_to_get)
            return folder
    raise MissingWeightsError(
        f"{what}: no diffusers model folder at '{root}' (expected '{root / 'config.json'}' or "
        f"'{root / subfolder / 'config.json'}' with {WEIGHTS_NAME}). Obtain it as {where_to_get}."
    )


def _check_weights(folder: Path, what: str, where_to_get: str) -> None:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():  # sharded checkpoint: check every shard
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            check_safetensors_file(folder / shard, what=what, where_to_get=where_to_get)
        return
    weights = folder / WEIGHTS_NAME
    if not weights.exists() and any(folder.glob("*.bin")):
        raise CorruptWeightsError(
            f"{what}: '{folder}' has only pickle .bin weights, which are not loaded. Convert them where you "
            f"trust them: python tools/convert_checkpoint.py {next(folder.glob('*.bin'))} {weights}"
        )
    check_safetensors_file(weights, what=what, where_to_get=where_to_get)


def _from_pretrained_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """Offline, safetensors only; plain loading (no ``accelerate`` needed); optional dtype."""
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    return kwargs


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """``scheduler_config.json`` of a pipeline folder (``path/scheduler/``, ``path/../scheduler/`` or
    ``path/``), or None if there is none."""
    root = Path(path).expanduser()
    for candidate in (root / "scheduler", root.parent / "scheduler", root):
        config = candidate / "scheduler_config.json"
        if config.is_file():
            return json.loads(config.read_text())
    return None


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> Tensor:
    """``abar_k`` (float64) of a diffusers DDPM/DDIM-style scheduler config."""
    if config.get("trained_betas") is not None:
        return DiscreteVP(betas=torch.as_tensor(config["trained_betas"], dtype=torch.float64)).alphas_cumprod
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _BETA_KIND:
        raise ValueError(f"unsupported beta_schedule {schedule!r}; expected one of {sorted(_BETA_KIND)}")
    return DiscreteVP(
        beta_start=config.get("beta_start", 1e-4),
        beta_end=config.get("beta_end", 0.02),
        num_steps=config.get("num_train_timesteps", 1000),
        kind=_BETA_KIND[schedule],  # type: ignore[arg-type]
    ).alphas_cumprod


def load_diffusers_unet(
    path: str | os.PathLike,
    *,
    scheduler_config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **denoiser_kwargs: Any,
) -> DiscreteEpsDenoiser:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` folder as ``D(x, sigma, labels=, text_emb=)``.

    Args:
        path: the model folder, or a pipeline folder with ``unet/`` (and ``scheduler/``).
        scheduler_config: overrides the folder's ``scheduler_config.json`` (keys ``beta_schedule``,
            ``beta_start``, ``beta_end``, ``num_train_timesteps``, ``prediction_type``, ``variance_type``);
            without either, DDPM's linear 1e-4..0.02 over 1000 steps with eps prediction is assumed.
        denoiser_kwargs: passed to :class:`DiscreteEpsDenoiser` (``clip_denoised``, ``round_timesteps``).
    """
    folder = _model_folder(path, "unet", "diffusers UNet", WHERE_UNET)
    diffusers = _import_diffusers()
    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"'{folder}' holds a {class_name}; expected UNet2DModel or UNet2DConditionModel")
    model = getattr(diffusers, class_name).from_pretrained(folder, **_from_pretrained_kwargs(dtype))
    model = model.to(device).eval()
    sched = dict(scheduler_config or read_scheduler_config(Path(path)) or {})
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ValueError(f"unsupported prediction_type {prediction!r}; expected one of {sorted(_PREDICTION)}")
    learned = sched.get("variance_type") in ("learned", "learned_range")
    return DiscreteEpsDenoiser(
        model,
        alphas_cumprod_from_config(sched),
        prediction=_PREDICTION[prediction],
        learned_sigma=learned,
        cond_rename=COND_RENAME,
        **denoiser_kwargs,
    ).to(device)


class LatentCodec(nn.Module):
    """Image <-> latent map of latent diffusion: ``z = s (E(x) - b)``, ``x = G(z / s + b)``.

    Images are (B, 3, H, W) in [-1, 1]; latents (B, C_z, H/f, W/f). ``sample=True`` in :meth:`encode` draws
    from the posterior ``N(mu, sigma^2)`` instead of returning its mean.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return self.scaling_factor * (latents - self.shift_factor)

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(images))``."""
        return self.decode(self.encode(images))


def load_diffusers_vae(
    path: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LatentCodec:
    """A diffusers ``AutoencoderKL`` folder (or pipeline folder with ``vae/``) as a :class:`LatentCodec`.

    ``scaling_factor`` defaults to the VAE config's (``0.18215`` for Stable Diffusion 1.x).
    """
    folder = _model_folder(path, "vae", "diffusers AutoencoderKL", WHERE_VAE)
    diffusers = _import_diffusers()
    vae = diffusers.AutoencoderKL.from_pretrained(folder, **_from_pretrained_kwargs(dtype))
    vae = vae.to(device).eval()
    scale = scaling_factor if scaling_factor is not None else vae.config.get("scaling_factor", 0.18215)
    shift = vae.config.get("shift_factor", None) or 0.0
    return LatentCodec(vae, scale, shift)


__all__ = [
    "COND_RENAME",
    "LatentCodec",
    "alphas_cumprod_from_config",
    "load_diffusers_unet",
    "load_diffusers_vae",
    "read_scheduler_config",
]
