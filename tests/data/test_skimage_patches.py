"""SkimagePatches: crops are exact pieces (or rescalings) of the named scikit-image photographs, in [-1, 1],
seeded, and the validation crops come from a strip of each image that the training crops never touch."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from diffusion_lab.data.skimage_patches import SkimagePatches

R = 16


def _native(images, **kwargs) -> SkimagePatches:
    """Crops of exactly R pixels of the original images (scale R / shorter side: no resizing at all)."""
    short = min(getattr(skimage.data, images[0])().shape[:2])
    dm = SkimagePatches(
        images, resolution=R, scale=(R / short, R / short), num_train=48, num_val=16, **kwargs
    )
    dm.setup("fit")
    return dm


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] crop (3, R, R) -> uint8 (R, R, 3)."""
    return np.rint((x.numpy() + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_native_crops_are_pieces_of_the_named_image(name):
    dm = _native([name], random_flip=False)
    original = getattr(skimage.data, name)()  # skimage's own loader, not ours
    assert tuple(dm.sources[0].shape[1:]) == original.shape[:2]  # not downscaled
    for split, boxes in (("train_set", dm.train_boxes), ("val_set", dm.val_boxes)):
        for k, (i, top, left, side) in enumerate(boxes.tolist()):
            assert i == 0 and side == R
            expected = original[top : top + R, left : left + R]
            np.testing.assert_array_equal(_as_uint8(getattr(dm, split)[k][0]), expected)


def test_crop_is_found_by_brute_force_search_in_its_image_only():
    dm = _native(["chelsea"], random_flip=False)
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()
    windows = image.unfold(1, R, 1).unfold(2, R, 1)  # (3, H-R+1, W-R+1, R, R)
    for k in range(3):
        patch = torch.from_numpy(_as_uint8(dm.train_set[k][0]).transpose(2, 0, 1).copy()).float()
        hits = (windows == patch[:, None, None]).all(-1).all(-1).all(0).nonzero().tolist()
        _, top, left, _ = dm.train_boxes[k].tolist()
        assert [top, left] in hits
    coffee = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float()
    coffee_windows = coffee.unfold(1, R, 1).unfold(2, R, 1)
    patch = torch.from_numpy(_as_uint8(dm.train_set[0][0]).transpose(2, 0, 1).copy()).float()
    assert not (coffee_windows == patch[:, None, None]).all(-1).all(-1).all(0).any()


def test_values_range_and_8bit_grid():
    dm = SkimagePatches(["astronaut", "rocket"], resolution=R, num_train=64, num_val=8)
    dm.setup("fit")
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert x.shape == (64, 3, R, R) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    levels = (x + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    batch, labels = next(iter(dm.val_dataloader()))
    assert batch.shape == (8, 3, R, R) and (labels == 0).all() and dm.num_classes == 0


def test_rescaled_crops_keep_the_mean_colour_of_their_box_in_their_image():
    dm = SkimagePatches(["coffee", "chelsea"], resolution=R, num_train=32, num_val=0, scale=(0.2, 1.0),
                        random_flip=False)  # fmt: skip
    dm.setup("fit")
    originals = [skimage.data.coffee(), skimage.data.chelsea()]
    for source, original in zip(dm.sources, originals):  # working copies: shorter side ceil(R / scale_min)
        assert min(source.shape[1:]) == int(np.ceil(R / 0.2))
        assert abs(source.shape[2] / source.shape[1] - original.shape[1] / original.shape[0]) < 0.01
        expected = torch.from_numpy(original).float().mean((0, 1)) / 255
        torch.testing.assert_close(source.float().mean((1, 2)) / 255, expected, atol=0.01, rtol=0)
    assert set(dm.train_boxes[:, 0].tolist()) == {0, 1} and (dm.train_boxes[:, 3] > R).any()
    for k, (i, top, left, side) in enumerate(dm.train_boxes.tolist()):
        box = dm.sources[i][:, top : top + side, left : left + side].float()
        box_mean = box.mean((1, 2)) / 127.5 - 1
        torch.testing.assert_close(dm.train_set[k][0].mean((1, 2)), box_mean, atol=0.03, rtol=0)


def test_validation_strip_is_never_used_for_training():
    dm = SkimagePatches(
        ["chelsea", "coffee", "rocket"], resolution=R, num_train=300, num_val=60, val_fraction=0.3
    )
    dm.setup("fit")
    for boxes, is_train in ((dm.train_boxes, True), (dm.val_boxes, False)):
        for i, top, left, side in boxes.tolist():
            h, w = dm.sources[i].shape[1:]
            first = dm.split_columns(w)
            assert first == w - round(0.3 * w)
            assert 0 <= top and top + side <= h
            assert (left + side <= first) if is_train else (left >= first and left + side <= w)
    short = [min(s.shape[1:]) for s in dm.sources]
    sides = dm.train_boxes[:, 3].float() / torch.tensor(short)[dm.train_boxes[:, 0]]
    assert sides.min() >= 0.15 - 0.01 and sides.max() <= 1.0 + 0.01
    assert sides.max() > 0.6 and sides.min() < 0.25  # log-uniform over the whole range


def test_deterministic_under_seed():
    def pool(seed):
        dm = SkimagePatches(["chelsea", "astronaut"], resolution=R, num_train=40, num_val=8, seed=seed)
        dm.setup("fit")
        return dm.train_boxes, dm.train_set.images, dm.val_set.images

    a, b, c = pool(3), pool(3), pool(4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=["no_such_image"]), "no_such_image"),
        (dict(images=["camera"]), "camera"),
        (dict(images=[]), "at least one"),
        (dict(scale=(0.5, 0.2)), "scale"),
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(num_train=0), "num_train"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SkimagePatches(**kwargs).setup("fit")
