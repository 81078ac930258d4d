"""CIFAR10: a clear offline error, and the array layout of torchvision's files (faked here)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

from diffusion_lab.data.cifar10 import CIFAR10


def test_properties_without_files():
    dm = CIFAR10(root="/nonexistent")
    assert (dm.num_channels, dm.resolution, dm.num_classes, dm.data_shape) == (3, 32, 10, (3, 32, 32))


def test_missing_files_offline_error_names_root_and_download(tmp_path):
    dm = CIFAR10(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"root='{tmp_path}'.*download: true"):
        dm.setup("fit")


def test_layout_of_torchvision_batches(tmp_path, monkeypatch):
    """Rows of the pickled batches are 3072 bytes, R then G then B planes of 32x32 (row-major);
    images come out as (3, 32, 32) in [-1, 1] via x / 127.5 - 1."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 7]}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(TorchvisionCIFAR10, "_check_integrity", lambda self: True)  # fake files, no md5s
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    dm = CIFAR10(root=str(tmp_path), random_flip=False)
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 2
    row = batches["data_batch_1"]["data"][1]
    x, y = dm.train_set[1]
    assert y == 7
    assert float(x[1, 4, 5]) == pytest.approx(row[1024 + 4 * 32 + 5] / 127.5 - 1, abs=1e-6)  # G, row 4, col 5
    assert torch.equal(x, torch.from_numpy(row.reshape(3, 32, 32)).float() / 127.5 - 1)
