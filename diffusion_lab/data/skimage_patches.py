"""Random RGB crops of the photographs bundled with scikit-image, as a small offline training set.

scikit-image ships a handful of colour photographs (``skimage.data``: ``astronaut``, ``chelsea``, ``coffee``,
``rocket``, ...) that need no download. This module cuts a fixed, seeded pool of square crops from them and
rescales each to ``resolution x resolution``, so an RGB diffusion prior trains offline on a CPU (the benchmarks'
``benchmarks/_rgb_prior.py``).

Each photograph is first downscaled (antialiased bilinear) so that its shorter side is at most
``ceil(resolution / scale[0])`` (``sources`` holds these working copies; a smaller image is kept as it is): the
smallest crops are then about ``resolution`` pixels wide and are not upsampled, and cutting stays cheap. Crop
``k`` of a split is then drawn as follows:

* image ``i`` uniformly among ``images`` (each photograph contributes equally, whatever its size);
* side ``d = round(s * min(H_i, W_i))`` with ``s`` log-uniform on ``scale`` (zoom levels from details to
  the whole picture), clamped to the split's region of the image;
* the top-left corner uniformly among the positions that keep the crop inside the region;
* the crop resized to ``resolution`` with antialiased bilinear filtering (``F.interpolate(..., antialias=True)``;
  no resizing when ``d == resolution``), rounded to 8 bits and mapped to [-1, 1] by ``x / 127.5 - 1``.

**Held-out region.** The right-most ``val_fraction`` of each image's width is reserved for the ``val`` split:
training crops lie entirely left of it, validation crops entirely inside it, so no validation pixel is seen in
training (colourisation benchmarks use the validation crops). The pools are drawn once, at ``setup``, from
``torch.Generator`` seeds ``2 seed`` (train) and ``2 seed + 1`` (val); the boxes are kept in ``train_boxes`` /
``val_boxes`` as rows ``(image index, top, left, side)`` in pixels of the working copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset

DEFAULT_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
    "ihc",
    "retina",
)
"""The bundled colour photographs (``motorcycle_right``, a near copy of ``motorcycle_left``, and the synthetic
``chessboard_RGB``, ``color`` and ``phantom`` are left out)."""


def load_skimage_rgb(name: str) -> Tensor:
    """A scikit-image bundled colour image as uint8 (3, H, W); a clear error for unknown or non-RGB images."""
    from diffusion_lab.data.pairs import skimage_image_path

    with Image.open(skimage_image_path(name)) as im:
        if im.mode != "RGB":
            raise ValueError(f"scikit-image image {name!r} is {im.mode}, not RGB: pick a colour photograph")
        array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def working_copy(image: Tensor, max_short_side: int) -> Tensor:
    """``image`` (3, H, W) uint8 downscaled (antialiased bilinear, rounded) so that min(H, W) <= max_short_side."""
    h, w = image.shape[1:]
    if min(h, w) <= max_short_side:
        return image
    size = (round(h * max_short_side / min(h, w)), round(w * max_short_side / min(h, w)))
    small = F.interpolate(
        image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return small[0].round().clamp(0, 255).to(torch.uint8)


def crop_boxes(
    shapes: Sequence[tuple[int, int]],
    regions: Sequence[tuple[int, int]],
    num: int,
    scale: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """(num, 4) int64 boxes ``(image, top, left, side)``; image ``i`` has size ``shapes[i] = (H, W)`` and the
    crop lies in its columns ``regions[i] = (first, end)`` (see the module docstring for the distribution)."""
    lo, hi = math.log(scale[0]), math.log(scale[1])
    u = torch.rand(num, 4, generator=generator, dtype=torch.float64)
    image = (u[:, 0] * len(shapes)).long().clamp_max(len(shapes) - 1)
    boxes = torch.empty(num, 4, dtype=torch.long)
    for k in range(num):
        i = int(image[k])
        (h, w), (first, end) = shapes[i], regions[i]
        s = math.exp(lo + (hi - lo) * float(u[k, 1]))
        side = max(1, min(round(s * min(h, w)), h, end - first))
        top = int(u[k, 2] * (h - side + 1))
        left = first + int(u[k, 3] * (end - first - side + 1))
        boxes[k] = torch.tensor([i, min(top, h - side), min(left, end - side), side])
    return boxes


def cut(images: Sequence[Tensor], boxes: Tensor, resolution: int) -> Tensor:
    """The crops of ``boxes`` resized to ``resolution``: uint8 (N, 3, R, R)."""
    out = torch.empty(len(boxes), 3, resolution, resolution, dtype=torch.uint8)
    for k, (i, top, left, side) in enumerate(boxes.tolist()):
        crop = images[i][:, top : top + side, left : left + side]
        if side != resolution:
            crop = F.interpolate(
                crop[None].float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                align_corners=False,
            )[0].round().clamp(0, 255)  # fmt: skip
        out[k] = crop.to(torch.uint8)
    return out


class SkimagePatches(DataModuleBase):
    """DataModule of rescaled crops of scikit-image's colour photographs: ``(x (B, 3, R, R) in [-1, 1], 0)``.

    Args:
        images: names of bundled RGB images (``skimage.data``; default :data:`DEFAULT_IMAGES`).
        resolution: output size R.
        num_train, num_val: crops in the training / validation pool.
        scale: (min, max) crop side as a fraction of the image's shorter side, log-uniform, in (0, 1].
        val_fraction: right-most fraction of each image's width reserved for validation crops, in (0, 1).
        random_flip: random horizontal flips of training crops.
        seed: seed of the crop pools (train: ``2 seed``, val: ``2 seed + 1``).
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.

    Shape properties: ``num_channels = 3``, ``resolution = R``, ``num_classes = 0`` (labels are all 0).
    After ``setup``: ``train_boxes`` / ``val_boxes`` (rows ``(image index, top, left, side)`` in pixels of
    ``sources``, the uint8 working copies of the images).
    """

    def __init__(
        self,
        images: Sequence[str] = DEFAULT_IMAGES,
        resolution: int = 32,
        num_train: int = 8192,
        num_val: int = 256,
        scale: tuple[float, float] = (0.15, 1.0),
        val_fraction: float = 0.25,
        random_flip: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        images = [images] if isinstance(images, str) else list(images)
        if not images:
            raise ValueError("images must name at least one scikit-image colour image, got an empty list")
        if resolution < 1 or num_train < 1 or num_val < 0:
            raise ValueError(
                f"need resolution >= 1, num_train >= 1, num_val >= 0; got {resolution}, {num_train}, {num_val}"
            )
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.image_names, self._resolution = images, resolution
        self.set_shape(3, resolution, 0)
        self.num_train, self.num_val, self.scale = num_train, num_val, (float(scale[0]), float(scale[1]))
        self.val_fraction, self.random_flip, self.seed = val_fraction, random_flip, seed
        self.sources: list[Tensor] = []
        self.train_boxes: Tensor | None = None
        self.val_boxes: Tensor | None = None

    def split_columns(self, width: int) -> int:
        """First column of the held-out (validation) strip of an image ``width`` pixels wide."""
        return width - max(1, round(self.val_fraction * width))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        max_side = math.ceil(self._resolution / self.scale[0])
        self.sources = [working_copy(load_skimage_rgb(name), max_side) for name in self.image_names]
        shapes = [tuple(im.shape[1:]) for im in self.sources]
        cuts = [self.split_columns(w) for _, w in shapes]
        train_regions = [(0, c) for c in cuts]
        val_regions = [(c, w) for c, (_, w) in zip(cuts, shapes)]
        train_generator = torch.Generator().manual_seed(2 * self.seed)
        val_generator = torch.Generator().manual_seed(2 * self.seed + 1)
        self.train_boxes = crop_boxes(shapes, train_regions, self.num_train, self.scale, train_generator)
        self.val_boxes = crop_boxes(shapes, val_regions, self.num_val, self.scale, val_generator)
        train = cut(self.sources, self.train_boxes, self._resolution)
        self.train_set = TensorImageDataset(train, torch.zeros(len(train)), random_flip=self.random_flip)
        if self.num_val:
            val = cut(self.sources, self.val_boxes, self._resolution)
            self.val_set = TensorImageDataset(val, torch.zeros(len(val)))


__all__ = ["DEFAULT_IMAGES", "SkimagePatches", "crop_boxes", "cut", "load_skimage_rgb", "working_copy"]
