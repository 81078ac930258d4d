"""Shared data pieces: the stratified split, uint8 mapping, loader options."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset, stratified_split


def test_stratified_split_counts_per_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, val = stratified_split(labels, 0.3, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(16))
    assert [int((labels[val] == c).sum()) for c in range(3)] == [
        3,
        2,
        0,
    ]  # round(3.0), round(1.5), round(0.3)
    assert torch.equal(val, torch.sort(val).values)
    assert stratified_split(labels, 0.0)[1].numel() == 0
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        stratified_split(labels, 1.0)


def test_uint8_images_map_to_minus_one_one_and_flip():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 2)
    x, y = TensorImageDataset(images, torch.tensor([4]))[0]
    assert torch.equal(x, torch.tensor([[[-1.0, 1.0]]])) and y.dtype == torch.int64
    torch.manual_seed(0)
    flips = [
        float(TensorImageDataset(images, torch.tensor([4]), random_flip=True)[0][0][0, 0, 0])
        for _ in range(100)
    ]
    assert 25 < flips.count(1.0) < 75


class _Tiny(DataModuleBase):
    num_channels, resolution, num_classes = 1, 2, 1

    def setup(self, stage=None):
        self.train_set = TensorImageDataset(torch.zeros(10, 1, 2, 2), torch.zeros(10))


def test_loader_options_and_missing_val_split():
    dm = _Tiny(batch_size=4, val_batch_size=8, num_workers=2, drop_last=True)
    loader = dm.train_dataloader()
    assert loader.batch_size == 4 and loader.persistent_workers and loader.drop_last
    assert dm.val_dataloader() == []  # Lightning skips validation
    assert _Tiny(num_workers=0).train_dataloader().persistent_workers is False
    assert dm.data_shape == (1, 2, 2)
