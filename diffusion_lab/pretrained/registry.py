"""One registry of every pretrained model the project loads: ``load(name, path, **kwargs)``.

Each entry says what the model is, where a user obtains the file, and the config key that conventionally
points at it. Loading never downloads; every file goes through
:mod:`diffusion_lab.pretrained.safe_load` (safetensors or ``torch.load(weights_only=True)``).

Entries (name -> what ``load`` returns; config key):

* ``adm/<preset>`` (diffusion) -> ``DiscreteEpsDenoiser`` ``D(x, sigma, labels=)``; ``diffusion_checkpoint``
* ``adm/<preset>`` (classifier) -> ``NoisyClassifierVE`` ``(x, sigma) -> logits``; ``classifier_checkpoint``
* ``diffusers/unet`` -> ``DiscreteEpsDenoiser``; ``unet_path``
* ``diffusers/vae`` -> ``LatentCodec`` (encode / decode with the scale factor); ``vae_path``
* ``dino/<timm arch>`` -> ``DinoViT`` (per-block keys / queries / values / [CLS]); ``dino_weights_path``
* ``clip/<open_clip arch>`` -> ``ClipEncoder`` (unit image and text embeddings); ``clip_weights_path``
* ``inception/fid`` -> ``FIDInceptionV3``; ``feature_extractor_weights_path``
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from diffusion_lab.pretrained.safe_load import MissingWeightsError

__all__ = ["REGISTRY", "PretrainedEntry", "available", "describe", "load"]


@dataclass(frozen=True)
class PretrainedEntry:
    """A loadable pretrained model: ``loader(path, **kwargs) -> nn.Module``."""

    name: str
    description: str
    where_to_get: str
    config_key: str
    loader: Callable[..., nn.Module]


def _adm(preset: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.guided_diffusion import load_guided_diffusion

    return load_guided_diffusion(preset, path, **kwargs)


def _diffusers_unet(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.diffusers import load_diffusers_unet

    return load_diffusers_unet(path, **kwargs)


def _diffusers_vae(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.diffusers import load_diffusers_vae

    return load_diffusers_vae(path, **kwargs)


def _dino(arch: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.dino import load_dino

    return load_dino(path, arch, **kwargs)


def _clip(arch: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.clip import load_clip

    return load_clip(path, arch, **kwargs)


def _inception(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    from diffusion_lab.pretrained.inception import load_fid_inception

    return load_fid_inception(path, **kwargs)


def _build_registry() -> dict[str, PretrainedEntry]:
    from diffusion_lab.nets.adm import PRESETS, is_classifier_preset
    from diffusion_lab.pretrained import clip, dino, guided_diffusion

    entries: list[PretrainedEntry] = []
    for preset in PRESETS:
        classifier = is_classifier_preset(preset)
        what = (
            "noisy ImageNet classifier for classifier guidance" if classifier else "ImageNet diffusion UNet"
        )
        entries.append(
            PretrainedEntry(
                f"adm/{preset}",
                f"guided-diffusion {preset}: {what} (Dhariwal & Nichol 2021), "
                f"{guided_diffusion.NOISE_SCHEDULE[preset]} betas, 1000 steps",
                guided_diffusion.where_to_get(preset),
                "classifier_checkpoint" if classifier else "diffusion_checkpoint",
                partial(_adm, preset),
            )
        )
    entries += [
        PretrainedEntry(
            "diffusers/unet",
            "diffusers UNet2DModel / UNet2DConditionModel folder as a VE-view denoiser (schedule from "
            "scheduler/scheduler_config.json)",
            "a diffusers model or pipeline folder, e.g. `huggingface-cli download google/ddpm-cifar10-32 "
            "--local-dir PATH`",
            "unet_path",
            _diffusers_unet,
        ),
        PretrainedEntry(
            "diffusers/vae",
            "diffusers AutoencoderKL folder as the latent codec of latent diffusion (with its scale factor)",
            "e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir PATH`",
            "vae_path",
            _diffusers_vae,
        ),
    ]
    for arch in dino.DINO_RELEASE_FILES:
        entries.append(
            PretrainedEntry(
                f"dino/{arch}",
                f"DINO {arch} (timm) with per-block keys / queries / values / [CLS] hooks",
                dino.where_to_get(arch),
                "dino_weights_path",
                partial(_dino, arch),
            )
        )
    for arch in clip.CLIP_HF_REPOS:
        entries.append(
            PretrainedEntry(
                f"clip/{arch}",
                f"OpenAI CLIP {arch} (open_clip, QuickGELU): unit-norm image and text embeddings",
                clip.where_to_get(arch),
                "clip_weights_path",
                partial(_clip, arch),
            )
        )
    entries.append(
        PretrainedEntry(
            "inception/fid",
            "FID InceptionV3 (pt_inception-2015-12-05), the network of FID / IS / KID",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            "feature_extractor_weights_path",
            _inception,
        )
    )
    return {entry.name: entry for entry in entries}


REGISTRY: dict[str, PretrainedEntry] = _build_registry()


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(REGISTRY)


def describe(name: str) -> str:
    """One paragraph for a user: what the entry is, where to get its file, which config key takes it."""
    entry = _entry(name)
    return (
        f"{entry.name}: {entry.description}. Get it from {entry.where_to_get}. Config key: {entry.config_key}"
    )


def require_file(name: str, path: str | os.PathLike, role: str = "") -> None:
    """Fail before any data or model is loaded when the weights of registry entry ``name`` are not at ``path``
    (a file, or a folder for diffusers models); the error names the path and says where to get the weights."""
    if not Path(path).expanduser().exists():
        what = f"{role} weights" if role else f"weights of {name}"
        raise MissingWeightsError(
            f"{what} file '{path}' does not exist (nothing is downloaded). {describe(name)}"
        )


def _entry(name: str) -> PretrainedEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown pretrained model {name!r}; available: {', '.join(available())}")
    return REGISTRY[name]


def load(name: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load the pretrained model ``name`` (see :func:`available`) from the local ``path``; never downloads.

    ``kwargs`` go to the entry's loader (e.g. ``device``, ``use_fp16``, tiny-model ``model_kwargs``).
    Missing files raise :class:`~diffusion_lab.pretrained.safe_load.MissingWeightsError` naming the file and
    where to get it.
    """
    return _entry(name).loader(path, **kwargs)
