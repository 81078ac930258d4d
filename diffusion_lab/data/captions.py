"""Captions of an image folder and their CLIP text embeddings (text conditioning of ``CachedLatents``).

Captions come from one of:

* a CSV file with the columns ``file`` and ``caption`` (``file``: the image's path relative to the image folder,
  or its bare name when that is unique);
* a JSON file mapping those paths (or names) to captions;
* ``txt``: one ``.txt`` file per image, with the image's name and the suffix ``.txt``, next to the image.

A relative CSV/JSON path is looked up next to the image folder (in its parent directory) and then inside it.
Every image needs a caption: a missing one is an error naming the image and the source.

Each caption is embedded once by an open_clip text tower (``pretrained.clip.load_clip``, a local weights file):
the unit-norm pooled CLIP text embedding ``c = f_text(BPE(caption)) / ||f_text(BPE(caption))||`` (Radford et al.
2021), shape (E,).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TXT = "txt"


def caption_file(root: Path, captions: str) -> Path | None:
    """The CSV/JSON file of ``captions`` (None for per-image ``txt`` files); raises naming where it looked."""
    if captions == TXT:
        return None
    path = Path(captions).expanduser()
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(
            f"captions must be a .csv or .json file, or 'txt' (one .txt per image), got {captions!r}"
        )
    candidates = [path] if path.is_absolute() else [root.parent / path, root / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"captions file {captions!r} not found (looked at {', '.join(str(c) for c in candidates)}); it maps each "
        f"image of {str(root)!r} to its caption (CSV columns file,caption or a JSON object)"
    )


def _table(path: Path) -> dict[str, str]:
    if path.suffix.lower() == ".json":
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, Mapping):
            raise ValueError(f"{path} must hold a JSON object mapping image paths to captions")
        return {str(k): str(v) for k, v in table.items()}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path} must have the CSV columns 'file' and 'caption', got {reader.fieldnames}"
            )
        return {row["file"]: row["caption"] for row in reader}


def read_captions(root: Path, files: Sequence[Path], captions: str) -> list[str]:
    """The caption of each of ``files`` (images under ``root``), in order, from ``captions`` (module docstring)."""
    root = Path(root)
    path = caption_file(root, captions)
    if path is None:
        out = []
        for file in files:
            text_file = Path(file).with_suffix(".txt")
            if not text_file.is_file():
                raise FileNotFoundError(
                    f"no caption for image '{file}': expected the text file '{text_file}'"
                )
            out.append(text_file.read_text(encoding="utf-8").strip())
        return out
    table = _table(path)
    names: dict[str, list[str]] = {}
    for key in table:
        names.setdefault(Path(key).name, []).append(key)
    out = []
    for file in files:
        file = Path(file)
        relative = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        key = relative if relative in table else None
        if key is None and len(names.get(file.name, [])) == 1:
            key = names[file.name][0]
        if key is None:
            raise KeyError(f"no caption for image '{relative}' in {path} (keys are paths relative to {root})")
        out.append(table[key])
    return out


@torch.no_grad()
def encode_captions(encoder: Any, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """Unit-norm CLIP text embeddings (N, E) float32 on the CPU of ``captions`` (``encoder.encode_text``)."""
    if not captions:
        raise ValueError("no captions to encode")
    parts = [
        encoder.encode_text(list(captions[i : i + batch_size])) for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(parts).float().cpu().contiguous()


__all__ = ["TXT", "caption_file", "encode_captions", "read_captions"]
