"""Offline loaders of pretrained models (guided-diffusion ADM, diffusers, DINO, CLIP, FID Inception).

``load(name, path)`` is the single entry point (see :mod:`diffusion_lab.pretrained.registry`); every file
is read by :mod:`diffusion_lab.pretrained.safe_load`. The registry is imported on first use so that
``import diffusion_lab.pretrained.safe_load`` stays light.
"""

from __future__ import annotations

from typing import Any

from diffusion_lab.pretrained.safe_load import (
    CorruptWeightsError,
    MissingWeightsError,
    UnsafeWeightsError,
    load_state_dict_file,
)

__all__ = [
    "CorruptWeightsError",
    "MissingWeightsError",
    "UnsafeWeightsError",
    "available",
    "describe",
    "load",
    "load_state_dict_file",
    "require_file",
]


def __getattr__(name: str) -> Any:
    if name in ("load", "available", "describe", "require_file", "REGISTRY"):
        from diffusion_lab.pretrained import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'diffusion_lab.pretrained' has no attribute {name!r}")
