"""Batch augmentations for self-supervised pretraining, run by kornia on the batch's device.

``BatchAugment`` wraps any list of kornia augmentation modules (each draws its own parameters per image),
so a pipeline is written in YAML as class paths::

    augmentation:
      class_path: diffusion_lab.data.fewshot_augment.BatchAugment
      init_args:
        transforms:
          - class_path: kornia.augmentation.RandomResizedCrop
            init_args: {size: [32, 32], scale: [0.5, 1.0]}
          - class_path: kornia.augmentation.RandomAffine
            init_args: {degrees: 15.0, translate: [0.1, 0.1]}

Images arrive in the data range [-1, 1]; kornia's colour operations expect [0, 1], so the pipeline runs on
``(x + 1) / 2`` and maps the result back.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchAugment(nn.Module):
    """Apply ``transforms`` (kornia augmentation modules) in order to a (B, C, H, W) batch in [-1, 1]."""

    def __init__(self, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.transforms = nn.Sequential(*transforms)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"BatchAugment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        return self.transforms((x + 1) / 2) * 2 - 1


class RandomStrokeWidth(nn.Module):
    """Thicken or thin bright strokes on a dark background by about half a pixel, per image, each with
    probability ``p``.

    Thickening is ``(x + dilate(x)) / 2``, thinning ``(x + erode(x)) / 2`` with 3x3 grey-scale dilation (max
    filter) and erosion (min filter): for an anti-aliased edge this moves the 50% ink level by half a pixel. It
    mimics the stroke-thickness noise of ``data/glyphs.py`` (half-widths vary by about one pixel at 32x32),
    which geometric augmentations cannot produce. Works on any value range.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 0.5:
            raise ValueError(f"p must be in [0, 0.5] (thicken and thin each with p), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        dilated = 0.5 * (x + F.max_pool2d(x, 3, stride=1, padding=1))
        eroded = 0.5 * (x - F.max_pool2d(-x, 3, stride=1, padding=1))
        u = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
        return torch.where(u < self.p, dilated, torch.where(u < 2 * self.p, eroded, x))


def glyph_augmentation(resolution: int, stroke_p: float = 0.25) -> BatchAugment:
    """Augmentations matched to the glyph generator's instance noise: a random affine map (rotation 15 deg,
    scale 0.8-1.15, shear 10 deg, shift 10%), a mild elastic distortion (stroke jitter, alpha 0.25) and
    half-pixel stroke thickening / thinning (``RandomStrokeWidth``); no crop, which can cut strokes off."""
    size = max(3, (resolution // 4) | 1)
    return BatchAugment(
        [
            K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), scale=(0.8, 1.15), shear=10.0, p=1.0),
            K.RandomElasticTransform(
                kernel_size=(size, size), sigma=(size / 3, size / 3), alpha=(0.25, 0.25)
            ),
            RandomStrokeWidth(stroke_p),
        ]
    )


def default_augmentation(resolution: int, channels: int) -> BatchAugment:
    """The SSL pipeline used when none is configured.

    Greyscale (glyphs, digits): random resized crop (scale 0.5-1) and a mild random affine (rotation 15 deg,
    shift 10%, shear 10 deg); no flips, which would change a glyph's identity. Colour (MiniImageNet, CUB):
    AMDIM/SimCLR-style resized crop (scale 0.3-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1;
    p = 0.8) and random greyscale (p = 0.2).
    """
    size = (resolution, resolution)
    if channels == 1:
        return BatchAugment(
            [
                K.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25)),
                K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), shear=10.0, p=0.8),
            ]
        )
    return BatchAugment(
        [
            K.RandomResizedCrop(size, scale=(0.3, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
    )


__all__ = ["BatchAugment", "RandomStrokeWidth", "default_augmentation", "glyph_augmentation"]
