"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set: 1,797 images, 10 classes).

Offline and tiny, so a whole diffusion model trains on a CPU in minutes. Pixel values are integers
0..16; they are mapped to [-1, 1] exactly by ``x / 8 - 1``. No random flips: digits are not
flip-invariant.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset, stratified_split

RAW_RESOLUTION = 8


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images (N, 1, 8, 8) float32 = x / 8 - 1, labels (N,) int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 8 - 1
    return images, torch.from_numpy(bunch.target).long()


class Digits(DataModuleBase):
    """DataModule of the 8x8 digits: batches ``(x (B, 1, R, R) in [-1, 1], labels (B,))``.

    Args:
        resolution: output size R >= 8; other than 8 the images are resized with ``resize_mode``.
        resize_mode: ``bilinear`` (``F.interpolate``, ``align_corners=False``; values stay in [-1, 1]) or
            ``nearest`` (each pixel becomes an R/8 x R/8 block when R is a multiple of 8).
        val_fraction: fraction of each class held out for validation (a stratified, seeded split; the
            test loader serves the same split since the set has no separate test part).
        seed: seed of the split.
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.

    Shape properties: ``num_channels = 1``, ``resolution = R``, ``num_classes = 10``.
    After ``setup`` the split is in ``train_indices`` / ``val_indices`` (indices into sklearn's order).
    """

    def __init__(
        self,
        resolution: int = 8,
        resize_mode: Literal["bilinear", "nearest"] = "bilinear",
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if resolution < RAW_RESOLUTION:
            raise ValueError(f"resolution must be >= {RAW_RESOLUTION} (the digits are 8x8), got {resolution}")
        if resize_mode not in ("bilinear", "nearest"):
            raise ValueError(f"resize_mode must be 'bilinear' or 'nearest', got {resize_mode!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self._resolution = resolution
        self.set_shape(1, resolution, 10)
        self.resize_mode = resize_mode
        self.val_fraction, self.seed = val_fraction, seed
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        if self._resolution != RAW_RESOLUTION:
            size = (self._resolution, self._resolution)
            if self.resize_mode == "bilinear":
                images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            else:
                images = F.interpolate(images, size=size, mode="nearest")
        self.train_indices, self.val_indices = stratified_split(labels, self.val_fraction, self.seed)
        self.train_set = TensorImageDataset(images[self.train_indices], labels[self.train_indices])
        self.val_set = TensorImageDataset(images[self.val_indices], labels[self.val_indices])


__all__ = ["Digits", "load_digits_tensors"]
