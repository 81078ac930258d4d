"""Pretraining of a few-shot embedding network on the training classes: AMDIM and SimCLR (self-supervised,
labels unused) and a supervised cross-entropy baseline (Chen et al., "Self-supervised learning for few-shot
image classification": SSL pretraining, then ProtoNet fine-tuning in ``fewshot_protonet.py``).

All three train on batches ``(x, labels)`` of the data module's pretraining classes, augment on the batch's
device with kornia (``data/fewshot_augment.py``; a default pipeline when none is configured), and are
validated / tested on frozen-feature episodes (``EpisodicModule``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_lab.data.fewshot_augment import default_augmentation
from diffusion_lab.methods.fewshot_losses import amdim_infomax, nt_xent
from diffusion_lab.methods.fewshot_protonet import EpisodicModule
from diffusion_lab.nets.encoders import embedding_dim


class _Pretraining(EpisodicModule):
    """Shared plumbing: batch unpacking and the (lazily built default) augmentation."""

    def __init__(
        self,
        network: nn.Module,
        augmentation: nn.Module | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        export_path: str | None,
    ) -> None:
        super().__init__(network, None, 1.0, optimizer, lr_scheduler, export_path)
        self.augmentation = augmentation

    def augment(self, x: Tensor) -> Tensor:
        if self.augmentation is None:  # parameter-free kornia modules: safe to build on first use
            self.augmentation = default_augmentation(x.shape[-1], x.shape[1])
        return self.augmentation(x)

    @staticmethod
    def _images(batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, dict):
            raise TypeError("pretraining uses image batches: set the data module's train_mode to 'images'")
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None


class AMDIMPretraining(_Pretraining):
    """AMDIM self-supervised pretraining (Bachman et al. 2019), the objective used by Chen et al.

    Two augmented views per image go through the encoder in one batch; the loss is
    ``amdim_infomax`` (global-to-5x5, global-to-7x7 and 5x5-to-5x5 NCE in both directions, tanh-clipped
    scores, squared-score regulariser).

    Args:
        network: an encoder with ``multiscale(x) -> (global, local5, local7)`` (``nets.encoders.AmdimEncoder``).
        augmentation: batch augmentation (a ``BatchAugment``); ``None`` = ``default_augmentation``.
        clip: tanh clipping value of the scores (20 in Chen et al.'s code).
        reg_weight: weight of the mean squared raw score (4e-2 in Chen et al.'s code).
        gather_negatives: under DDP, take the negatives from the batch of every rank (all-gather with
            gradients, ``methods/fewshot_gather.py``), so the objective does not depend on the number of
            processes; ``False``: each rank's own batch only. No effect on one process.
        optimizer, lr_scheduler, export_path: see ``EpisodicModule``.
    """

    def __init__(
        self,
        network: nn.Module,
        augmentation: nn.Module | None = None,
        clip: float = 20.0,
        reg_weight: float = 4e-2,
        gather_negatives: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_path: str | None = None,
    ) -> None:
        if not callable(getattr(network, "multiscale", None)):
            raise TypeError(
                f"AMDIMPretraining needs a network with multiscale(x) -> (global, local5, local7) feature maps "
                f"(diffusion_lab.nets.encoders.AmdimEncoder); {type(network).__name__} has none"
            )
        if clip <= 0 or reg_weight < 0:
            raise ValueError(f"need clip > 0 and reg_weight >= 0, got clip={clip}, reg_weight={reg_weight}")
        super().__init__(network, augmentation, optimizer, lr_scheduler, export_path)
        self.clip, self.reg_weight = clip, reg_weight
        self.gather_negatives = gather_negatives

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = self._images(batch)
        b = x.shape[0]
        features = self.network.multiscale(torch.cat([self.augment(x), self.augment(x)]))
        (g1, g2), (l5_1, l5_2), (l7_1, l7_2) = (f.split(b) for f in features)
        n_locations = l5_1.shape[-2] * l5_1.shape[-1]
        locations = torch.randint(0, n_locations, (2, b), device=x.device)
        terms = amdim_infomax(
            g1,
            l5_1,
            l7_1,
            g2,
            l5_2,
            l7_2,
            locations[0],
            locations[1],
            self.clip,
            self.reg_weight,
            gather=self.gather_negatives,
        )
        self._check_loss(terms["loss"], batch_idx)
        for name, value in terms.items():
            self.log(
                f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=True, batch_size=b
            )
        return terms["loss"]


class SimCLRPretraining(_Pretraining):
    """SimCLR (Chen et al. 2020): NT-Xent between projections of two augmented views; any embedding network.

    Args:
        network: embedding network with ``out_dim``.
        augmentation: batch augmentation; ``None`` = ``default_augmentation``.
        temperature: NT-Xent temperature (0.5 in SimCLR's CIFAR-10 setting).
        projection_dim, hidden_dim: projection head ``Linear - BN - ReLU - Linear`` (hidden defaults to out_dim);
            the few-shot embedding is taken before it, as in SimCLR.
        gather_negatives: under DDP, negatives from the views of every rank (as ``AMDIMPretraining``).
        optimizer, lr_scheduler, export_path: see ``EpisodicModule``.
    """

    def __init__(
        self,
        network: nn.Module,
        augmentation: nn.Module | None = None,
        temperature: float = 0.5,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        gather_negatives: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_path: str | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(network, augmentation, optimizer, lr_scheduler, export_path)
        dim = embedding_dim(network)
        hidden = hidden_dim or dim
        self.projection = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, projection_dim),
        )
        self.nt_xent_temperature = temperature
        self.gather_negatives = gather_negatives

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = self._images(batch)
        b = x.shape[0]
        z = self.projection(self.network(torch.cat([self.augment(x), self.augment(x)])))
        loss = nt_xent(z[:b], z[b:], self.nt_xent_temperature, gather=self.gather_negatives)
        self._check_loss(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        return loss


class SupervisedPretraining(_Pretraining):
    """Supervised baseline: a linear classifier over the pretraining classes, cross-entropy on augmented images.

    Args:
        network: embedding network with ``out_dim``.
        num_classes: pretraining classes (linked from the data module by the CLI).
        augmentation: batch augmentation; ``None`` = ``default_augmentation`` (pass ``BatchAugment([])`` for none).
        label_smoothing: of the cross-entropy.
        optimizer, lr_scheduler, export_path: see ``EpisodicModule``.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        augmentation: nn.Module | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_path: str | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(network, augmentation, optimizer, lr_scheduler, export_path)
        self.classifier = nn.Linear(embedding_dim(network), num_classes)
        self.label_smoothing = label_smoothing

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = self._images(batch)
        if labels is None:
            raise ValueError("SupervisedPretraining needs labelled batches (x, labels)")
        logits = self.classifier(self.network(self.augment(x)))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self._check_loss(loss, batch_idx)
        b = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log(
            "train/acc",
            (logits.argmax(1) == labels).float().mean(),
            on_step=False,
            on_epoch=True,
            batch_size=b,
        )
        return loss


__all__ = ["AMDIMPretraining", "SimCLRPretraining", "SupervisedPretraining"]
