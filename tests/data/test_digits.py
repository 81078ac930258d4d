"""Digits: exact scaling of sklearn's arrays, a disjoint stratified reproducible split, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from diffusion_lab.data.digits import Digits


@pytest.fixture(scope="module")
def sk():
    bunch = load_digits()
    return torch.from_numpy(bunch.images), torch.from_numpy(bunch.target)


def test_shape_properties_are_known_before_setup():
    dm = Digits(resolution=16)
    assert (dm.num_channels, dm.resolution, dm.num_classes, dm.data_shape) == (1, 16, 10, (1, 16, 16))
    assert dm.train_set is None  # nothing was loaded to answer


def test_values_are_exactly_x_over_8_minus_1_and_unflipped(sk):
    images, targets = sk
    dm = Digits()
    dm.setup("fit")
    for indices, dataset in ((dm.train_indices, dm.train_set), (dm.val_indices, dm.val_set)):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        expected = (images[indices] / 8 - 1).float()[:, None]
        assert torch.equal(torch.stack(xs), expected)
        assert torch.equal(torch.stack(ys), targets[indices])
    assert torch.stack(xs).min() == -1 and torch.stack(xs).max() == 1


def test_split_is_disjoint_complete_stratified_and_reproducible(sk):
    _, targets = sk
    dm = Digits(val_fraction=0.1, seed=3)
    dm.setup()
    train, val = set(dm.train_indices.tolist()), set(dm.val_indices.tolist())
    assert not train & val and train | val == set(range(1797))
    for c in range(10):
        n_c = int((targets == c).sum())
        assert int((targets[dm.val_indices] == c).sum()) == round(0.1 * n_c)
    again = Digits(val_fraction=0.1, seed=3)
    again.setup()
    assert torch.equal(again.val_indices, dm.val_indices)
    other = Digits(val_fraction=0.1, seed=4)
    other.setup()
    assert not torch.equal(other.val_indices, dm.val_indices)


def test_nearest_resize_repeats_pixels(sk):
    images, _ = sk
    dm = Digits(resolution=16, resize_mode="nearest")
    dm.setup()
    x, _ = dm.train_set[0]
    raw = (images[dm.train_indices[0]] / 8 - 1).float()
    assert torch.equal(x[0], raw.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_bilinear_resize_interpolates_at_quarter_offsets(sk):
    """With align_corners=False, output pixel j of a 2x upsampling samples source position j/2 - 1/4:
    pixel (3, 5) is 0.75/0.25 weights between source rows 1, 2 and columns 2, 3."""
    images, _ = sk
    dm = Digits(resolution=16, resize_mode="bilinear")
    dm.setup()
    x, _ = dm.train_set[5]
    raw = (images[dm.train_indices[5]] / 8 - 1).double().numpy()
    wr, wc = np.array([0.75, 0.25]), np.array([0.25, 0.75])  # row 1.25 -> (1, 2); col 2.75 -> (2, 3)
    expected = wr @ raw[1:3, 2:4] @ wc
    assert float(x[0, 3, 5]) == pytest.approx(expected, abs=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_loader_batches():
    dm = Digits(batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.test_dataloader().dataset) == len(dm.val_set)


def test_bad_arguments():
    with pytest.raises(ValueError, match="resolution must be >= 8"):
        Digits(resolution=4)
    with pytest.raises(ValueError, match="val_fraction"):
        Digits(val_fraction=1.0)
