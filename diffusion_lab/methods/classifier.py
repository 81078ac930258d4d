"""Noise-aware classifier ``p(c | x, sigma)`` for classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1).

Trained with cross-entropy on noisy inputs ``x = x0 + sigma eps`` (VE view) with ``sigma`` drawn from a
``losses.SigmaSampler`` (default EDM's log-normal, the distribution the diffusion model itself saw), for any
DataModule of the zoo that yields ``(images, labels)``. The network is any ``net(x_in, t) -> logits`` (default
a small guided-diffusion ``ADMClassifier``, the architecture of the public ImageNet noisy classifiers) fed
EDM's preconditioned input ``x_in = x / sqrt(sigma^2 + sigma_data^2)`` and ``t = 250 ln sigma`` (EDM's
``c_noise = ln(sigma) / 4`` on a 0..1000-like scale, as ADM's timestep embedding expects).

``forward(x, sigma) -> logits`` is the VE-view classifier that
:class:`~diffusion_lab.diffusion.guidance.ClassifierGuidance` takes; the public ADM 256x256 classifier in the
same form is ``pretrained.guided_diffusion.load_guided_diffusion("256x256_classifier", path)``. Validation logs
the accuracy at fixed noise levels (``val/acc_sigma_<s>``) and their mean (``val/acc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import append_dims, broadcast_sigma
from diffusion_lab.diffusion.losses import LogNormalSigma, SigmaSampler
from diffusion_lab.methods.lr_schedules import optimizer_with_step_schedule


class NoiseAwareClassifier(L.LightningModule):
    """Classifier of noisy images across noise levels, for classifier guidance.

    Args:
        network: ``net(x_in, t) -> (B, num_classes)`` logits (e.g. ``nets.adm.ADMClassifier``).
        num_classes: number of classes (linked from the DataModule); the network's output size must match.
        sigma_data: data standard deviation of the input scaling ``1 / sqrt(sigma^2 + sigma_data^2)``.
        sigma_sampler: training noise levels (default log-normal, ln sigma ~ N(-1.2, 1.2^2)).
        val_sigmas: noise levels at which validation accuracy is measured.
        optimizer, lr_scheduler: injected by LightningCLI or YAML.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 10,
        sigma_data: float = 0.5,
        sigma_sampler: SigmaSampler | None = None,
        val_sigmas: Sequence[float] = (0.0, 0.2, 0.5, 1.0, 2.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if any(s < 0 for s in val_sigmas):
            raise ValueError(f"val_sigmas must be >= 0, got {list(val_sigmas)}")
        self.save_hyperparameters(ignore=["network", "sigma_sampler", "optimizer", "lr_scheduler"])
        self.network = network
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else LogNormalSigma()
        self.val_sigmas = [float(s) for s in val_sigmas]
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """(B, ...) VE input ``x0 + sigma eps``, scalar or (B,) sigma -> (B, num_classes) logits."""
        sigma = broadcast_sigma(sigma, x)
        x_in = x * torch.rsqrt(append_dims(sigma, x.ndim) ** 2 + self.sigma_data**2)
        t = 250.0 * torch.log(sigma.clamp_min(1e-4))  # sigma = 0 (clean images) embedded as 1e-4
        logits = self.network(x_in, t.to(x.dtype))
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the network returns {logits.shape[-1]} logits but num_classes={self.num_classes}: set the "
                "network's output size (ADMClassifier: out_channels) to the number of classes"
            )
        return logits

    def _noisy(self, x0: Tensor, sigma: Tensor) -> Tensor:
        return x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = batch[0], batch[1]
        sigma = self.sigma_sampler(x0.shape[0], device=x0.device).to(x0.dtype)
        logits = self(self._noisy(x0, sigma), sigma)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x0.shape[0])
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accuracy at each of ``val_sigmas``, with noise from a per-batch seed (comparable across epochs)."""
        x0, labels = batch[0], batch[1]
        devices = [x0.device] if x0.device.type == "cuda" else []
        accs = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            for s in self.val_sigmas:
                sigma = torch.full((x0.shape[0],), s, device=x0.device, dtype=x0.dtype)
                acc = (self(self._noisy(x0, sigma), sigma).argmax(-1) == labels).float().mean()
                self.log(f"val/acc_sigma_{s:g}", acc, sync_dist=True, batch_size=x0.shape[0])
                accs.append(acc)
        self.log("val/acc", torch.stack(accs).mean(), prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        return optimizer_with_step_schedule(
            self.network.parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )


__all__ = ["NoiseAwareClassifier"]
