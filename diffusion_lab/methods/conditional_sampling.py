"""Guided restoration and classifier-guided generation with a trained prior (predict only).

The conditional tasks of Wizadwongsa & Suwajanakorn (ICLR 2023, Sec. 6) run with the same splitting samplers as
classifier guidance. Guided sampling is the VE probability-flow ODE ``dx/dsigma = f + g`` with the unguided part
``f = (x - D(x, sigma)) / sigma`` of the prior and a guidance term ``g`` (``diffusion.guidance``):

* restoration (``colorization`` / ``inpainting`` / ``super_resolution``): ``L(x0_hat) = 1/2 ||A(D(x)) - y||^2`` with
  ``y = A(input)`` (``diffusion.conditions``), ``g = s sigma J_D^T A^T (A D - y)`` (:class:`LossGuidance`);
* ``classifier``: ``g = -s sigma grad_x log p(c | x, sigma)`` (:class:`ClassifierGuidance`) with ``c`` the label of
  each input image and a noise-aware classifier (``methods.classifier``).

``ltsp`` / ``stsp`` integrate ``f`` with PLMS and ``g`` with Euler (``diffusion.samplers.split``); any other
sampler of the suite (``ddim``, ``plms``, ...) integrates the guided denoiser ``D + delta`` as one ODE.

The prior (and classifier) are built from their YAML config and checkpoint at ``setup`` through
``methods.loading.load_module`` (so a config instantiates before the checkpoint exists; a missing file fails there
naming it). Inputs are a split of the run's DataModule (digits, any ``ImageFolder``) or :class:`ImageInputs`, a
folder read only at ``setup``. Each sample has its own noise seed ``seed + index`` (results do not depend on the
batch size). Written under ``output_dir``: ``result_<index>.png``, ``grid.png`` (rows: input | condition |
result; also to TensorBoard) and ``results.npz`` (``inputs``, ``conditions``, ``results``, ``labels``, ``indices``
on the [-1, 1] scale).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from diffusion_lab.data.base import DataModuleBase
from diffusion_lab.diffusion.conditions import CONDITIONS, ConsistencyLoss, box_mask
from diffusion_lab.diffusion.guidance import ClassifierGuidance, LossGuidance
from diffusion_lab.diffusion.samplers import SamplerConfig, sample

Task = Literal["colorization", "inpainting", "super_resolution", "classifier"]
TASKS = (*CONDITIONS, "classifier")


class ImageInputs(DataModuleBase):
    """A folder of input images (``data.image_folder.ImageFolder`` preprocessing), scanned only at ``setup``.

    Every image is in the ``val`` split (what ``predict`` reads); no flips. Lets a predict config name a folder
    that does not exist yet: a missing or empty folder fails at ``setup`` naming it.
    """

    def __init__(
        self,
        root: str,
        resolution: int,
        channels: Literal[1, 3] = 3,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if channels not in (1, 3) or resolution < 1:
            raise ValueError(f"need channels 1 or 3 and resolution >= 1, got {channels} and {resolution}")
        self.root, self._resolution, self._channels = root, resolution, channels

    @property
    def num_channels(self) -> int:
        return self._channels

    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def num_classes(self) -> int:
        return 0

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from diffusion_lab.data.image_folder import ImageFolder

        folder = ImageFolder(self.root, self._resolution, self._channels, random_flip=False)
        folder.setup(stage)
        self.val_set = folder.train_set  # val_fraction 0: every image


class _Indexed(Dataset):
    """``(image, label, index)`` items of an ``(image, label)`` or image dataset (index: position in the split)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        item = self.dataset[index]
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        return image, torch.as_tensor(label, dtype=torch.long), index


def prior_denoiser(module: nn.Module) -> nn.Module:
    """The denoiser of a loaded module: EMA weights of a ``DiffusionModule``, else ``.denoiser``, else itself."""
    ema = getattr(module, "ema", None)
    if ema is not None and hasattr(ema, "averaged"):
        return ema.averaged
    return getattr(module, "denoiser", module)


def _load(kind: str, config: str | None, checkpoint: str | None, overrides: Sequence[str]) -> nn.Module:
    if config is None or checkpoint is None:
        raise ValueError(
            f"the {kind} needs {kind}_config and {kind}_checkpoint (or an already built {kind}=)"
        )
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(
            f"{kind} checkpoint {str(checkpoint)!r} does not exist; train it with "
            f"`diffusion-lab fit --config {config}` and pass --model.init_args.{kind}_checkpoint=PATH"
        )
    from diffusion_lab.methods.loading import load_module

    return load_module(config, checkpoint, overrides)


class ConditionalSampling(L.LightningModule):
    """Predict-only: restore (or class-guide) each input image with a pretrained prior and a guided sampler.

    Args:
        task: ``colorization`` | ``inpainting`` | ``super_resolution`` | ``classifier``.
        prior_config, prior_checkpoint, prior_overrides: the prior's YAML, checkpoint (Lightning or safetensors)
            and command-line style overrides of that YAML; loaded at ``setup``.
        classifier_config, classifier_checkpoint, classifier_overrides: the noise-aware classifier (task
            ``classifier``), ``(x, sigma) -> logits``.
        sampler: method (``stsp``, ``ltsp``, or a baseline such as ``ddim``), steps, sigma grid, options.
        scale: guidance scale ``s``.
        mask_box: inpainting hole ``(top, left, height, width)`` as fractions of the image (``conditions.box_mask``).
        mask_path: inpainting mask image instead (white = known pixel, black = hole; resized to the input size).
        factor: super-resolution downsampling factor.
        split: DataModule split read by ``predict`` (``val``; ``train``, ``test``).
        max_images: read at most this many images of the split (None: all).
        predict_batch_size: predict batch size.
        output_dir: where result PNGs, ``grid.png`` and ``results.npz`` go (None: nothing written).
        grid_images, grid_upscale: rows of the grid and its nearest-neighbour upscaling.
        seed: per-sample noise seeds are ``seed + index``.
        prior, classifier: an already built denoiser / ``(x, sigma) -> logits`` callable (Python use and tests);
            they replace the config + checkpoint pairs.
    """

    def __init__(
        self,
        task: Task = "inpainting",
        prior_config: str | None = None,
        prior_checkpoint: str | None = None,
        prior_overrides: Sequence[str] = (),
        classifier_config: str | None = None,
        classifier_checkpoint: str | None = None,
        classifier_overrides: Sequence[str] = (),
        sampler: SamplerConfig | None = None,
        scale: float = 1.0,
        mask_box: Sequence[float] = (0.25, 0.25, 0.5, 0.5),
        mask_path: str | None = None,
        factor: int = 2,
        split: Literal["train", "val", "test"] = "val",
        max_images: int | None = None,
        predict_batch_size: int = 16,
        output_dir: str | None = "outputs/split",
        grid_images: int = 16,
        grid_upscale: int = 4,
        seed: int = 0,
        prior: nn.Module | None = None,
        classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if prior is None and (prior_config is None or prior_checkpoint is None):
            raise ValueError(
                "give the prior as prior_config + prior_checkpoint, or as an already built prior="
            )
        if (
            task == "classifier"
            and classifier is None
            and (classifier_config is None or classifier_checkpoint is None)
        ):
            raise ValueError(
                "task 'classifier' needs classifier_config + classifier_checkpoint (or an already built classifier=)"
            )
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if (
            predict_batch_size < 1
            or grid_images < 0
            or grid_upscale < 1
            or (max_images is not None and max_images < 1)
        ):
            raise ValueError(
                f"need predict_batch_size >= 1, grid_images >= 0, grid_upscale >= 1, max_images >= 1 or None; got "
                f"{predict_batch_size}, {grid_images}, {grid_upscale}, {max_images}"
            )
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"scale must be a number >= 0, got {scale!r}")
        self.save_hyperparameters(ignore=["prior", "classifier", "sampler"])
        self.task, self.scale, self.seed = task, float(scale), seed
        self.prior_spec = (prior_config, prior_checkpoint, list(prior_overrides))
        self.classifier_spec = (classifier_config, classifier_checkpoint, list(classifier_overrides))
        self.prior, self.classifier = prior, classifier
        self.sampler = sampler if sampler is not None else SamplerConfig(method="stsp", steps=20)
        self.mask_box, self.mask_path, self.factor = tuple(mask_box), mask_path, factor
        box_mask((8, 8), self.mask_box)  # validate the task's options now (the mask file is read per batch)
        if task == "super_resolution":
            CONDITIONS["super_resolution"](factor=factor)
        self.split, self.max_images, self.predict_batch_size = split, max_images, predict_batch_size
        self.output_dir = Path(output_dir) if output_dir else None
        self.grid_images, self.grid_upscale = grid_images, grid_upscale
        self._kept: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ models and data
    def setup(self, stage: str) -> None:
        if self.prior is None:
            self.prior = prior_denoiser(_load("prior", *self.prior_spec))
        self.prior.eval().requires_grad_(False)
        if self.task == "classifier":
            if self.classifier is None:
                self.classifier = _load("classifier", *self.classifier_spec)
            if isinstance(self.classifier, nn.Module):  # guidance differentiates w.r.t. the input only
                self.classifier.eval().requires_grad_(False)

    def configure_optimizers(self) -> None:
        raise RuntimeError(
            "ConditionalSampling is predict only: it uses a pretrained prior and trains nothing"
        )

    def predict_dataloader(self) -> DataLoader:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise RuntimeError("ConditionalSampling.predict needs a DataModule with the input images")
        dataset = getattr(datamodule, f"{self.split}_set", None)
        if dataset is None:
            raise RuntimeError(f"{type(datamodule).__name__} has no {self.split!r} split after setup")
        if self.max_images is not None and self.max_images < len(dataset):
            dataset = Subset(dataset, range(self.max_images))
        return DataLoader(_Indexed(dataset), batch_size=self.predict_batch_size, shuffle=False)

    # ------------------------------------------------------------------ conditioning and sampling
    def _mask(self, images: Tensor) -> Tensor | None:
        if self.mask_path is None:
            return None
        from PIL import Image

        path = Path(self.mask_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"inpainting mask {str(path)!r} does not exist (white = known, black = hole)"
            )
        with Image.open(path) as im:
            im = im.convert("L").resize(tuple(images.shape[-1:-3:-1]), Image.Resampling.NEAREST)
            mask = torch.from_numpy(np.asarray(im) >= 128).float()
        return mask[None, None]

    def condition(self, images: Tensor) -> ConsistencyLoss | None:
        """The task's consistency loss bound to ``images`` (None for classifier guidance)."""
        if self.task == "classifier":
            return None
        if self.task == "inpainting":
            loss = CONDITIONS["inpainting"](mask=self._mask(images), box=self.mask_box)
        elif self.task == "super_resolution":
            loss = CONDITIONS["super_resolution"](factor=self.factor)
        else:
            loss = CONDITIONS["colorization"]()
        return loss.bind(images)

    def restore(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(result, condition image) for a batch on the [-1, 1] scale.

        Runs outside inference mode (Lightning's predict loop uses it) because guidance differentiates through the
        prior or the classifier; the inputs are cloned into normal tensors for that.
        """
        with torch.inference_mode(False), torch.no_grad():
            images, labels = images.clone(), labels.clone()
            sigmas = self.sampler.sigmas().to(images.device, torch.float32)
            noise = torch.stack(
                [
                    torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(self.seed + int(i)))
                    for i in index.tolist()
                ]
            ).to(images)
            loss, cond = self.condition(images), {}
            if loss is None:
                if (labels < 0).any():
                    raise ValueError(
                        "classifier guidance needs labelled inputs (the class of each image is the target)"
                    )
                guidance, cond, shown = (
                    partial(ClassifierGuidance, classifier=self.classifier, scale=self.scale),
                    {"labels": labels},
                    images,
                )
            else:
                guidance, shown = partial(LossGuidance, loss_fn=loss, scale=self.scale), loss.degraded()
            out = sample(
                self.prior,
                noise * sigmas[0],
                sigmas,
                method=self.sampler.method,
                guidance=guidance,
                cond=cond,
                **self.sampler.options,
            )
        return out, shown

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = torch.full((images.shape[0],), -1) if labels is None else labels
        return self.restore(images, labels, torch.arange(images.shape[0]))[0]

    # ------------------------------------------------------------------ predict and outputs
    def on_predict_start(self) -> None:
        self._kept = {k: [] for k in ("inputs", "conditions", "results", "labels", "indices")}
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images, labels, index = batch
        out, shown = self.restore(images, labels, index)
        result = {
            "inputs": images.float().cpu(),
            "conditions": shown.float().cpu(),
            "results": out.float().cpu(),
            "labels": labels.cpu(),
            "indices": index.cpu(),
        }
        for key, value in result.items():
            self._kept[key].append(value)
        if self.output_dir is not None:
            from torchvision.utils import save_image

            for image, i in zip(result["results"], index.tolist()):
                save_image((image.clamp(-1, 1) + 1) / 2, self.output_dir / f"result_{i:05d}.png")
        return result

    def on_predict_end(self) -> None:
        if not self._kept.get("results"):
            return
        kept = {k: torch.cat(v) for k, v in self._kept.items()}
        n = min(self.grid_images, len(kept["results"]))
        grid = None
        if n:
            rows = [
                torch.cat([kept[k][i] for k in ("inputs", "conditions", "results")], -1) for i in range(n)
            ]
            grid = ((torch.cat(rows, -2).clamp(-1, 1) + 1) / 2).repeat_interleave(self.grid_upscale, -1)
            grid = grid.repeat_interleave(self.grid_upscale, -2)
            experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"predict/{self.task}/input_condition_result", grid, self.global_step)
        if self.output_dir is None:
            return
        rank = f"_rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        if grid is not None:
            from torchvision.utils import save_image

            save_image(grid, self.output_dir / f"grid{rank}.png")
        np.savez(self.output_dir / f"results{rank}.npz", **{k: v.numpy() for k, v in kept.items()})


__all__ = ["ConditionalSampling", "ImageInputs", "prior_denoiser", "TASKS"]
