"""Source / target pairs for image translation (DiffuseIT): a target image, a target prompt, or both.

Three ways to list them:

* a **YAML file**: a list of entries (or ``{pairs: [...]}``), paths relative to the file's folder::

      - {source: cat.png, prompt: "a photo of a tiger", source_prompt: "a photo of a cat"}
      - {source: skimage:chelsea, target: skimage:coffee}

* a **folder** ``root/source/<name>.<ext>`` with ``root/target/<name>.<ext>`` (target image) and/or
  ``root/target/<name>.txt`` (line 1: target prompt, optional line 2: source prompt);
* the same entries **inline** in the DataModule's YAML (``pairs: [...]``, paths relative to the working
  folder).

``skimage:<name>`` names an image bundled with scikit-image (``astronaut``, ``chelsea``, ``coffee``, ``rocket``,
...), so examples run offline. Images are loaded by :func:`~diffusion_lab.data.image_folder.load_image`
(shorter side resized, centre crop, RGB, [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.image_folder import IMAGE_EXTENSIONS, Interpolation, load_image

SKIMAGE_PREFIX = "skimage:"


@dataclass
class TranslationPair:
    """One translation job: ``source`` image, and a ``target`` image and/or a target ``prompt``."""

    source: str
    target: str | None = None
    prompt: str = ""
    source_prompt: str = ""
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.target and not self.prompt:
            raise ValueError(f"pair with source {self.source!r} has neither a target image nor a prompt")


def skimage_image_path(name: str) -> Path:
    """The file of an image bundled with scikit-image (``skimage.data``), by name (``chelsea``, ``coffee``)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    found = sorted(p for p in folder.iterdir() if p.stem == name and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        bundled = sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        raise FileNotFoundError(
            f"scikit-image bundles no image named {name!r}; bundled: {', '.join(bundled)}"
        )
    return found[0]


def resolve_image(spec: str, base: Path) -> Path:
    """``skimage:<name>`` or a path (relative to ``base``) -> an existing file."""
    if spec.startswith(SKIMAGE_PREFIX):
        return skimage_image_path(spec[len(SKIMAGE_PREFIX) :])
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"image {spec!r} not found (looked for {str(path)!r})")
    return path


def _entry(item: Mapping[str, Any] | TranslationPair, where: str) -> TranslationPair:
    if isinstance(item, TranslationPair):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(
            f"{where}: each pair must be a mapping with 'source' and 'target'/'prompt', got {item!r}"
        )
    allowed = {f.name for f in fields(TranslationPair)}
    unknown = sorted(set(item) - allowed)
    if unknown or "source" not in item:
        raise ValueError(
            f"{where}: pair {dict(item)} has unknown keys {unknown} or no 'source'; allowed: {sorted(allowed)}"
        )
    return TranslationPair(
        **{k: ("" if v is None and k in ("prompt", "source_prompt") else v) for k, v in item.items()}
    )


def _pairs_from_folder(root: Path) -> list[TranslationPair]:
    source_dir, target_dir = root / "source", root / "target"
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"pair folder {str(root)!r} has no 'source' subfolder (expected source/ and target/)"
        )
    pairs = []
    for src in sorted(p for p in source_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        targets = sorted(p for p in target_dir.glob(f"{src.stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        text = target_dir / f"{src.stem}.txt"
        lines = [line.strip() for line in text.read_text().splitlines()] if text.is_file() else []
        if not targets and not any(lines):
            raise FileNotFoundError(
                f"source {src.name} has no target/{src.stem}.<image> and no target/{src.stem}.txt"
            )
        pairs.append(
            TranslationPair(
                source=str(src),
                target=str(targets[0]) if targets else None,
                prompt=lines[0] if lines else "",
                source_prompt=lines[1] if len(lines) > 1 else "",
                name=src.stem,
            )
        )
    if not pairs:
        raise FileNotFoundError(f"no source images in {str(source_dir)!r}")
    return pairs


def read_pairs(pairs: str | Path | Sequence[Mapping[str, Any] | TranslationPair]) -> list[TranslationPair]:
    """Pairs from a YAML file, a folder, or a list of entries, with image paths resolved to absolute files."""
    if isinstance(pairs, (str, Path)):
        path = Path(pairs).expanduser()
        if path.is_dir():
            entries, base = _pairs_from_folder(path), path
        elif path.is_file():
            loaded = yaml.safe_load(path.read_text())
            loaded = loaded.get("pairs") if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, list) or not loaded:
                raise ValueError(
                    f"{str(path)!r} must hold a non-empty YAML list of pairs (or {{pairs: [...]}})"
                )
            entries, base = [_entry(item, str(path)) for item in loaded], path.parent
        else:
            raise FileNotFoundError(f"pairs {str(path)!r} is neither a YAML file nor a folder")
    else:
        if not pairs:
            raise ValueError("pairs is empty: give at least one {source, target/prompt} entry")
        entries, base = [_entry(item, "pairs") for item in pairs], Path.cwd()
    out = []
    for entry in entries:
        source = resolve_image(entry.source, base)
        target = resolve_image(entry.target, base) if entry.target else None
        name = entry.name or Path(source).stem
        out.append(
            TranslationPair(
                str(source), str(target) if target else None, entry.prompt, entry.source_prompt, name
            )
        )
    return out


class PairDataset(Dataset):
    """Items ``dict(source, target, has_target, prompt, source_prompt, name, index)``; ``target`` is zeros and
    ``has_target`` False for prompt-only pairs."""

    def __init__(
        self, pairs: Sequence[TranslationPair], resolution: int, interpolation: Interpolation
    ) -> None:
        self.pairs, self.resolution, self.interpolation = list(pairs), resolution, interpolation

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: str) -> Tensor:
        return load_image(Path(path), self.resolution, 3, self.interpolation).float() / 127.5 - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        source = self._load(pair.source)
        target = self._load(pair.target) if pair.target else torch.zeros_like(source)
        return {
            "source": source,
            "target": target,
            "has_target": pair.target is not None,
            "prompt": pair.prompt,
            "source_prompt": pair.source_prompt,
            "name": f"{index:04d}_{pair.name}",
            "index": index,
        }


class TranslationPairs(LightningDataModule):
    """Translation pairs for ``predict`` / ``test`` (see the module docstring for the three formats).

    Args:
        pairs: a YAML file, a folder, or a list of ``{source, target, prompt, source_prompt, name}`` entries.
        resolution: image size (the diffusion model's).
        batch_size, num_workers: loader settings (DiffuseIT runs one image at a time: batch_size 1).
        interpolation: PIL filter of the resize (the public code: lanczos).

    The pairs are read and checked in ``__init__``: a missing file fails before any model is loaded.
    """

    def __init__(
        self,
        pairs: str | list[dict[str, Any]],
        resolution: int = 256,
        batch_size: int = 1,
        num_workers: int = 0,
        interpolation: Interpolation = "lanczos",
    ) -> None:
        super().__init__()
        if resolution < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need resolution >= 1, batch_size >= 1, num_workers >= 0; "
                f"got {resolution}, {batch_size}, {num_workers}"
            )
        self.pairs = read_pairs(pairs)
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.dataset = PairDataset(self.pairs, resolution, interpolation)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()


__all__ = [
    "PairDataset",
    "TranslationPair",
    "TranslationPairs",
    "read_pairs",
    "resolve_image",
    "skimage_image_path",
]
