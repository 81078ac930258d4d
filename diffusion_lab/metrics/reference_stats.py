"""Reference statistics of a data set in a feature space: computed once, cached on disk, loaded by validation.

FID needs the real data's feature mean ``mu`` and covariance ``Sigma`` (Heusel et al. 2017, eq. 6); KID
(Binkowski et al. 2018) and improved precision/recall (Kynkaanniemi et al. 2019) need real feature vectors, so a
seeded random subset of at most ``max_features`` of them is stored too. A cache file is keyed by data set,
split, resolution and feature extractor (whose key includes a hash of its weights), so a retrained feature net
or another resolution never reuses stale statistics. Files are safetensors with the key in the metadata.

``mu`` and ``Sigma`` are accumulated in float64 as ``sum x`` and ``sum x x^T`` (the unbiased covariance
``(sum x x^T - n mu mu^T) / (n - 1)``, as torchmetrics does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusion_lab.metrics.distances import sqrtm_psd
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.metrics.precision_recall import knn_radii

__all__ = [
    "ReferenceStats",
    "compute_reference_stats",
    "images_from_batch",
    "load_or_compute_reference_stats",
    "datamodule_reference_path",
    "reference_loader",
    "reference_stats_path",
]

DEFAULT_CACHE_DIR = Path("data_cache") / "fid_stats"


@dataclass
class ReferenceStats:
    """Feature statistics of a reference set: ``mean`` (D,), ``cov`` (D, D) float64 over ``num_samples`` images,
    and ``features`` (M, D) float32, a random subset (M <= num_samples) for KID and precision/recall."""

    mean: Tensor
    cov: Tensor
    num_samples: int
    features: Tensor
    key: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def sqrt_cov(self) -> Tensor:
        """Symmetric square root of ``cov``, computed once (the expensive half of FID)."""
        if "sqrt_cov" not in self._cache:
            self._cache["sqrt_cov"] = sqrtm_psd(self.cov)
        return self._cache["sqrt_cov"]

    def knn_radii(self, k: int) -> Tensor:
        """k-NN radii of the stored features (the real manifold of precision/recall), computed once per k."""
        if ("radii", k) not in self._cache:
            self._cache[("radii", k)] = knn_radii(self.features, k)
        return self._cache[("radii", k)]

    @classmethod
    def from_features(
        cls, features: Tensor, max_features: int = 10_000, seed: int = 0, key: str = ""
    ) -> ReferenceStats:
        """Statistics of an (N, D) feature matrix (N >= 2)."""
        accumulator = _MomentAccumulator()
        accumulator.add(features)
        return accumulator.finish(_subsample(features, max_features, seed), key)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file; through a temporary file and a rename, so no reader sees half a file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "cov": self.cov, "features": self.features.contiguous()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"num_samples": str(self.num_samples), "key": self.key})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"reference statistics '{path}' do not exist; compute them with `python tools/fid_stats.py` "
                f"(see docs/metrics.md)"
            )
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("mean", "cov", "features")}
        return cls(num_samples=int(metadata["num_samples"]), key=metadata.get("key", ""), **tensors)


class _MomentAccumulator:
    """Running float64 sums of x and x x^T."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def add(self, features: Tensor) -> None:
        x = features.detach().to(torch.float64).cpu()
        if self.total is None:
            self.total, self.outer = x.sum(0), x.T @ x
        else:
            self.total += x.sum(0)
            self.outer += x.T @ x
        self.count += x.shape[0]

    def finish(self, subset: Tensor, key: str) -> ReferenceStats:
        if self.count < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return ReferenceStats(mean, cov, self.count, subset.float().contiguous(), key)


def _subsample(features: Tensor, max_features: int, seed: int) -> Tensor:
    if features.shape[0] <= max_features:
        return features.cpu()
    keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_features]
    return features[keep.sort().values].cpu()


def images_from_batch(batch: object) -> Tensor:
    """The image tensor of a DataModule batch: ``x``, ``(x, labels, ...)`` or a dict with key image(s)/x."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "x"):
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}")


@torch.no_grad()
def compute_reference_stats(
    extractor: FeatureExtractor,
    batches: Iterable,
    *,
    max_features: int = 10_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ReferenceStats:
    """Feature statistics of every image of ``batches`` (a DataLoader); images in [-1, 1]."""
    accumulator = _MomentAccumulator()
    chunks = []
    for batch in tqdm(batches, desc=f"reference stats ({extractor.key})", disable=not progress, leave=False):
        features, _ = extractor(images_from_batch(batch).to(device))
        accumulator.add(features)
        chunks.append(features.float().cpu())
    return accumulator.finish(_subsample(torch.cat(chunks), max_features, seed), extractor.key)


def reference_stats_path(
    cache_dir: str | os.PathLike, dataset: str, split: str, resolution: int, extractor_key: str
) -> Path:
    """``cache_dir/{dataset}-{split}-{resolution}px-{extractor_key}.safetensors`` (names sanitised)."""
    parts = [dataset, split, f"{resolution}px", extractor_key]
    name = "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", str(p)) for p in parts)
    return Path(cache_dir) / f"{name}.safetensors"


def reference_loader(datamodule: object, split: str, batch_size: int = 256) -> DataLoader:
    """An unshuffled loader over the DataModule's ``{split}_set`` (else its ``{split}_dataloader()``)."""
    dataset = getattr(datamodule, f"{split}_set", None)
    if dataset is not None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    loader_fn = getattr(datamodule, f"{split}_dataloader", None)
    if loader_fn is None:
        raise ValueError(f"{type(datamodule).__name__} has no '{split}' split for reference statistics")
    return loader_fn()


def datamodule_reference_path(
    datamodule: object, split: str, extractor_key: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR
) -> Path:
    """Cache file of a DataModule's split: data set name (``datamodule.name`` or its lower-case class name)
    and ``datamodule.resolution`` (or the first batch's width) go into the key."""
    dataset = getattr(datamodule, "name", None) or type(datamodule).__name__.lower()
    resolution = getattr(datamodule, "resolution", None)
    if resolution is None:
        resolution = images_from_batch(next(iter(reference_loader(datamodule, split)))).shape[-1]
    return reference_stats_path(cache_dir, dataset, split, resolution, extractor_key)


def load_or_compute_reference_stats(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    batches: Iterable | None,
    *,
    max_features: int = 10_000,
    device: torch.device | str = "cpu",
) -> ReferenceStats:
    """Load cached statistics from ``path`` or compute them from ``batches`` and write them there."""
    path = Path(path)
    if path.is_file():
        stats = ReferenceStats.load(path)
        if stats.key and stats.key != extractor.key:
            raise ValueError(
                f"reference statistics '{path}' were computed with '{stats.key}', not '{extractor.key}'"
            )
        return stats
    if batches is None:
        raise FileNotFoundError(
            f"reference statistics '{path}' do not exist and no data was given to compute them"
        )
    stats = compute_reference_stats(extractor, batches, max_features=max_features, device=device)
    stats.save(path)
    return stats
