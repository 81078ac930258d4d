"""Any folder of images as a DataModule: class = subfolder (or one class for a flat folder).

Each image is converted to RGB or grayscale, its shorter side resized to ``resolution`` (PIL's
antialiasing filters), centre-cropped to ``resolution x resolution`` (the ADM / guided-diffusion
preprocessing) and mapped to [-1, 1] by ``x / 127.5 - 1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset, stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Interpolation = Literal["bicubic", "bilinear", "lanczos", "box", "nearest"]
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


class BadImageError(ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image)."""


def find_images(root: Path, extensions: Sequence[str]) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of a folder: one class per subfolder holding images (searched
    recursively), or a single class named after ``root`` when no subfolder holds images."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    exts = {e.lower() for e in extensions}

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        candidates = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in candidates if p.suffix.lower() in exts and p.is_file())

    subfolders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: images_in(d, recursive=True) for d in subfolders}
    classes = [name for name, files in per_class.items() if files]
    if classes:
        empty = [name for name, files in per_class.items() if not files]
        if empty:
            log.warning("ignoring subfolders of %s without images: %s", root, empty)
        loose = images_in(root, recursive=False)
        if loose:
            log.warning("ignoring %d images directly in %s (classes are its subfolders)", len(loose), root)
        files = [f for name in classes for f in per_class[name]]
        labels = [i for i, name in enumerate(classes) for _ in per_class[name]]
        return files, labels, classes
    files = images_in(root, recursive=False)
    if not files:
        raise FileNotFoundError(
            f"no images found in {str(root)!r} (searched it and its subfolders for extensions {sorted(exts)})"
        )
    return files, [0] * len(files), [root.name]


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (I;16, or I with values above 255) image scaled by 255/65535; a float image in [0, 1]
    scaled by 255; then rounded to 8-bit grayscale."""
    array = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and array.max() > 255):
        array = array * (255 / 65535)
    elif im.mode == "F" and array.max() <= 1:
        array = array * 255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def default_min_size(resolution: int) -> int:
    """Smallest accepted shorter side by default: ``resolution // 4`` (at least 2), i.e. at most 4x upscaling."""
    return max(2, resolution // 4)


def load_image(
    path: Path,
    resolution: int,
    channels: int = 3,
    interpolation: Interpolation = "bicubic",
    min_size: int | None = None,
) -> Tensor:
    """Decode, convert, resize the shorter side to ``resolution``, centre-crop: (C, R, R) uint8 tensor.

    An image whose shorter side is below ``min_size`` (default :func:`default_min_size`) is a
    ``BadImageError``: upscaling a thumbnail or a 1x1 placeholder would only train on blur.
    """
    if path.stat().st_size == 0:
        raise BadImageError(f"cannot read image {str(path)!r}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here and not later
            if im.mode == "P":  # palette images (with transparency) go through RGBA
                im = im.convert("RGBA")
            elif im.mode.startswith("I") or im.mode == "F":  # 16/32-bit and float: PIL's convert would clip
                im = _to_8bit(im)
            im = im.convert("RGB" if channels == 3 else "L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {str(path)!r}: {err}") from err
    w, h = im.size
    smallest = default_min_size(resolution) if min_size is None else min_size
    if min(w, h) < smallest:
        raise BadImageError(
            f"image {str(path)!r} is {w}x{h}, smaller than the minimum shorter side {smallest} for resolution "
            f"{resolution} (set min_image_size to accept it, or on_bad_image: skip to drop such files)"
        )
    scale = resolution / min(w, h)
    new_size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if new_size != (w, h):
        im = im.resize(new_size, _PIL_FILTERS[interpolation])
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    array = np.array(im, dtype=np.uint8)  # a writable copy
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


class ImageFileDataset(Dataset):
    """Images decoded from disk on access: ``(x (C, R, R) in [-1, 1], label)``, optional random flip."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        resolution: int,
        channels: int,
        interpolation: Interpolation,
        random_flip: bool,
        min_size: int | None = None,
    ) -> None:
        self.files, self.labels = list(files), torch.as_tensor(list(labels), dtype=torch.long)
        self.resolution, self.channels, self.interpolation = resolution, channels, interpolation
        self.random_flip, self.min_size = random_flip, min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = (
            load_image(
                self.files[index], self.resolution, self.channels, self.interpolation, self.min_size
            ).float()
            / 127.5
            - 1
        )
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[index]


class ImageFolder(DataModuleBase):
    """DataModule over a folder of images: batches ``(x (B, channels, R, R) in [-1, 1], labels (B,))``.

    Args:
        root: the folder; each subfolder holding images is a class (sorted names -> labels 0, 1, ...),
            or, when none does, the folder's own images form one class.
        resolution: output size R (shorter side resized to R, then centre crop).
        channels: 3 (RGB) or 1 (grayscale); every image is converted, whatever its mode.
        random_flip: random horizontal flips of training images.
        val_fraction: stratified, seeded fraction held out for validation (0: no validation split).
        seed: seed of the split.
        interpolation: PIL resampling filter of the resize.
        extensions: file suffixes counted as images (case-insensitive).
        on_bad_image: ``raise`` -- an unreadable, empty, truncated or too small file raises
            ``BadImageError`` naming it when it is loaded; ``skip`` -- every file is decoded once in ``setup``
            and bad ones are dropped, counted in ``skipped_files`` and reported (with the reasons) in a logged
            warning.
        min_image_size: smallest accepted shorter side in pixels (default ``max(2, resolution // 4)``).
        cache: decode every image once in ``setup`` and keep them in memory as uint8 (small folders).
        num_classes: the number of classes, if known (e.g. 1000 for ImageNet): then ``num_classes`` is
            answered without touching the folder, and ``setup`` checks it against the subfolders found.
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.

    The folder is scanned lazily, once: in ``setup``, or when ``files``, ``labels``, ``classes`` (or
    ``num_classes`` without the argument) are first read. So a config naming a folder that is not there yet
    instantiates (give ``num_classes`` for the CLI's data-to-model link), and the run fails at ``setup`` with
    ``FileNotFoundError`` naming the missing or empty folder (and the extensions searched).
    """

    def __init__(
        self,
        root: str,
        resolution: int,
        channels: Literal[1, 3] = 3,
        random_flip: bool = True,
        val_fraction: float = 0.0,
        seed: int = 0,
        interpolation: Interpolation = "bicubic",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        on_bad_image: Literal["raise", "skip"] = "raise",
        min_image_size: int | None = None,
        cache: bool = False,
        num_classes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {interpolation!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if min_image_size is not None and min_image_size < 1:
            raise ValueError(f"min_image_size must be >= 1 pixel, got {min_image_size}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (or None: count the subfolders), got {num_classes}")
        self.save_hyperparameters()
        self.min_image_size = min_image_size
        self.root = Path(root)
        self.extensions = tuple(extensions)
        self._num_classes = num_classes
        self._found: tuple[list[Path], list[int], list[str]] | None = None
        self._resolution, self._channels = resolution, channels
        self.set_shape(channels, resolution, num_classes or 0)  # num_classes: overridden below
        self.random_flip, self.val_fraction, self.seed = random_flip, val_fraction, seed
        self.interpolation, self.on_bad_image, self.cache = interpolation, on_bad_image, cache
        self.skipped_files: list[Path] = []
        self._split_files: dict[str, list[Path]] = {}

    @property
    def num_classes(self) -> int:
        return self._num_classes if self._num_classes is not None else len(self.classes)

    def _scan(self) -> tuple[list[Path], list[int], list[str]]:
        """(files, labels, classes) of the folder, found once (``find_images``); checks ``num_classes``."""
        if self._found is None:
            found = find_images(self.root, self.extensions)
            if self._num_classes is not None and len(found[2]) != self._num_classes:
                raise ValueError(
                    f"image folder {str(self.root)!r} has {len(found[2])} classes (subfolders with images), "
                    f"but num_classes={self._num_classes} was configured"
                )
            self._found = found
        return self._found

    @property
    def files(self) -> list[Path]:
        return self._scan()[0]

    @property
    def labels(self) -> list[int]:
        return self._scan()[1]

    @property
    def classes(self) -> list[str]:
        return self._scan()[2]

    def _decode_all(self) -> tuple[list[Path], list[int], list[Tensor]]:
        """Decode every file once; drop (skip mode) or raise on bad ones."""
        files, labels, images, reasons = [], [], [], []
        for path, label in zip(self.files, self.labels):
            try:
                image = load_image(
                    path, self._resolution, self._channels, self.interpolation, self.min_image_size
                )
            except BadImageError as err:
                if self.on_bad_image == "raise":
                    raise
                self.skipped_files.append(path)
                reasons.append(str(err))
                continue
            files.append(path)
            labels.append(label)
            images.append(image)
        if self.skipped_files:
            log.warning(
                "skipped %d unreadable images in %s:\n  %s",
                len(self.skipped_files),
                self.root,
                "\n  ".join(
                    reasons[:20] + ([f"... and {len(reasons) - 20} more"] if len(reasons) > 20 else [])
                ),
            )
        if not files:
            raise FileNotFoundError(
                f"no readable images in {str(self.root)!r} ({len(self.skipped_files)} skipped)"
            )
        return files, labels, images

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files, labels, images = self.files, self.labels, None
        if self.cache or self.on_bad_image == "skip":
            files, labels, images = self._decode_all()
        label_tensor = torch.as_tensor(labels, dtype=torch.long)
        if self.val_fraction > 0:
            train_idx, val_idx = stratified_split(label_tensor, self.val_fraction, self.seed)
        else:
            train_idx, val_idx = torch.arange(len(files)), torch.zeros(0, dtype=torch.long)

        def subset(indices: Tensor, flip: bool) -> Dataset:
            if self.cache:
                stacked = (
                    torch.stack([images[i] for i in indices.tolist()]) if len(indices) else torch.zeros(0)
                )
                return TensorImageDataset(stacked, label_tensor[indices], random_flip=flip)
            picked = indices.tolist()
            return ImageFileDataset(
                [files[i] for i in picked],
                [labels[i] for i in picked],
                self._resolution,
                self._channels,
                self.interpolation,
                flip,
                self.min_image_size,
            )

        self.train_set = subset(train_idx, self.random_flip)
        self.val_set = subset(val_idx, False) if len(val_idx) else None
        self._split_files = {
            "train": [files[i] for i in train_idx.tolist()],
            "val": [files[i] for i in val_idx.tolist()],
        }

    def split_files(self, split: str) -> list[Path]:
        """The image files of split ``train`` or ``val``, in the order of its dataset (sets the data up if needed;
        used to pair images with captions, ``data.captions``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.setup("fit")
        return list(self._split_files[split])


__all__ = [
    "BadImageError",
    "IMAGE_EXTENSIONS",
    "ImageFileDataset",
    "default_min_size",
    "ImageFolder",
    "find_images",
    "load_image",
]
