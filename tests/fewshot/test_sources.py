"""MiniImageNet / CUB readers on tiny fake folders, and the digits sanity split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.fewshot import CUB, DigitClasses, FewShotDataModule, MiniImageNet


def _png(path, value, size=(10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size[::-1], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def mini_root(tmp_path):
    """3 / 2 / 2 classes x 4 images; each image's grey level encodes (class, index)."""
    splits = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
    for split, wnids in splits.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for i in range(4):
                name = f"{wnid}{i:08d}.jpg"
                _png(tmp_path / "images" / name, 10 * int(wnid[1:]) + i)
                rows.append(f"{name},{wnid}")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_miniimagenet_reads_the_csv_split(mini_root):
    source = MiniImageNet(str(mini_root), image_size=8)
    names = {s: set(source.load_split(s).class_names) for s in ("train", "val", "test")}
    assert names == {"train": {"n01", "n02", "n03"}, "val": {"n04", "n05"}, "test": {"n06", "n07"}}
    test = source.load_split("test")
    x, y = test[5]  # second class (n07), image 1: PNG value 71 (PNG is lossless)
    assert x.shape == (3, 8, 8) and test.class_names[int(y)] == "n07"
    assert torch.allclose(x, torch.full_like(x, 71 / 127.5 - 1))


def test_miniimagenet_episodes_stay_in_split(mini_root):
    dm = FewShotDataModule(
        MiniImageNet(str(mini_root), image_size=8), eval_way=2, eval_shots=[1], eval_query=2, test_episodes=6
    )
    dm.setup("test")
    test = dm.split("test")
    for batch in dm.test_dataloader()[0]:
        levels = torch.cat([batch["support"], batch["query"]])[:, 0, 0, 0].add(1).mul(127.5).round().int()
        assert set((levels // 10).tolist()) <= {6, 7}  # grey level // 10 = class number of n06 / n07
        assert {test.class_names[int(c)] for c in batch["classes"]} <= {"n06", "n07"}


def test_miniimagenet_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        MiniImageNet(str(tmp_path)).load_split("train")
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="filename,label"):
        MiniImageNet(str(tmp_path)).load_split("train")


@pytest.fixture
def cub_root(tmp_path):
    """8 classes x 2 images of 12x12; the bounding box (2, 3, 6, 5) is white, the rest black."""
    images, labels, boxes, image_id = [], [], [], 0
    for c in range(8):
        for i in range(2):
            image_id += 1
            rel = f"{c + 1:03d}.Bird{c}/img{i}.png"
            arr = np.zeros((12, 12, 3), dtype=np.uint8)
            arr[3:8, 2:8] = 255
            (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            boxes.append(f"{image_id} 2.0 3.0 6.0 5.0")
    for name, lines in {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "bounding_boxes.txt": boxes,
    }.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_cub_split_rule_and_bbox_crop(cub_root):
    source = CUB(str(cub_root), image_size=6)
    names = {s: source.load_split(s).class_names for s in ("train", "val", "test")}
    # 0-based class i: train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3
    assert names["train"] == ["001.Bird0", "003.Bird2", "005.Bird4", "007.Bird6"]
    assert names["val"] == ["002.Bird1", "006.Bird5"]
    assert names["test"] == ["004.Bird3", "008.Bird7"]
    x, _ = source.load_split("val")[0]
    assert torch.allclose(x, torch.ones_like(x))  # only the white box is left after cropping
    x_full, _ = CUB(str(cub_root), image_size=6, crop_to_bbox=False).load_split("val")[0]
    assert x_full.min() < 0  # without the crop the black border is still there
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        CUB(str(cub_root / "nowhere")).load_split("train")


def test_digit_split_is_disjoint_and_complete():
    source = DigitClasses(image_size=8)
    train, test = source.load_split("train"), source.load_split("test")
    assert train.class_names == [f"digit{c}" for c in range(5)]
    assert test.class_names == [f"digit{c}" for c in range(5, 10)]
    assert len(train) + len(test) == 1797
    with pytest.raises(ValueError, match="must not share"):
        DigitClasses(train_classes=[0, 1, 5])
