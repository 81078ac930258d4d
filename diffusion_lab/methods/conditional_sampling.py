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

The prior and the classifier are YAML-selectable :class:`ModelSource` objects loaded at ``setup`` (so a config
instantiates before the weights exist; every missing file fails there, naming it, before any model loads):
:class:`TrainedModel` (this project's YAML config + checkpoint, ``methods.loading.load_module``; the noise-aware
classifier of ``methods.classifier``) or :class:`PretrainedModel` (an entry of the pretrained registry, e.g. the ADM
``adm/256x256_diffusion`` and ``adm/256x256_classifier`` of openai/guided-diffusion). Both classifiers have the
form ``(x, sigma) -> logits`` in the VE view. Inputs are a split of the run's DataModule (digits, any
``ImageFolder``), :class:`ImageInputs` (a folder read only at ``setup``) or :class:`ClassLabels` (labels only,
for class-guided generation). Each sample has its own noise seed ``seed + index`` (results do not depend on the
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
from diffusion_lab.diffusion.guidance import ClassifierGuidance, Guidance, LossGuidance
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
        self.set_shape(channels, resolution, 0)

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


class ModelSource:
    """A model named in YAML and loaded only at ``setup`` (configs instantiate before the weights exist).

    ``check(role)`` fails, naming the missing file and where to get it, without loading anything (so every file
    is checked before the first, possibly large, model loads); ``load()`` returns the model in eval mode.
    """

    def check(self, role: str) -> None:
        raise NotImplementedError

    def load(self) -> nn.Module:
        raise NotImplementedError


class TrainedModel(ModelSource):
    """A module trained by this project: its YAML config (+ command-line style overrides) and checkpoint
    (Lightning ``.ckpt`` or safetensors), built by ``methods.loading.load_module``."""

    def __init__(self, config: str, checkpoint: str, overrides: Sequence[str] = ()) -> None:
        self.config, self.checkpoint, self.overrides = config, checkpoint, list(overrides)

    def check(self, role: str) -> None:
        if not Path(self.config).expanduser().is_file():
            raise FileNotFoundError(f"{role} config {str(self.config)!r} does not exist")
        if not Path(self.checkpoint).expanduser().is_file():
            raise FileNotFoundError(
                f"{role} checkpoint {str(self.checkpoint)!r} does not exist; train it with "
                f"`diffusion-lab fit --config {self.config}` and give the path of its last.ckpt"
            )

    def load(self) -> nn.Module:
        from diffusion_lab.methods.loading import load_module

        return load_module(self.config, self.checkpoint, self.overrides)

    def __repr__(self) -> str:
        return f"TrainedModel(config={self.config!r}, checkpoint={self.checkpoint!r})"


class PretrainedModel(ModelSource):
    """A public model of the pretrained registry (``diffusion_lab.pretrained.load(name, path, **kwargs)``).

    E.g. ``adm/256x256_classifier``: guided-diffusion's noisy ImageNet classifier as ``(x, sigma) -> logits``
    (``pretrained.guided_diffusion.NoisyClassifierVE``); ``adm/256x256_diffusion``: the class-conditional ADM
    UNet as ``D(x, sigma, labels=)``. ``kwargs`` go to the loader (``use_fp16``, ``clip_denoised``,
    ``flag_overrides``). Nothing is downloaded: a missing file fails naming it and its download address.
    """

    def __init__(self, name: str, path: str, kwargs: dict[str, Any] | None = None) -> None:
        from diffusion_lab.pretrained import available

        if name not in available():
            raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(available())}")
        self.name, self.path, self.kwargs = name, path, dict(kwargs or {})

    def check(self, role: str) -> None:
        from diffusion_lab.pretrained import require_file

        require_file(self.name, self.path, role)

    def load(self) -> nn.Module:
        from diffusion_lab.pretrained import load

        return load(self.name, str(Path(self.path).expanduser()), **self.kwargs).eval()

    def __repr__(self) -> str:
        return f"PretrainedModel(name={self.name!r}, path={self.path!r})"


class _LabelsOnly(Dataset):
    """``(zeros image, label)`` items: classifier guidance reads only the label (the image sets the shape)."""

    def __init__(self, labels: Tensor, shape: tuple[int, ...]) -> None:
        self.labels, self.shape = labels, shape

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(self.shape), self.labels[index]


class ClassLabels(DataModuleBase):
    """Target classes for class-guided generation (task ``classifier``): no images, only labels.

    Item ``i`` is ``(zeros (C, H, W), label_i)`` in every split; the labels are ``labels`` if given, else
    ``num_samples`` classes drawn uniformly with ``seed`` (as the split-diffusion sampling script does).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        num_samples: int = 50,
        labels: Sequence[int] | None = None,
        resolution: int = 256,
        channels: int = 3,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if num_classes < 1 or num_samples < 1 or resolution < 1 or channels < 1:
            raise ValueError(
                "need num_classes, num_samples, resolution and channels >= 1, got "
                f"{num_classes}, {num_samples}, {resolution}, {channels}"
            )
        if labels is not None:
            bad = [c for c in labels if not 0 <= int(c) < num_classes]
            if bad or not len(labels):
                raise ValueError(
                    f"labels must be a non-empty list of classes in [0, {num_classes}), got {bad}"
                )
            chosen = torch.as_tensor(list(labels), dtype=torch.long)
        else:
            chosen = torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))
        self.set_shape(channels, resolution, num_classes)
        self.labels = chosen

    def setup(self, stage: str | None = None) -> None:
        dataset = _LabelsOnly(self.labels, self.data_shape)
        self.train_set = self.val_set = self.test_set = dataset


def _source(
    role: str, given: Any, config: str | None, checkpoint: str | None, overrides: Sequence[str]
) -> Any:
    """``given`` (a ModelSource or a built model), or ``TrainedModel(config, checkpoint)`` from the shorthand."""
    if config is None and checkpoint is None:
        return given
    if given is not None:
        raise ValueError(
            f"give the {role} either as {role}= or as {role}_config + {role}_checkpoint, not both"
        )
    if config is None or checkpoint is None:
        raise ValueError(
            f"the {role} needs both {role}_config and {role}_checkpoint, got {config!r} and {checkpoint!r}"
        )
    return TrainedModel(config, checkpoint, overrides)


class ConditionalSampling(L.LightningModule):
    """Predict-only: restore (or class-guide) each input image with a pretrained prior and a guided sampler.

    Args:
        task: ``colorization`` | ``inpainting`` | ``super_resolution`` | ``classifier``.
        prior: the diffusion model: a :class:`ModelSource` (YAML ``class_path``: :class:`TrainedModel` or
            :class:`PretrainedModel`, loaded at ``setup``) or an already built denoiser ``D(x, sigma, **cond)``.
        classifier: the guidance classifier of task ``classifier``, ``(x, sigma) -> logits``: a
            :class:`ModelSource` (the project's noise-aware classifier as :class:`TrainedModel`, the ADM
            256x256 classifier as ``PretrainedModel(name="adm/256x256_classifier", path=...)``) or a callable.
        prior_config, prior_checkpoint, prior_overrides: shorthand for ``prior=TrainedModel(...)``.
        classifier_config, classifier_checkpoint, classifier_overrides: shorthand for
            ``classifier=TrainedModel(...)``.
        pass_labels: also give the prior the target labels (a class-conditional model plus classifier guidance,
            ADM's "conditional + classifier" setting); off: the prior runs without labels.
        sampler: method (``stsp``, ``ltsp``, or a baseline such as ``ddim``), steps, sigma grid, options. A
            discrete prior (ADM) supplies its own levels to the ``respaced`` grid (``model_sigmas``) and its
            ``sigma_min`` / ``sigma_max`` to the others, unless ``schedule_kwargs`` set them.
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
    """

    def __init__(
        self,
        task: Task = "inpainting",
        prior: ModelSource | nn.Module | None = None,
        classifier: ModelSource | nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None,
        prior_config: str | None = None,
        prior_checkpoint: str | None = None,
        prior_overrides: Sequence[str] = (),
        classifier_config: str | None = None,
        classifier_checkpoint: str | None = None,
        classifier_overrides: Sequence[str] = (),
        pass_labels: bool = False,
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
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        prior = _source("prior", prior, prior_config, prior_checkpoint, prior_overrides)
        if prior is None:
            raise ValueError(
                "give the prior as prior= (a TrainedModel / PretrainedModel or a built denoiser) or as "
                "prior_config + prior_checkpoint"
            )
        classifier = _source(
            "classifier", classifier, classifier_config, classifier_checkpoint, classifier_overrides
        )
        if task == "classifier" and classifier is None:
            raise ValueError(
                "task 'classifier' needs classifier= (a TrainedModel / PretrainedModel or a built "
                "(x, sigma) -> logits callable) or classifier_config + classifier_checkpoint"
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
        self.task, self.scale, self.seed, self.pass_labels = task, float(scale), seed, pass_labels
        self.prior_source = prior if isinstance(prior, ModelSource) else None
        self.classifier_source = classifier if isinstance(classifier, ModelSource) else None
        self.prior = None if self.prior_source is not None else prior
        self.classifier = None if self.classifier_source is not None else classifier
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
        """Check every weights file still to load, then load the prior (and the classifier)."""
        load_prior = self.prior is None
        load_classifier = self.task == "classifier" and self.classifier is None
        if load_prior:
            self.prior_source.check("prior")
        if load_classifier:
            self.classifier_source.check("classifier")
        if load_prior:
            self.prior = prior_denoiser(self.prior_source.load())
        self.prior.eval().requires_grad_(False)
        if load_classifier:
            self.classifier = self.classifier_source.load()
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

    def guidance(
        self, images: Tensor, labels: Tensor
    ) -> tuple[Callable[[nn.Module], Guidance], dict[str, Tensor], Tensor]:
        """(guidance factory for ``sample``, conditioning, condition image shown in the grid) of a batch.

        ``classifier``: ``ClassifierGuidance`` towards ``labels``, guidance term ``g = -s sigma grad_x log
        p(labels | x, sigma)``; restoration tasks: ``LossGuidance`` with ``L = 1/2 ||A(D(x)) - A(images)||^2``.
        """
        loss = self.condition(images)
        if loss is not None:
            return partial(LossGuidance, loss_fn=loss, scale=self.scale), {}, loss.degraded()
        if (labels < 0).any():
            raise ValueError(
                "classifier guidance needs labelled inputs (the class of each image is the target)"
            )
        factory = partial(
            ClassifierGuidance, classifier=self.classifier, scale=self.scale, pass_cond=self.pass_labels
        )
        return factory, {"labels": labels}, images

    def sigmas(self) -> Tensor:
        """The sampler's sigma grid (float64), with the prior's own levels as defaults where it has them."""
        defaults: dict[str, Any] = {}
        for key in ("sigma_min", "sigma_max"):
            value = getattr(self.prior, key, None)
            if isinstance(value, (int, float)):
                defaults[key] = float(value)
        model_sigmas = getattr(self.prior, "sigmas", None)
        if isinstance(model_sigmas, Tensor):
            defaults["model_sigmas"] = model_sigmas
        return self.sampler.sigmas(**defaults)

    def restore(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(result, condition image) for a batch on the [-1, 1] scale.

        Runs outside inference mode (Lightning's predict loop uses it) because guidance differentiates through the
        prior or the classifier; the inputs are cloned into normal tensors for that.
        """
        with torch.inference_mode(False), torch.no_grad():
            images, labels = images.clone(), labels.clone()
            sigmas = self.sigmas().to(images.device, torch.float32)
            noise = torch.stack(
                [
                    torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(self.seed + int(i)))
                    for i in index.tolist()
                ]
            ).to(images)
            guidance, cond, shown = self.guidance(images, labels)
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


__all__ = [
    "ClassLabels",
    "ConditionalSampling",
    "ImageInputs",
    "ModelSource",
    "PretrainedModel",
    "TASKS",
    "TrainedModel",
    "prior_denoiser",
]
