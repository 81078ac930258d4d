"""CIFAR-10 (Krizhevsky 2009) via torchvision: 50,000 train / 10,000 test 32x32 RGB images, 10 classes.

The images are held in memory as uint8 and mapped to [-1, 1] per item (``x / 127.5 - 1``); training
uses random horizontal flips (as in DDPM, Ho et al. 2020, and EDM). The validation and test loaders
serve the official test split (generative metrics such as FID compare against the train statistics).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset


class CIFAR10(DataModuleBase):
    """DataModule of CIFAR-10: batches ``(x (B, 3, 32, 32) in [-1, 1], labels (B,))``.

    Args:
        root: folder holding (or receiving) torchvision's ``cifar-10-batches-py``.
        download: download into ``root`` in ``prepare_data`` when missing (needs internet access).
        random_flip: random horizontal flips of training images.
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.

    Shape properties: ``num_channels = 3``, ``resolution = 32``, ``num_classes = 10``.
    """

    def __init__(
        self,
        root: str = "data_cache/cifar10",
        download: bool = False,
        random_flip: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        self.save_hyperparameters()
        self.root, self.download, self.random_flip = Path(root), download, random_flip
        self.set_shape(3, 32, 10)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        try:
            ds = TorchvisionCIFAR10(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"CIFAR-10 not found (or corrupted) under root={str(self.root)!r} (expected "
                f"{self.root / 'cifar-10-batches-py'}). Set `download: true` in the data config "
                "(needs internet) or copy the extracted python version of CIFAR-10 there."
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

            for train in (True, False):
                TorchvisionCIFAR10(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = TensorImageDataset(*self._load(train=True), random_flip=self.random_flip)
        if self.val_set is None:
            self.val_set = TensorImageDataset(*self._load(train=False))


__all__ = ["CIFAR10"]
