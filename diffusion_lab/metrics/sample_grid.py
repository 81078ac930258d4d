"""Samples people look at: grids in TensorBoard during training, ``samples.png`` after fit, files from predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image


def image_grid(
    images: Tensor, nrow: int, upscale: int = 1, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """(B, C, H, W) images in ``value_range`` -> one (3, H', W') grid in [0, 1], nearest-upscaled ``upscale`` x."""
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    lo, hi = value_range
    images = ((images.float() - lo) / (hi - lo)).clamp(0, 1)
    if upscale > 1:
        images = F.interpolate(images, scale_factor=upscale, mode="nearest")
    return make_grid(images, nrow=nrow, padding=max(1, upscale), pad_value=1.0)


def save_image_grid(images: Tensor, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    """Write ``image_grid(images, nrow, upscale)`` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(images, nrow, upscale), path)
    return path


def _grid_labels(num_classes: int, per_class: int, device: torch.device) -> Tensor:
    """Labels for a grid with one row per class: 0,0,...,0,1,1,...,1,... (per_class each)."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


class SampleGrid(Callback):
    """Log a sample grid to TensorBoard every ``every_n_epochs`` validations and write ``filename`` after fit.

    Conditional models get one row per class (``samples_per_class`` columns); unconditional models a square of
    ``num_samples``. Samples come from the module's ``generate`` (EMA weights, the configured sampler) with a fixed
    seed, so successive grids show the same noise being denoised better and better.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        samples_per_class: int = 10,
        num_samples: int = 64,
        seed: int = 0,
        upscale: int = 4,
        filename: str = "samples.png",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.samples_per_class = samples_per_class
        self.num_samples = num_samples
        self.seed = seed
        self.upscale = upscale
        self.filename = filename
        self.last_path: Path | None = None

    def make_samples(self, pl_module: L.LightningModule) -> tuple[Tensor, int]:
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        num_classes = getattr(pl_module, "num_classes", 0)
        if num_classes:
            labels = _grid_labels(num_classes, self.samples_per_class, pl_module.device)
            return pl_module.generate(len(labels), labels=labels, generator=generator), self.samples_per_class
        nrow = max(1, int(round(self.num_samples**0.5)))
        return pl_module.generate(self.num_samples, generator=generator), nrow

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.is_global_zero:
            images, nrow = self.make_samples(pl_module)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    grid = image_grid(images, nrow, self.upscale)
                    logger.experiment.add_image("samples", grid, global_step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            images, nrow = self.make_samples(pl_module)
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            self.last_path = save_image_grid(images, log_dir / self.filename, nrow, self.upscale)
            print(f"wrote sample grid {self.last_path}")


class SampleWriter(BasePredictionWriter):
    """Write ``predict`` outputs: ``samples.npz`` (images in [-1, 1], labels, indices) and a ``samples.png`` grid.

    Under DDP each rank writes ``samples_rank{r}.npz``; rank 0 also writes the grid of its own samples.
    """

    def __init__(self, output_dir: str = "predictions", nrow: int = 10, upscale: int = 4) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.nrow = nrow
        self.upscale = upscale

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if not predictions:
            return
        batches = predictions[0] if isinstance(predictions[0], list) else predictions
        samples = torch.cat([b["samples"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        index = torch.cat([b["index"] for b in batches])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        npz = self.output_dir / f"samples{suffix}.npz"
        np.savez(npz, samples=samples.numpy(), labels=labels.numpy(), index=index.numpy())
        if trainer.is_global_zero and samples.ndim == 4:
            png = save_image_grid(samples, self.output_dir / "samples.png", self.nrow, self.upscale)
            print(f"wrote {len(samples)} samples to {npz} and {png}")
