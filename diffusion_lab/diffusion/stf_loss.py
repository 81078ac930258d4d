"""``StableTargetLoss``: DSM with the Stable Target Field target (Xu et al. 2023), and its reference sampling.

The loss is ``DenoisingLoss`` (sigma sampler + weighting of EDM, VP or VE unchanged) with the target replaced
by ``stf.stable_target``, so switching a config to STF is one ``class_path``::

    loss:
      class_path: diffusion_lab.diffusion.stf_loss.StableTargetLoss
      init_args: {reference_size: 1024, weighting: edm, sigma_data: 0.5, sigma_sampler: ...}

Reference batch of one step (``n = reference_size`` points per training sample, its own one included):

* ``n >= B`` (the paper's layout, and the public code's): the minibatch's own clean images fill the first ``B``
  slots and ``n - B`` images are drawn from the training set; every sample sees all ``n``.
* ``n < B``: every sample sees its own clean image plus ``n - 1`` drawn images shared by the batch; ``n = 1``
  is exactly DSM.

Drawn images come from ``reference_source``: ``memory`` (default) keeps the training set (or a random
``pool_size`` subset of it) in memory on the training device, in its stored dtype (uint8 for CIFAR-10), and
draws a uniform subset without replacement each step, with the DataModule's random flips; ``loader`` reads them
from a second shuffled DataLoader over the training set (for sets that do not fit in memory). Randomness: each
step takes a seed from torch's global RNG, so ``seed_everything`` reproduces a run and validation (which forks
the RNG) does not shift training's draws. Under DDP each rank draws its own reference batch (seed offset by
the rank) or, with ``share_across_ranks``, the same one (rank 0's seed is broadcast, 8 bytes per step).

Class-conditional variant (``class_conditional``; on by default whenever the model is trained with labels,
since a conditional denoiser must learn ``E[x0 | y, c]``): a sample with label ``c`` sees only references of
class ``c`` (its own point always); samples whose label was dropped to the null label ``num_classes``
(classifier-free training) get the unconditional target over all references, which is what ``D(x, null)``
must learn. The public code has no such variant (it trains unconditional models only).

Validation: in eval mode the loss uses DSM's target (``StableTargetLoss.target``), so ``val/loss`` is the same
quantity for DSM and STF runs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from diffusion_lab.diffusion.losses import DenoisingLoss, SigmaSampler, Weighting
from diffusion_lab.diffusion.stf import stable_target

ReferenceSource = Literal["memory", "loader"]

__all__ = ["ReferenceLoader", "ReferencePool", "StableTargetLoss"]


def _to_model_range(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1] (``data.base.TensorImageDataset``'s map); floats unchanged."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    return x if x.is_floating_point() else x.float()


def _random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


class ReferencePool:
    """Training images (and labels) held in memory; ``draw`` returns a uniform subset without replacement.

    Images stay in their stored dtype and move to the training device on first use (once per device).
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, random_flip: bool = False) -> None:
        if images.ndim < 2 or images.shape[0] < 1:
            raise ValueError(f"images must be (N, *shape) with N >= 1, got shape {tuple(images.shape)}")
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels, self.random_flip = images, labels, random_flip
        self._device_copy: tuple[torch.device, Tensor, Tensor | None] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if self._device_copy is None or self._device_copy[0] != device:
            labels = None if self.labels is None else self.labels.to(device)
            self._device_copy = (device, self.images.to(device), labels)
        return self._device_copy[1], self._device_copy[2]

    def draw(self, k: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """``k`` distinct pool items as (float images in [-1, 1] on ``device``, labels or None)."""
        if k > len(self):
            raise ValueError(
                f"cannot draw {k} distinct reference images from a pool of {len(self)}; lower reference_size"
            )
        images, labels = self._on(device)
        index = torch.randperm(len(self), generator=generator)[:k].to(device)
        x = _to_model_range(images[index])
        if self.random_flip:
            x = _random_flip(x, generator)
        return x, (None if labels is None else labels[index])


class ReferenceLoader:
    """Reference images from a second shuffled DataLoader over ``dataset`` (items ``(x, label)`` or ``x``).

    Each draw takes the next batch of ``k`` items; a new pass (reshuffled with a fresh seed from ``seed_fn``)
    starts when the loader is exhausted or ``k`` changes.
    """

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self._iterator: Any = None
        self._batch_size = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, k: int, seed_fn: Any, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if k > len(self):
            raise ValueError(f"cannot draw {k} reference images from a training set of {len(self)}")
        batch = next(self._iterator, None) if self._iterator is not None and self._batch_size == k else None
        if batch is None:
            generator = torch.Generator().manual_seed(seed_fn())
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=k,
                shuffle=True,
                drop_last=True,
                generator=generator,
                num_workers=self.num_workers,
            )
            self._iterator, self._batch_size = iter(loader), k
            batch = next(self._iterator)
        images, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        return _to_model_range(images).to(device), (None if labels is None else labels.to(device))


def pool_from_datamodule(datamodule: Any, pool_size: int | None = None) -> ReferencePool:
    """A ``ReferencePool`` of the DataModule's training set (set up for ``fit`` if needed).

    ``TensorImageDataset``-like sets (``images``, ``labels``, ``random_flip`` attributes) are used as they are;
    any other map-style set is read item by item. ``pool_size`` keeps a random subset (torch's global RNG).
    """
    dataset = _train_set(datamodule)
    n = len(dataset)
    keep = None if pool_size is None or pool_size >= n else torch.randperm(n)[:pool_size]
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        images, labels = dataset.images, dataset.labels
        if keep is not None:
            images, labels = images[keep], labels[keep]
        return ReferencePool(images, labels, bool(getattr(dataset, "random_flip", False)))
    items = [dataset[int(i)] for i in (keep if keep is not None else range(n))]
    if isinstance(items[0], (list, tuple)):
        return ReferencePool(torch.stack([i[0] for i in items]), torch.as_tensor([int(i[1]) for i in items]))
    return ReferencePool(torch.stack(items))


def _train_set(datamodule: Any) -> Any:
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None and hasattr(datamodule, "setup"):
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        datamodule.setup("fit")
        dataset = getattr(datamodule, "train_set", None)
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"{type(datamodule).__name__} has no training set (`train_set` after setup('fit')); the Stable "
            "Target Field draws its reference images from it"
        )
    return dataset


class StableTargetLoss(DenoisingLoss):
    """DSM with the Stable Target Field target (Xu et al. 2023): ``lambda(sigma) ||D(y, sigma) - T(y)||^2``.

    Args:
        sigma_sampler, weighting, sigma_data: as ``DenoisingLoss`` (EDM, VP or VE formulation unchanged).
        reference_size: ``n``, reference images per training sample including its own (see module
            docstring). Public code default 4096 per GPU; released CIFAR-10 checkpoints used 1024.
        chunk_size: references per chunk of the streamed log-sum-exp (memory O(B x chunk_size)).
        class_conditional: restrict each labelled sample's references to its class. ``None`` (default): whenever
            the model is trained with labels, as a class-conditional denoiser needs ``E[x0 | y, c]``;
            ``False`` forces the unconditional target (biased for a conditional model; for ablations).
        share_across_ranks: under DDP, every rank uses the same drawn references (else each its own).
        reference_source: ``memory`` (pool on the training device) or ``loader`` (second DataLoader).
        pool_size: keep only a random subset of this many training images in the ``memory`` pool.
        num_workers: worker processes of the ``loader`` source.

    The DataModule's training set becomes the reference source in ``setup_reference`` (``DiffusionModule``
    calls it at fit start); in plain Python call it yourself or ``set_reference_pool``.
    """

    def __init__(
        self,
        sigma_sampler: SigmaSampler | None = None,
        weighting: Weighting = "edm",
        sigma_data: float = 0.5,
        reference_size: int = 1024,
        chunk_size: int = 1024,
        class_conditional: bool | None = None,
        share_across_ranks: bool = False,
        reference_source: ReferenceSource = "memory",
        pool_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(sigma_sampler, weighting, sigma_data)
        if reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if reference_source not in ("memory", "loader"):
            raise ValueError(f"reference_source must be 'memory' or 'loader', got {reference_source!r}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {pool_size}")
        self.reference_size, self.chunk_size = reference_size, chunk_size
        self.class_conditional, self.share_across_ranks = class_conditional, share_across_ranks
        self.reference_source, self.pool_size, self.num_workers = reference_source, pool_size, num_workers
        self.source: ReferencePool | ReferenceLoader | None = None
        self.num_classes: int | None = None

    # ------------------------------------------------------------------ reference data
    def setup_reference(self, datamodule: Any) -> None:
        """Take the reference source (and ``num_classes``, whose value is the null label) from a DataModule."""
        if self.reference_source == "memory":
            self.source = pool_from_datamodule(datamodule, self.pool_size)
        else:
            self.source = ReferenceLoader(_train_set(datamodule), self.num_workers)
        self.num_classes = getattr(datamodule, "num_classes", None)

    def set_reference_pool(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        random_flip: bool = False,
        num_classes: int | None = None,
    ) -> None:
        """Use these training images (float in [-1, 1] or uint8) as the reference pool."""
        self.source = ReferencePool(images, labels, random_flip)
        if num_classes is None and labels is not None:
            num_classes = int(labels.max()) + 1
        self.num_classes = num_classes

    def _step_seed(self, device: torch.device) -> int:
        """A seed from torch's global RNG: offset by the rank, or rank 0's under ``share_across_ranks``."""
        seed = int(torch.randint(0, 2**62, (1,)))
        if dist.is_available() and dist.is_initialized():
            if self.share_across_ranks:
                shared = torch.tensor([seed], dtype=torch.long, device=device)
                dist.broadcast(shared, src=0)
                seed = int(shared.item())
            else:
                seed += 1_000_003 * dist.get_rank()
        return seed

    def draw_references(self, k: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """``k`` reference images (float, on ``device``) and their labels (None if the source has none)."""
        if self.source is None:
            raise RuntimeError(
                f"StableTargetLoss with reference_size={self.reference_size} needs reference images: call "
                "setup_reference(datamodule) or set_reference_pool(images) first (DiffusionModule does it at "
                "fit start)"
            )
        if isinstance(self.source, ReferenceLoader):
            return self.source.draw(k, lambda: self._step_seed(device), device)
        return self.source.draw(k, torch.Generator().manual_seed(self._step_seed(device)), device)

    # ------------------------------------------------------------------ the target
    def target(self, x0: Tensor, x_noisy: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """The stable target of every sample of the minibatch (module docstring for the reference layout).

        In eval mode (``loss.eval()``, as Lightning sets it for validation and test) the target is DSM's ``x0``:
        the validation loss is then the plain DSM loss, whose minimiser is the ideal denoiser that both targets
        estimate, so it compares DSM and STF runs on one scale, and ``validate`` / ``test`` need no reference
        images.
        """
        batch, n = x0.shape[0], self.reference_size
        if not self.training:
            return x0
        labels = cond.get("labels") if self.class_conditional in (None, True) else None
        if self.class_conditional and labels is None:
            raise ValueError("class_conditional=True but the model passed no labels= to the loss")
        if n >= batch:  # minibatch in the first B slots, n - B drawn
            drawn, drawn_labels = self._draw_or_empty(n - batch, x0)
            references = torch.cat([x0, drawn.to(x0.dtype)])
            exclude = torch.arange(batch, device=x0.device)
            ref_labels = None if labels is None else torch.cat([labels, self._need(drawn_labels, labels)])
        else:  # own point + n - 1 drawn images shared by the batch
            drawn, drawn_labels = self._draw_or_empty(n - 1, x0)
            references, exclude = drawn.to(x0.dtype), None
            ref_labels = None if labels is None else self._need(drawn_labels, labels)
        row_labels = None
        if labels is not None:  # the null label (classifier-free dropout) -> unconditional target
            if self.num_classes is None:
                raise ValueError(
                    "class-conditional stable targets need num_classes (the null label): set it through "
                    "setup_reference(datamodule) or set_reference_pool(..., num_classes=K), or set "
                    "class_conditional=False"
                )
            row_labels = torch.where(labels >= self.num_classes, torch.full_like(labels, -1), labels)
        return stable_target(
            x_noisy,
            sigma,
            x0,
            references,
            exclude=exclude,
            labels=row_labels,
            ref_labels=ref_labels,
            chunk_size=self.chunk_size,
        )

    def _draw_or_empty(self, k: int, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        if k == 0:
            return x0.new_zeros((0, *x0.shape[1:])), torch.zeros(0, dtype=torch.long, device=x0.device)
        return self.draw_references(k, x0.device)

    def _need(self, drawn_labels: Tensor | None, labels: Tensor) -> Tensor:
        if drawn_labels is None:
            raise ValueError(
                "class-conditional stable targets need labelled reference images, but the reference source has "
                "none; give the pool labels or set class_conditional=False"
            )
        return drawn_labels.to(labels.device, labels.dtype)
