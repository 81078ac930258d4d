"""Shared pieces of the DataModules: a base class with loaders and shape properties, an in-memory
dataset with optional random horizontal flips, and a deterministic stratified split.

Every DataModule yields batches ``(x, labels)``: ``x`` float32 in [-1, 1] of shape (B, C, H, W) (images)
or (B, D) (toy vectors), ``labels`` int64 (B,). The properties ``num_channels``, ``resolution``,
``num_classes`` and ``data_shape`` are known right after ``__init__`` (no ``setup()`` needed), so
LightningCLI can link them to the network with ``apply_on="instantiate"``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.reliability.resumable_sampler import ResumableDataLoader


class TensorImageDataset(Dataset):
    """In-memory (images, labels) with an optional random horizontal flip (p = 0.5) per item.

    ``images`` is float in [-1, 1], or uint8 in [0, 255] (mapped to ``x / 127.5 - 1`` per item, which
    keeps large sets such as CIFAR-10 at one byte per value in memory).
    """

    def __init__(self, images: Tensor, labels: Tensor, random_flip: bool = False) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.random_flip = images, labels.long(), random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[index]


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``range(len(labels))`` into sorted (train, val) index tensors.

    Each class ``c`` with ``n_c`` members contributes ``round(val_fraction * n_c)`` random members
    (a seeded permutation) to val, so class proportions are preserved to within one item per class.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[: int(round(val_fraction * len(members)))])
    val_idx = torch.sort(torch.cat(val)).values if val else torch.zeros(0, dtype=torch.long)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_idx] = True
    return torch.nonzero(~is_val).flatten(), val_idx


class DataModuleBase(LightningDataModule):
    """Loader plumbing shared by every DataModule in ``diffusion_lab.data``.

    Args:
        batch_size: training batch size.
        num_workers: loader worker processes (0 = load in the main process; workers persist when > 0).
        val_batch_size: batch size of val/test/predict loaders (default ``batch_size``).
        drop_last: drop the last incomplete training batch.
        pin_memory: pin host memory (default: when CUDA is available).

    Subclasses set ``self.train_set``, ``self.val_set`` (and optionally ``self.test_set``) in ``setup``
    and define the properties ``num_channels``, ``resolution`` and ``num_classes``.

    The training loader is a ``reliability.ResumableDataLoader``: its order is a seeded function of
    (``PL_GLOBAL_SEED``, epoch), split across DDP ranks, and its position is saved in checkpoints, so a run
    resumed mid-epoch continues with exactly the next batch.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- shape information: set_shape() in __init__, or override the properties ---------------------
    def set_shape(self, num_channels: int, resolution: int | None, num_classes: int) -> None:
        """Declare the data's shape once (what the properties below return and the CLI links to the model)."""
        self._shape_fields = {
            "num_channels": num_channels,
            "resolution": resolution,
            "num_classes": num_classes,
        }

    def _shape_field(self, name: str) -> Any:
        fields = getattr(self, "_shape_fields", None)
        if fields is None:
            raise NotImplementedError(
                f"{type(self).__name__} must call set_shape(num_channels, resolution, num_classes) in __init__ "
                f"or override the {name} property"
            )
        return fields[name]

    @property
    def num_channels(self) -> int:
        return self._shape_field("num_channels")

    @property
    def resolution(self) -> int | None:
        return self._shape_field("resolution")

    @property
    def num_classes(self) -> int:
        return self._shape_field("num_classes")

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W) for images."""
        return (self.num_channels, self.resolution, self.resolution)

    # ---- loaders -------------------------------------------------------------------------------------
    def _dataset(self, name: str, stage: str) -> Dataset | None:
        if getattr(self, name) is None:  # plain-Python use: prepare and set up on first request
            self.prepare_data()
            self.setup(stage)
        return getattr(self, name)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        options = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }
        if train:  # stateful: a run resumed mid-epoch continues with the next batch (reliability/)
            trainer = self.trainer
            return ResumableDataLoader.for_training(
                dataset,
                self.batch_size,
                drop_last=self.drop_last,
                num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0,
                **options,
            )
        # Its own generator: creating the iterator draws a worker base seed, which must not come from the
        # global RNG (Lightning also iterates it when resuming at an epoch boundary; exact resume needs that).
        return DataLoader(
            dataset, batch_size=self.val_batch_size, shuffle=False, generator=torch.Generator(), **options
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train_set", "fit")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') did not create a training set")
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader; an empty list (Lightning then skips validation) when there is no split."""
        dataset = self._dataset("val_set", "validate")
        return [] if dataset is None else self._loader(dataset, train=False)

    def test_dataloader(self) -> DataLoader | list:
        """The test split where the data set has one, else the validation split."""
        if self.test_set is not None:
            return self._loader(self.test_set, train=False)
        dataset = self._dataset("val_set", "test")
        return [] if dataset is None else self._loader(dataset, train=False)

    def predict_dataloader(self) -> Any:
        """``predict`` runs over the model's own inputs where it defines them (a generative model's sample
        indices: Lightning would otherwise prefer the DataModule's hook), else over the test split."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        hook = getattr(type(model), "predict_dataloader", None)
        if model is not None and hook is not LightningModule.predict_dataloader:
            return model.predict_dataloader()
        return self.test_dataloader()


__all__ = ["DataModuleBase", "TensorImageDataset", "stratified_split"]
