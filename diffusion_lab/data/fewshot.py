"""Few-shot data: class-split data sets and one DataModule serving pretraining batches and episodes.

A *source* holds disjoint train / val / test classes:

* ``GlyphClasses``: procedurally generated glyphs (``data/glyphs.py``), offline, seed-fixed, hundreds of
  classes per split.
* ``DigitClasses``: scikit-learn's 8x8 digits, a tiny sanity set (by default classes 0-4 train, 5-9 val
  and test: ten classes cannot give three disjoint 5-way splits).
* ``MiniImageNet``: the Ravi & Larochelle (2017) split, 64 / 16 / 20 classes x 600 images, from
  ``train.csv`` / ``val.csv`` / ``test.csv`` (``filename,label``) and an ``images/`` folder.
* ``CUB``: CUB-200-2011 with the 100 / 50 / 50 class split of Chen et al. (2019, "A Closer Look at
  Few-shot Classification": sorted class i is train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3),
  images cropped to their bounding boxes; or any split given as CSV files.

``FewShotDataModule`` serves, from one source: training batches ``(x, labels)`` of the pretraining classes
(``train_mode="images"``: SSL ignores the labels, supervised pretraining uses them) or training episodes
(``train_mode="episodes"``: ProtoNet); validation and test episodes (one loader per shot in
``eval_shots``, fixed and seeded). Images are float in [-1, 1], (C, R, R).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset
from diffusion_lab.data.episodes import EpisodeLoader, EpisodeSampler
from diffusion_lab.data.glyphs import GlyphStyle, render_glyph_classes
from diffusion_lab.data.image_folder import BadImageError

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------------
# Data sets of one split: items (x in [-1, 1], label in 0..C-1), plus `labels` and `class_names`.
# ---------------------------------------------------------------------------------------------------
class ClassSplitDataset(TensorImageDataset):
    """In-memory images of one split; ``class_names[label]`` identifies a class across splits."""

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
        super().__init__(images, labels)
        self.class_names = list(class_names)


def load_rgb(path: Path, resolution: int, box: tuple[float, float, float, float] | None = None) -> Tensor:
    """Decode an image as RGB, crop it to ``box`` (x, y, width, height) if given, resize to R x R: uint8."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot read image {str(path)!r}: {err}") from err
    if box is not None:
        x, y, w, h = box
        im = im.crop((int(x), int(y), int(x + w), int(y + h)))
    im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


class ImageFileSplit(Dataset):
    """Images of one split decoded on access (MiniImageNet, CUB)."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        resolution: int,
        boxes: Sequence[tuple[float, float, float, float]] | None = None,
    ) -> None:
        self.files, self.labels = list(files), torch.as_tensor(list(labels), dtype=torch.long)
        self.class_names, self.resolution, self.boxes = list(class_names), resolution, boxes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        box = self.boxes[index] if self.boxes is not None else None
        return load_rgb(self.files[index], self.resolution, box).float() / 127.5 - 1, self.labels[index]


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------
class FewShotSource:
    """A data set with disjoint train / val / test classes (subclasses define the three methods)."""

    num_channels: int = 3
    resolution: int = 84

    def num_classes(self, split: Split) -> int:
        raise NotImplementedError

    def load_split(self, split: Split) -> Dataset:
        """A data set of the split whose items are ``(x, label)`` with ``labels`` and ``class_names``."""
        raise NotImplementedError


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@lru_cache(maxsize=8)
def _cached_glyphs(class_ids: tuple[int, ...], n: int, size: int, seed: int, style: GlyphStyle) -> Tensor:
    return render_glyph_classes(class_ids, n, size, seed, style)


class GlyphClasses(FewShotSource):
    """Procedural glyphs: class ids 0.. are train, then val, then test (see ``data/glyphs.py``).

    Args:
        n_train_classes, n_val_classes, n_test_classes: classes per split.
        instances_per_class: rendered instances of every class.
        image_size: output size R (32 suits the AMDIM encoder).
        seed: generator seed; the same seed always gives the same glyphs.
        style: stroke and noise parameters (``GlyphStyle``).
    """

    num_channels = 1

    def __init__(
        self,
        n_train_classes: int = 200,
        n_val_classes: int = 50,
        n_test_classes: int = 100,
        instances_per_class: int = 40,
        image_size: int = 32,
        seed: int = 0,
        style: GlyphStyle | None = None,
    ) -> None:
        if min(n_train_classes, n_val_classes, n_test_classes, instances_per_class) < 1:
            raise ValueError("every split needs at least one class and every class at least one instance")
        self.counts = {"train": n_train_classes, "val": n_val_classes, "test": n_test_classes}
        self.instances_per_class, self.resolution, self.seed = instances_per_class, image_size, seed
        self.style = style or GlyphStyle()

    def class_ids(self, split: Split) -> range:
        _check_split(split)
        start = {"train": 0, "val": self.counts["train"], "test": self.counts["train"] + self.counts["val"]}
        return range(start[split], start[split] + self.counts[split])

    def num_classes(self, split: Split) -> int:
        _check_split(split)
        return self.counts[split]

    def load_split(self, split: Split) -> ClassSplitDataset:
        ids = self.class_ids(split)
        glyphs = _cached_glyphs(tuple(ids), self.instances_per_class, self.resolution, self.seed, self.style)
        n_classes, n_inst = glyphs.shape[:2]
        labels = torch.arange(n_classes).repeat_interleave(n_inst)
        return ClassSplitDataset(
            glyphs.reshape(-1, 1, self.resolution, self.resolution), labels, [f"glyph{i}" for i in ids]
        )


class DigitClasses(FewShotSource):
    """scikit-learn's 8x8 digits (1,797 images) as a tiny few-shot sanity set, resized to ``image_size``.

    Args:
        image_size: output size (bilinear resize of the 8x8 images).
        train_classes, val_classes, test_classes: digit classes of each split (val may repeat test: the
            set has only ten classes).
    """

    num_channels = 1

    def __init__(
        self,
        image_size: int = 32,
        train_classes: Sequence[int] = (0, 1, 2, 3, 4),
        val_classes: Sequence[int] = (5, 6, 7, 8, 9),
        test_classes: Sequence[int] = (5, 6, 7, 8, 9),
    ) -> None:
        self.split_classes = {
            "train": list(train_classes),
            "val": list(val_classes),
            "test": list(test_classes),
        }
        for name, classes in self.split_classes.items():
            if not classes or not set(classes) <= set(range(10)) or len(set(classes)) != len(classes):
                raise ValueError(f"{name}_classes must be distinct digits 0-9, got {classes}")
        if set(self.split_classes["train"]) & (
            set(self.split_classes["val"]) | set(self.split_classes["test"])
        ):
            raise ValueError("train_classes must not share a class with val_classes or test_classes")
        self.resolution = image_size

    def num_classes(self, split: Split) -> int:
        _check_split(split)
        return len(self.split_classes[split])

    def load_split(self, split: Split) -> ClassSplitDataset:
        from diffusion_lab.data.digits import load_digits_tensors

        _check_split(split)
        images, digits = load_digits_tensors()  # images in [-1, 1]
        if self.resolution != images.shape[-1]:
            size = (self.resolution, self.resolution)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        classes = self.split_classes[split]
        keep = torch.isin(digits, torch.tensor(classes))
        remap = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([remap[int(d)] for d in digits[keep]])
        return ClassSplitDataset(images[keep], labels, [f"digit{c}" for c in classes])


def read_split_csv(path: Path) -> tuple[list[str], list[str]]:
    """(filenames, class labels) from a ``filename,label`` CSV with a header row (Ravi & Larochelle format)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"split file '{path}' not found; MiniImageNet's train/val/test.csv come from Ravi & Larochelle "
            f"(github.com/twitter-research/meta-learning-lstm, data/miniImagenet)"
        )
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise ValueError(
            f"{path}: expected a header 'filename,label', got {rows[0] if rows else 'an empty file'}"
        )
    body = rows[1:]
    return [r[0] for r in body], [r[1] for r in body]


def _split_from_files(files: list[Path], names: list[str], resolution: int, boxes=None) -> ImageFileSplit:
    class_names = sorted(set(names))
    index = {c: i for i, c in enumerate(class_names)}
    return ImageFileSplit(files, [index[n] for n in names], class_names, resolution, boxes)


class MiniImageNet(FewShotSource):
    """MiniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle 64 / 16 / 20 class split.

    Args:
        root: folder with ``train.csv``, ``val.csv``, ``test.csv`` and ``images/`` (the 60,000 images,
            usually pre-resized to 84x84).
        image_size: output size (84 is standard; Chen et al. use 128 for the AMDIM encoder).
        split_dir: folder of the CSV files if not ``root``.
    """

    EXPECTED = {"train": 64, "val": 16, "test": 20}

    def __init__(self, root: str, image_size: int = 84, split_dir: str | None = None) -> None:
        self.root, self.resolution = Path(root).expanduser(), image_size
        self.split_dir = Path(split_dir).expanduser() if split_dir else self.root

    def num_classes(self, split: Split) -> int:
        _check_split(split)
        return self.EXPECTED[split]

    def load_split(self, split: Split) -> ImageFileSplit:
        _check_split(split)
        filenames, names = read_split_csv(self.split_dir / f"{split}.csv")
        image_dir = self.root / "images"
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"MiniImageNet image folder '{image_dir}' not found (expected root/images/)"
            )
        dataset = _split_from_files([image_dir / f for f in filenames], names, self.resolution)
        if len(dataset.class_names) != self.EXPECTED[split]:
            log.warning(
                "MiniImageNet %s split has %d classes, the standard split has %d",
                split,
                len(dataset.class_names),
                self.EXPECTED[split],
            )
        return dataset


class CUB(FewShotSource):
    """CUB-200-2011 birds with the 100 / 50 / 50 class split of Chen et al. (2019), bounding-box crops.

    Args:
        root: the ``CUB_200_2011`` folder (``images.txt``, ``image_class_labels.txt``,
            ``bounding_boxes.txt``, ``images/``).
        image_size: output size (84 standard, 128 for the AMDIM encoder).
        crop_to_bbox: crop each bird to its annotated bounding box before resizing.
        split_dir: optional folder with ``train.csv`` / ``val.csv`` / ``test.csv`` (``filename,label``,
            filenames relative to ``root/images``) replacing the default split rule.
    """

    def __init__(
        self, root: str, image_size: int = 84, crop_to_bbox: bool = True, split_dir: str | None = None
    ) -> None:
        self.root, self.resolution = Path(root).expanduser(), image_size
        self.crop_to_bbox, self.split_dir = crop_to_bbox, Path(split_dir).expanduser() if split_dir else None

    def num_classes(self, split: Split) -> int:
        _check_split(split)
        return {"train": 100, "val": 50, "test": 50}[split]

    @staticmethod
    def split_of_class(index: int) -> Split | None:
        """Chen et al. (2019) rule over the 0-based sorted class index; ``None`` never happens for 0..199."""
        if index % 2 == 0:
            return "train"
        return "val" if index % 4 == 1 else "test"

    def _table(self, name: str) -> list[list[str]]:
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CUB file '{path}' not found: root must be the extracted CUB_200_2011 folder "
                f"(www.vision.caltech.edu/datasets/cub_200_2011)"
            )
        return [line.split() for line in path.read_text().splitlines() if line.strip()]

    def load_split(self, split: Split) -> ImageFileSplit:
        _check_split(split)
        paths = {row[0]: row[1] for row in self._table("images.txt")}
        boxes = {row[0]: tuple(float(v) for v in row[1:5]) for row in self._table("bounding_boxes.txt")}
        by_path = {p: i for i, p in paths.items()}
        if self.split_dir is not None:
            filenames, names = read_split_csv(self.split_dir / f"{split}.csv")
            image_ids = [by_path.get(f) for f in filenames]
        else:
            labels = {row[0]: int(row[1]) - 1 for row in self._table("image_class_labels.txt")}
            image_ids = [i for i in paths if self.split_of_class(labels[i]) == split]
            names = [
                paths[i].split("/")[0] for i in image_ids
            ]  # class folder, e.g. 001.Black_footed_Albatross
            filenames = [paths[i] for i in image_ids]
        image_boxes = None
        if self.crop_to_bbox:
            missing = [f for f, i in zip(filenames, image_ids) if i is None or i not in boxes]
            if missing:
                raise ValueError(f"no bounding box for {len(missing)} images, e.g. {missing[:3]}")
            image_boxes = [boxes[i] for i in image_ids]
        return _split_from_files(
            [self.root / "images" / f for f in filenames], names, self.resolution, image_boxes
        )


# ---------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------
class FewShotDataModule(DataModuleBase):
    """Pretraining batches or training episodes, plus fixed validation / test episodes, from one source.

    Args:
        source: a ``FewShotSource`` (``GlyphClasses``, ``DigitClasses``, ``MiniImageNet``, ``CUB``).
        train_mode: ``images`` (shuffled batches of the pretraining classes) or ``episodes``.
        pretrain_splits: splits whose classes form the pretraining set (``["train", "val"]`` is Chen et al.'s
            "mini80" setting; validation accuracy is then not a held-out measure). ``test`` is refused.
        train_way, train_shot, train_query, train_episodes: training episodes (per epoch).
        eval_way, eval_shots, eval_query: validation / test episodes, one loader per shot count.
        val_episodes, test_episodes: episodes per evaluation loader (600 is the common test protocol).
        seed: seed of all episodes (validation and test episodes are fixed; training ones vary by epoch).
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase`` (batches of
            the ``images`` mode; episodes are their own batches).

    Shape properties (known at init): ``num_channels``, ``resolution``, ``num_classes`` (the number of
    pretraining classes, for a supervised head).
    """

    def __init__(
        self,
        source: FewShotSource,
        train_mode: Literal["images", "episodes"] = "images",
        pretrain_splits: Sequence[Literal["train", "val"]] = ("train",),
        train_way: int = 5,
        train_shot: int = 1,
        train_query: int = 15,
        train_episodes: int = 100,
        eval_way: int = 5,
        eval_shots: Sequence[int] = (1, 5),
        eval_query: int = 15,
        val_episodes: int = 100,
        test_episodes: int = 600,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if train_mode not in ("images", "episodes"):
            raise ValueError(f"train_mode must be 'images' or 'episodes', got {train_mode!r}")
        pretrain_splits = list(pretrain_splits)
        if not pretrain_splits or not set(pretrain_splits) <= {"train", "val"}:
            raise ValueError(
                f"pretrain_splits must be a non-empty subset of ['train', 'val'], got {pretrain_splits}"
            )
        if not eval_shots or min(eval_shots) < 1:
            raise ValueError(
                f"eval_shots must be a non-empty list of positive shot counts, got {list(eval_shots)}"
            )
        self.source, self.train_mode, self.pretrain_splits = source, train_mode, pretrain_splits
        self.train_episode = (train_way, train_shot, train_query, train_episodes)
        self.eval_way, self.eval_shots, self.eval_query = eval_way, list(eval_shots), eval_query
        self.val_episodes, self.test_episodes, self.seed = val_episodes, test_episodes, seed
        self.splits: dict[str, Dataset] = {}

    @property
    def num_channels(self) -> int:
        return self.source.num_channels

    @property
    def resolution(self) -> int:
        return self.source.resolution

    @property
    def num_classes(self) -> int:
        return sum(self.source.num_classes(s) for s in self.pretrain_splits)

    def split(self, name: Split) -> Dataset:
        """The data set of one split (loaded once)."""
        _check_split(name)
        if name not in self.splits:
            self.splits[name] = self.source.load_split(name)
        return self.splits[name]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._pretraining_set() if self.train_mode == "images" else self.split("train")
        if stage in (None, "fit", "validate"):
            self.val_set = self.split("val")
        if stage in (None, "test"):
            self.test_set = self.split("test")

    def _pretraining_set(self) -> Dataset:
        """Union of the pretraining splits with labels offset so classes stay distinct (0..num_classes-1)."""
        parts, offset = [], 0
        for name in self.pretrain_splits:
            part = self.split(name)
            parts.append(_OffsetLabels(part, offset))
            offset += len(part.class_names)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def episode_loader(
        self, dataset: Dataset, way: int, shot: int, query: int, episodes: int, fixed: bool, seed: int
    ) -> EpisodeLoader:
        """Episodes of ``dataset``, sharded over the ranks of the attached Trainer (if any)."""
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpisodeSampler(
            dataset.labels,
            way,
            shot,
            query,
            episodes,
            seed=seed,
            fixed=fixed,
            rank=rank,
            world_size=world_size,
        )
        return EpisodeLoader(dataset, sampler, self.num_workers, bool(self.pin_memory))

    def _eval_loaders(self, split: Split, episodes: int) -> list[EpisodeLoader]:
        dataset = self.split(split)
        return [
            self.episode_loader(dataset, self.eval_way, shot, self.eval_query, episodes, True, self.seed)
            for shot in self.eval_shots
        ]

    def train_dataloader(self) -> DataLoader | EpisodeLoader:
        if self.train_mode == "images":
            return super().train_dataloader()
        way, shot, query, episodes = self.train_episode
        return self.episode_loader(self.split("train"), way, shot, query, episodes, False, self.seed)

    def val_dataloader(self) -> list[EpisodeLoader]:
        return self._eval_loaders("val", self.val_episodes)

    def test_dataloader(self) -> list[EpisodeLoader]:
        return self._eval_loaders("test", self.test_episodes)


class _OffsetLabels(Dataset):
    """A split with its labels shifted by ``offset`` (to concatenate splits without merging classes)."""

    def __init__(self, dataset: Dataset, offset: int) -> None:
        self.dataset, self.offset = dataset, offset
        self.labels = dataset.labels + offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index]
        return x, y + self.offset


__all__ = [
    "CUB",
    "ClassSplitDataset",
    "DigitClasses",
    "FewShotDataModule",
    "FewShotSource",
    "GlyphClasses",
    "ImageFileSplit",
    "MiniImageNet",
    "read_split_csv",
]
