"""Reference statistics: exact moments, batch accumulation, caching and cache keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lab.data.digits import Digits
from diffusion_lab.metrics import reference_stats as rs
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.reference_stats import ReferenceStats


def test_moments_equal_numpy():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = ReferenceStats.from_features(x, max_features=50)
    assert np.allclose(stats.mean.numpy(), x.double().numpy().mean(0), atol=1e-12)
    assert np.allclose(stats.cov.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-10)
    assert stats.num_samples == 200 and stats.features.shape == (50, 5)
    # the subset is real rows of x, drawn reproducibly
    assert all(any(torch.equal(row, y) for y in x) for row in stats.features[:5])
    assert torch.equal(stats.features, ReferenceStats.from_features(x, max_features=50).features)


def test_batched_computation_equals_one_shot():
    extractor = build_feature_extractor("feature_net")
    images = torch.rand(70, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(70)), batch_size=16)
    batched = rs.compute_reference_stats(extractor, loader, progress=False)
    # the same float32 features (a convolution's result depends on the batch size at the 1e-7 level)
    features = torch.cat([extractor(x)[0] for x, _ in loader]).double().numpy()
    assert np.allclose(batched.mean.numpy(), features.mean(0), atol=1e-12)
    assert np.allclose(batched.cov.numpy(), np.cov(features, rowvar=False), atol=1e-10)
    one_shot = ReferenceStats.from_features(extractor(images)[0], key=extractor.key)
    assert torch.allclose(batched.cov, one_shot.cov, atol=1e-5)
    assert batched.key == extractor.key and batched.num_samples == 70


def test_save_load_round_trip_leaves_no_temporary_files(tmp_path):
    stats = ReferenceStats.from_features(torch.randn(30, 3), key="feature_net-x-1234")
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    loaded = ReferenceStats.load(path)
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    assert torch.equal(loaded.features, stats.features)
    assert (loaded.num_samples, loaded.key) == (30, "feature_net-x-1234")
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]


def test_cache_key_separates_dataset_split_resolution_and_extractor(tmp_path):
    base = ("digits", "train", 8, "feature_net-a")
    paths = {rs.reference_stats_path(tmp_path, *base)}
    for i, other in enumerate(["cifar10", "val", 16, "inception-b"]):
        args = list(base)
        args[i] = other
        paths.add(rs.reference_stats_path(tmp_path, *args))
    assert len(paths) == 5
    dm = Digits(resolution=16)
    assert rs.datamodule_reference_path(dm, "val", "k", tmp_path).name == "digits-val-16px-k.safetensors"


def test_load_or_compute_computes_once(tmp_path, monkeypatch):
    extractor = build_feature_extractor("feature_net")
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    path = tmp_path / "s.safetensors"
    first = rs.load_or_compute_reference_stats(
        path, extractor, DataLoader(TensorDataset(images), batch_size=8)
    )
    monkeypatch.setattr(rs, "compute_reference_stats", lambda *a, **k: pytest.fail("recomputed cached stats"))
    second = rs.load_or_compute_reference_stats(path, extractor, None)
    assert torch.equal(first.cov, second.cov)


def test_stale_or_missing_cache_errors(tmp_path):
    extractor = build_feature_extractor("feature_net")
    path = tmp_path / "s.safetensors"
    with pytest.raises(FileNotFoundError, match="no data was given"):
        rs.load_or_compute_reference_stats(path, extractor, None)
    with pytest.raises(FileNotFoundError, match="tools/fid_stats.py"):
        ReferenceStats.load(path)
    ReferenceStats.from_features(torch.randn(10, 64), key="feature_net-other-0000").save(path)
    with pytest.raises(ValueError, match="were computed with 'feature_net-other-0000'"):
        rs.load_or_compute_reference_stats(path, extractor, None)


def test_images_from_batch_formats():
    x = torch.zeros(2, 1, 8, 8)
    assert rs.images_from_batch(x) is x
    assert rs.images_from_batch((x, torch.zeros(2))) is x
    assert rs.images_from_batch({"image": x}) is x
    with pytest.raises(TypeError, match="cannot find the images"):
        rs.images_from_batch({"label": x})
