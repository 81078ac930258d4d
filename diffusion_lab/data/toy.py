"""Class-conditional 2-D Gaussian mixture data with an exactly known optimum.

Samples come from ``diffusion_lab.diffusion.analytic.toy_mixture_2d``; ``.mixture`` is that exact
``GaussianMixture`` (ideal denoiser, score, density, classifier), so tests and benchmarks can compare a
trained model with the true optimum.
"""

from __future__ import annotations

import torch

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset
from diffusion_lab.diffusion.analytic import GaussianMixture, toy_mixture_2d


class GaussianMixture2D(DataModuleBase):
    """DataModule of exact samples ``(x (B, 2) float32, labels (B,) int64)`` from ``toy_mixture_2d``.

    Shape properties: ``data_dim = num_channels = 2`` (link either to ``MLP.dim``), ``data_shape = (2,)``,
    ``resolution = None`` (not an image), ``num_classes`` as given. Values are not scaled to [-1, 1]:
    the component means lie on a circle of radius 1 to 1.3.

    Args:
        num_classes, components_per_class, std: passed to ``toy_mixture_2d``.
        mixture_seed: seed of the mixture's geometry (means, covariances, weights).
        num_train, num_val: number of samples drawn (once, in ``setup``) for each split.
        seed: seed of the sample draws (train uses ``seed``, val ``seed + 1``).
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.
    """

    def __init__(
        self,
        num_classes: int = 3,
        components_per_class: int = 2,
        std: float = 0.15,
        mixture_seed: int = 0,
        num_train: int = 20000,
        num_val: int = 2000,
        seed: int = 0,
        batch_size: int = 512,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if num_classes < 1 or components_per_class < 1 or std <= 0 or num_train < 1 or num_val < 0:
            raise ValueError(
                "need num_classes >= 1, components_per_class >= 1, std > 0, num_train >= 1, num_val >= 0; "
                f"got {num_classes}, {components_per_class}, {std}, {num_train}, {num_val}"
            )
        self.save_hyperparameters()
        self.mixture: GaussianMixture = toy_mixture_2d(num_classes, components_per_class, std, mixture_seed)
        self._num_classes = num_classes
        self.num_train, self.num_val, self.seed = num_train, num_val, seed

    @property
    def num_channels(self) -> int:
        return self.mixture.dim

    @property
    def data_dim(self) -> int:
        return self.mixture.dim

    @property
    def resolution(self) -> None:
        return None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.mixture.dim,)

    def _draw(self, n: int, seed: int) -> TensorImageDataset:
        x, labels = self.mixture.sample(n, generator=torch.Generator().manual_seed(seed))
        return TensorImageDataset(x.float(), labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._draw(self.num_train, self.seed)
            self.val_set = self._draw(self.num_val, self.seed + 1)


__all__ = ["GaussianMixture2D"]
