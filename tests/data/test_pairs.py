"""Translation pairs from a YAML file, a folder and inline entries; clear errors for bad entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.pairs import TranslationPairs, read_pairs, skimage_image_path


def _png(path, value: int, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_yaml_list_with_relative_paths_and_bundled_images(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 255)
    (tmp_path / "pairs.yaml").write_text(
        "- {source: imgs/a.png, prompt: a tiger, source_prompt: a cat}\n"
        "- {source: 'skimage:chelsea', target: imgs/a.png, name: cat}\n"
    )
    data = TranslationPairs(str(tmp_path / "pairs.yaml"), resolution=8)
    items = [data.dataset[i] for i in range(2)]
    assert items[0]["prompt"] == "a tiger" and items[0]["source_prompt"] == "a cat"
    assert not items[0]["has_target"] and torch.equal(items[0]["target"], torch.zeros(3, 8, 8))
    assert torch.equal(items[0]["source"], torch.ones(3, 8, 8))  # 255 -> 1
    assert items[1]["has_target"] and items[1]["name"] == "0001_cat"
    assert data.pairs[1].source == str(skimage_image_path("chelsea"))
    batch = next(iter(data.predict_dataloader()))
    assert batch["source"].shape == (1, 3, 8, 8) and batch["index"].tolist() == [0]


def test_folder_layout_pairs_sources_with_target_images_and_prompt_files(tmp_path):
    _png(tmp_path / "source" / "x.png", 0)
    _png(tmp_path / "source" / "y.jpg", 128)
    _png(tmp_path / "target" / "x.png", 255)
    (tmp_path / "target" / "y.txt").write_text("a painting\na photo\n")
    pairs = read_pairs(str(tmp_path))
    assert [p.name for p in pairs] == ["x", "y"]
    assert pairs[0].target.endswith("x.png") and pairs[0].prompt == ""
    assert pairs[1].target is None and (pairs[1].prompt, pairs[1].source_prompt) == ("a painting", "a photo")


def test_inline_entries_and_errors(tmp_path):
    assert read_pairs([{"source": "skimage:coffee", "prompt": "tea"}])[0].name == "coffee"
    with pytest.raises(ValueError, match="neither a target image nor a prompt"):
        read_pairs([{"source": "skimage:coffee"}])
    with pytest.raises(ValueError, match="unknown keys"):
        read_pairs([{"source": "skimage:coffee", "prompt": "x", "style": "y"}])
    with pytest.raises(FileNotFoundError, match="bundles no image named 'kitten'"):
        read_pairs([{"source": "skimage:kitten", "prompt": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_pairs([{"source": str(tmp_path / "missing.png"), "prompt": "x"}])
    with pytest.raises(FileNotFoundError, match="neither a YAML file nor a folder"):
        read_pairs(str(tmp_path / "nothing.yaml"))
    _png(tmp_path / "source" / "z.png", 0)
    with pytest.raises(FileNotFoundError, match="no target/z"):
        read_pairs(str(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        TranslationPairs([{"source": "skimage:coffee", "prompt": "x"}], batch_size=0)
