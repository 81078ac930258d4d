"""A small RGB diffusion prior trained by the project on scikit-image's bundled photographs, cached.

``rgb_prior()`` is the unconditional EDM model of configs/diffusion/skimage_rgb.yaml (32x32 crops of
``astronaut``, ``chelsea``, ``coffee``, ... from :mod:`diffusion_lab.data.skimage_patches`). The first call
trains it through the real CLI (400 steps at batch 16, about 5 minutes of one CPU core) into
``benchmarks/.cache/rgb_prior/``; later calls load the checkpoint. Its quality is modest (blurry samples with
plausible colours); it exists so that DiffuseIT and colourisation run on real images with a model of this
project. ``heldout_crops(n)`` gives validation crops, cut from the strip of each photograph that training
never sees. Delete the cache folder to retrain.
"""

from __future__ import annotations

import torch

from benchmarks._models import REPO, train_cached
from diffusion_lab.methods.loading import build_from_config, load_module

CONFIG = REPO / "configs" / "diffusion" / "skimage_rgb.yaml"


def rgb_prior(name: str = "rgb_prior", overrides: list[str] = ()):
    """The trained skimage RGB ``DiffusionModule`` (EMA weights in ``.ema.averaged``), eval mode, CPU.

    ``overrides`` (CLI style) change the training run, e.g. ``["--trainer.max_steps=2"]`` for a smoke test;
    give such a run its own cache ``name``."""
    checkpoint = train_cached(name, [CONFIG], overrides)
    return load_module(CONFIG, checkpoint)


def heldout_crops(n: int | None = None) -> torch.Tensor:
    """The first ``n`` validation crops (N, 3, 32, 32) in [-1, 1] of the prior's DataModule (held-out strip)."""
    _, datamodule = build_from_config(CONFIG)
    datamodule.setup("validate")
    images = torch.stack([datamodule.val_set[i][0] for i in range(len(datamodule.val_set))])
    return images if n is None else images[:n]
