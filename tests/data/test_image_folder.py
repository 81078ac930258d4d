"""ImageFolder: classes from subfolders, resize + centre crop, modes, bad files, empty folders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.image_folder import BadImageError, ImageFolder


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8))
    (image.convert(mode) if mode else image).save(path)
    return path


def half_red_half_blue(width: int = 40, height: int = 20) -> np.ndarray:
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2, 0] = 255
    a[:, width // 2 :, 2] = 255
    return a


@pytest.fixture
def two_classes(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        save(tmp_path / "cat" / f"{i}.png", rng.integers(0, 256, (12, 10, 3)))
        save(tmp_path / "dog" / "nested" / f"{i}.PNG", rng.integers(0, 256, (9, 9)), mode="L")
    save(tmp_path / "dog" / "p.png", rng.integers(0, 256, (8, 8, 3)), mode="P")
    save(tmp_path / "dog" / "rgba.png", rng.integers(0, 256, (8, 8, 4)))
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    return tmp_path


def test_classes_from_subfolders(two_classes):
    dm = ImageFolder(str(two_classes), resolution=8)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert (dm.num_channels, dm.resolution, dm.data_shape) == (3, 8, (3, 8, 8))
    assert dm.labels == [0] * 4 + [1] * 6
    x, y = next(iter(ImageFolder(str(two_classes), resolution=8, batch_size=10).train_dataloader()))
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and sorted(y.tolist()) == dm.labels
    assert x.min() >= -1 and x.max() <= 1


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.jpg", np.full((8, 8, 3), 10 * i))
    dm = ImageFolder(str(tmp_path), resolution=8)
    assert dm.num_classes == 1 and dm.classes == [tmp_path.name] and len(dm.files) == 3


def test_shorter_side_resize_then_centre_crop(tmp_path):
    """40x20 half red / half blue -> shorter side 8 gives 16x8, the centre crop keeps columns 4..11:
    four red then four blue columns."""
    save(tmp_path / "a.png", half_red_half_blue(40, 20))
    dm = ImageFolder(str(tmp_path), resolution=8, random_flip=False)
    x, _ = dm.train_dataloader().dataset[0]
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    for col in (0, 1, 2):
        torch.testing.assert_close(x[:, :, col], red[:, None].expand(3, 8), atol=0.02, rtol=0)
    for col in (5, 6, 7):
        torch.testing.assert_close(x[:, :, col], blue[:, None].expand(3, 8), atol=0.02, rtol=0)


def test_crop_without_resize_is_exact(tmp_path):
    """Shorter side already equals the resolution: a pure centre crop (columns 2..9 of 12)."""
    columns = np.tile(np.arange(12, dtype=np.uint8) * 20, (8, 1))  # (8, 12) grayscale, value = 20 * column
    save(tmp_path / "a.png", columns, mode="L")
    x, _ = (
        ImageFolder(str(tmp_path), resolution=8, channels=1, random_flip=False).train_dataloader().dataset[0]
    )
    expected = torch.from_numpy(columns[:, 2:10]).float() / 127.5 - 1
    assert torch.equal(x[0], expected)


def test_box_downsampling_by_two_is_2x2_mean(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    save(tmp_path / "a.png", image, mode="L")
    dm = ImageFolder(str(tmp_path), resolution=8, channels=1, interpolation="box", random_flip=False)
    x, _ = dm.train_dataloader().dataset[0]
    pooled = image.astype(np.float64).reshape(8, 2, 8, 2).mean((1, 3))
    assert np.abs((x[0].numpy() + 1) * 127.5 - pooled).max() <= 1.01  # PIL's fixed-point rounding: 1 level


def test_grayscale_conversion_uses_luma(tmp_path):
    """RGB -> L is ITU-R 601 luma L = (299 R + 587 G + 114 B) / 1000."""
    save(tmp_path / "a.png", np.tile(np.array([200, 100, 50], np.uint8), (8, 8, 1)))
    x, _ = ImageFolder(str(tmp_path), resolution=8, channels=1).train_dataloader().dataset[0]
    luma = (299 * 200 + 587 * 100 + 114 * 50) / 1000
    assert x.shape == (1, 8, 8)
    assert abs(float((x[0, 0, 0] + 1) * 127.5) - luma) <= 0.51


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    x, _ = (
        ImageFolder(str(tmp_path), resolution=8, channels=1, random_flip=False).train_dataloader().dataset[0]
    )
    expected = np.rint(values * (255 / 65535))
    assert np.abs((x[0].numpy() + 1) * 127.5 - expected).max() < 1e-3


def test_random_flip_flips_about_half_the_time(tmp_path):
    save(tmp_path / "a.png", half_red_half_blue(8, 8))
    torch.manual_seed(0)
    flipping = ImageFolder(str(tmp_path), resolution=8, random_flip=True).train_dataloader().dataset
    left_red = [float(flipping[0][0][0, 0, 0]) > 0 for _ in range(200)]
    assert 60 < sum(left_red) < 140
    fixed = ImageFolder(str(tmp_path), resolution=8, random_flip=False).train_dataloader().dataset
    assert all(float(fixed[0][0][0, 0, 0]) > 0 for _ in range(20))


def test_val_split_and_cache_give_the_same_images(two_classes):
    plain = ImageFolder(str(two_classes), resolution=8, val_fraction=0.5, random_flip=False)
    cached = ImageFolder(str(two_classes), resolution=8, val_fraction=0.5, random_flip=False, cache=True)
    plain.setup()
    cached.setup()
    assert len(plain.val_set) == 2 + 3 and len(plain.train_set) == 5
    for a, b in ((plain.train_set, cached.train_set), (plain.val_set, cached.val_set)):
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_empty_folder_error_names_folder_and_extensions_at_setup(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.md").write_text("x")
    empty = ImageFolder(str(tmp_path), resolution=8)  # nothing is scanned before setup
    with pytest.raises(FileNotFoundError, match=rf"no images found in '{tmp_path}'.*\.png"):
        empty.setup("fit")
    missing = ImageFolder(str(tmp_path / "missing"), resolution=8)
    with pytest.raises(FileNotFoundError, match=rf"image folder '{tmp_path / 'missing'}' does not exist"):
        missing.setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = missing.num_classes  # without num_classes given, counting the classes needs the folder


def test_missing_folder_instantiates_with_known_num_classes_and_fails_at_setup(tmp_path, two_classes):
    """A config can name data that is not there yet (the every-config CLI test): with ``num_classes`` given the
    shape is known without the folder; ``setup`` names the folder; a wrong ``num_classes`` is caught there."""
    missing = ImageFolder(str(tmp_path / "imagenet" / "train"), resolution=64, num_classes=1000)
    assert (missing.num_classes, missing.data_shape) == (1000, (3, 64, 64))
    with pytest.raises(FileNotFoundError, match=r"imagenet/train' does not exist"):
        missing.setup("fit")
    wrong = ImageFolder(str(two_classes), resolution=8, num_classes=3)
    with pytest.raises(ValueError, match=r"has 2 classes .* but num_classes=3"):
        wrong.setup("fit")
    right = ImageFolder(str(two_classes), resolution=8, num_classes=2, batch_size=10)
    assert sorted(next(iter(right.train_dataloader()))[1].tolist()) == [0] * 4 + [1] * 6
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ImageFolder(str(two_classes), resolution=8, num_classes=0)


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "not_an_image"])
def test_bad_image_is_named_or_skipped(tmp_path, caplog, kind):
    save(tmp_path / "good.png", np.zeros((8, 8, 3)))
    bad = tmp_path / "bad.png"
    if kind == "zero_byte":
        bad.write_bytes(b"")
    elif kind == "truncated":
        data = save(tmp_path / "tmp.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3))).read_bytes()
        (tmp_path / "tmp.png").unlink()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("hello")
    dataset = ImageFolder(str(tmp_path), resolution=8).train_dataloader().dataset
    index = [p.name for p in dataset.files].index("bad.png")
    with pytest.raises(BadImageError, match="bad.png"):
        dataset[index]
    with caplog.at_level(logging.WARNING):
        dm = ImageFolder(str(tmp_path), resolution=8, on_bad_image="skip")
        dm.setup()
    assert dm.skipped_files == [bad] and len(dm.train_set) == 1
    assert "skipped 1 unreadable images" in caplog.text


def test_bad_arguments(two_classes):
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolder(str(two_classes), resolution=8, channels=2)
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageFolder(str(two_classes), resolution=8, on_bad_image="ignore")
