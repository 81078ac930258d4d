"""DiffusionModule: train and sample any denoiser (DDPM, NCSN, score SDE, VDM, EDM; STF by swapping the loss).

Thin wiring only: the backbone comes from ``nets/``, the preconditioning from ``diffusion/denoiser.py``, the loss
from ``diffusion/losses.py`` and the samplers from ``diffusion/samplers``. Everything is chosen in YAML.

Class-conditional training drops labels to the null label ``num_classes`` with probability ``label_dropout``, so
the one network learns both ``D(x, sigma, c)`` and ``D(x, sigma, null)`` for classifier-free guidance
(Ho & Salimans 2022). Sampling always uses the EMA weights.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Denoiser, NoiseConditioning, Parametrization
from diffusion_lab.diffusion.hybrid_loss import HybridLoss
from diffusion_lab.diffusion.losses import DenoisingLoss
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.methods.data_shape import DataShapeMixin
from diffusion_lab.methods.distill_text import TEXT_KEY
from diffusion_lab.methods.ema import EMA
from diffusion_lab.methods.lr_schedules import optimizer_with_step_schedule
from diffusion_lab.methods.sampling import GuidedSamplerConfig, generate
from diffusion_lab.reliability.nan_guard import nonfinite_loss, update_skipped


class DiffusionModule(DataShapeMixin, L.LightningModule):
    """Denoising diffusion training with EMA, label dropout and sampling through the sampler suite.

    Args:
        network: backbone ``F(x, c_noise, labels=None, **scalars)`` (e.g. ``nets.unet.UNet``).
        loss: a ``DenoisingLoss`` (sigma distribution + weighting + target; default EDM's) or iDDPM's
            ``HybridLoss`` (needs ``learned_variance``).
        parametrization, sigma_data, noise_conditioning, schedule, time_scale, learned_variance: how ``network``
            becomes a denoiser (see ``diffusion.denoiser.Denoiser``); ``schedule`` maps sigma to the time a
            ``vp_t`` net sees; ``learned_variance``: the network outputs twice the data channels, the second
            half iDDPM's variance (sampler option ``variance: learned``).
        num_classes: number of classes of the data (linked from the DataModule); the null label is ``num_classes``.
        class_conditional: train with labels (False: ignore them and train an unconditional model).
        label_dropout: probability of replacing a label by the null label during training.
        ema_decay: EMA decay of the weights used for sampling.
        sampler: sampler used for validation grids, metrics and ``predict``.
        optimizer, lr_scheduler: injected by LightningCLI (``--optimizer``, ``--lr_scheduler``) or YAML.
        predict_num_samples, predict_batch_size, predict_seed: what ``predict`` draws (per-sample seeds
            ``predict_seed + index``, so results do not depend on batch size or number of devices).
    """

    def __init__(
        self,
        network: nn.Module,
        loss: DenoisingLoss | HybridLoss | None = None,
        parametrization: Parametrization = "edm",
        sigma_data: float = 0.5,
        noise_conditioning: NoiseConditioning = "log_sigma",
        schedule: NoiseSchedule | None = None,
        time_scale: float = 1000.0,
        learned_variance: bool = False,
        num_classes: int = 0,
        class_conditional: bool = True,
        label_dropout: float = 0.1,
        ema_decay: float = 0.999,
        sampler: GuidedSamplerConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        predict_num_samples: int = 100,
        predict_batch_size: int = 100,
        predict_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        # Hyperparameters stay plain data (no pickled classes), so checkpoints load with weights_only=True.
        self.save_hyperparameters(
            ignore=["network", "loss", "optimizer", "lr_scheduler", "schedule", "sampler"]
        )
        self.denoiser = Denoiser(
            network, parametrization, sigma_data, noise_conditioning, schedule, time_scale, learned_variance
        )
        self.loss = loss if loss is not None else DenoisingLoss(sigma_data=sigma_data)
        self.ema = EMA(self.denoiser, decay=ema_decay)
        self.num_classes = num_classes if class_conditional else 0
        self.label_dropout = label_dropout
        self.sampler = sampler if sampler is not None else GuidedSamplerConfig()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.predict_num_samples = predict_num_samples
        self.predict_batch_size = predict_batch_size
        self.predict_seed = predict_seed

    # ------------------------------------------------------------------ conditioning
    @property
    def null_label(self) -> int:
        return self.num_classes

    def _cond(self, labels: Tensor | None, *, dropout: float = 0.0) -> dict[str, Tensor]:
        """Conditioning kwargs for the denoiser; labels replaced by the null label with prob. ``dropout``.

        A floating-point second batch field is a per-sample text embedding (B, E) (``data.distill_latents`` with
        captions): it is passed as ``text_emb=`` and dropout replaces it by the zero vector, the null text of
        ``methods.distill_text`` (classifier-free guidance's unconditional model)."""
        if labels is not None and labels.is_floating_point():
            return {TEXT_KEY: self._text_condition(labels, dropout)}
        if self.num_classes == 0 or labels is None:
            return {}
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}] for num_classes={self.num_classes}, "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        if dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return {"labels": labels}

    @staticmethod
    def _text_condition(text_emb: Tensor, dropout: float) -> Tensor:
        if text_emb.ndim != 2:
            raise ValueError(
                f"a floating-point condition must be text embeddings of shape (batch, dim), got {tuple(text_emb.shape)}"
            )
        if dropout > 0:
            keep = torch.rand(text_emb.shape[0], 1, device=text_emb.device) >= dropout
            text_emb = text_emb * keep.to(text_emb.dtype)
        return text_emb

    @staticmethod
    def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        """Losses that need the data set itself (e.g. the Stable Target Field's reference batches) get it here."""
        if hasattr(self.loss, "setup_reference"):
            self.loss.setup_reference(self.trainer.datamodule)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self._split_batch(batch)
        loss = self.loss(self.denoiser, x0, **self._cond(labels, dropout=self.label_dropout))
        if nonfinite_loss(self, loss):  # the NaNGuard skips this update (without one: FloatingPointError)
            return loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not update_skipped(self):
            self.ema.update(self.denoiser)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Validation loss of the EMA denoiser, with noise drawn from a per-batch seed (comparable across epochs)."""
        x0, labels = self._split_batch(batch)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            loss = self.loss(self.ema.averaged, x0, **self._cond(labels))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        # a loss may own trainable parameters (VDMLoss: the learned noise schedule); they train with the net
        loss_parameters = [p for p in self.loss.parameters() if p.requires_grad]
        return optimizer_with_step_schedule(
            [*self.denoiser.parameters(), *loss_parameters], self.optimizer_factory, self.lr_scheduler_factory
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: GuidedSamplerConfig | dict | None = None,
        data_shape: tuple[int, ...] | None = None,
        unit_noise: Tensor | None = None,
    ) -> Tensor:
        """Draw samples with the EMA denoiser; images in the data range, shape (num_samples, *data_shape)."""
        config = self.sampler if sampler is None else sampler
        if isinstance(config, dict):
            config = self.sampler.with_overrides(**config)
        shape = (num_samples, *(data_shape or self.data_shape))
        if labels is not None and self.num_classes == 0:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return generate(
            self.ema.averaged,
            shape,
            config,
            labels=labels,
            null_label=self.null_label,
            generator=generator,
            device=self.device,
            unit_noise=unit_noise,
        )

    # ------------------------------------------------------------------ predict
    def predict_dataloader(self) -> Any:
        """Sample indices (and labels cycling over classes) for ``predict``; each index is its own seed."""
        index = torch.arange(self.predict_num_samples)
        labels = index % self.num_classes if self.num_classes else torch.zeros_like(index)
        dataset = torch.utils.data.TensorDataset(index, labels)
        return torch.utils.data.DataLoader(dataset, batch_size=self.predict_batch_size, shuffle=False)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Initial noise from each sample's own seed (``predict_seed + index``): deterministic samplers give the
        same image for an index whatever the batch size or device count; stochastic ones draw their extra noise
        from a generator seeded by the batch's first index."""
        index, labels = batch
        unit_noise = torch.stack(
            [
                torch.randn(
                    self.data_shape, generator=torch.Generator().manual_seed(self.predict_seed + int(i))
                )
                for i in index
            ]
        ).to(self.device)
        generator = torch.Generator(self.device).manual_seed(self.predict_seed + int(index[0]))
        samples = self.generate(
            len(index), labels if self.num_classes else None, generator=generator, unit_noise=unit_noise
        )
        return {"index": index, "labels": labels, "samples": samples.float().cpu()}
