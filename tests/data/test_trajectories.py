"""Trajectory sets round-trip exactly, resume after an interruption, and fail clearly on a truncated shard."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data.trajectories import (
    CorruptTrajectoryError,
    TrajectoryData,
    load_trajectories,
    read_meta,
    shard_path,
    write_trajectories,
)

SHAPE = (1, 2, 2)
SIGMAS = [4.0, 1.0, 0.0]


def _states(noise, labels):
    """A known map: states[:, m] = sigma_m * noise + label (so every value is checkable)."""
    s = torch.tensor(SIGMAS).reshape(1, -1, 1, 1, 1)
    return s * noise[:, None] + labels.reshape(-1, 1, 1, 1, 1).float()


def _write(directory, sample_fn=_states, **kw):
    args = dict(
        num_trajectories=10, data_shape=SHAPE, sigma_start=8.0, sigmas=SIGMAS, num_classes=3,
        shard_size=4, batch_size=3, seed=5, source={"sampler": "test"}, progress=False,
    )  # fmt: skip
    return write_trajectories(directory, sample_fn, **{**args, **kw})


def test_round_trip_noise_from_per_index_seeds_labels_and_states(tmp_path):
    _write(tmp_path)
    meta, t = load_trajectories(tmp_path)
    assert (
        meta["sigmas"] == SIGMAS and meta["num_trajectories"] == 10 and meta["source"] == {"sampler": "test"}
    )
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [
        f"shard_0000{i}.safetensors" for i in range(3)
    ]
    assert torch.equal(t["index"], torch.arange(10))
    assert torch.equal(t["labels"], torch.arange(10) % 3)
    for i in (0, 7):  # noise of trajectory i is randn from seed + i, whatever the batching
        assert torch.equal(t["noise"][i], torch.randn(SHAPE, generator=torch.Generator().manual_seed(5 + i)))
    torch.testing.assert_close(t["states"], _states(t["noise"], t["labels"]), rtol=0, atol=0)


def test_interrupted_run_resumes_with_only_the_missing_shards(tmp_path):
    calls = []

    def flaky(noise, labels):
        calls.append(len(noise))
        if len(calls) == 3:  # fails inside the second shard (shard 0 took two batches: 3 + 1)
            raise KeyboardInterrupt
        return _states(noise, labels)

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, flaky)
    assert shard_path(tmp_path, 0).is_file() and not shard_path(tmp_path, 1).is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written is left under a shard's name
    calls.clear()
    _write(tmp_path, lambda n, l: calls.append(len(n)) or _states(n, l))
    assert sum(calls) == 6  # shards 1 and 2 only
    _, t = load_trajectories(tmp_path)
    torch.testing.assert_close(t["states"], _states(t["noise"], t["labels"]), rtol=0, atol=0)


def test_truncated_shard_gives_an_error_naming_it(tmp_path):
    _write(tmp_path)
    path = shard_path(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(CorruptTrajectoryError, match="shard_00001.safetensors"):
        load_trajectories(tmp_path)
    path.write_bytes(data[:5])  # cut inside the header
    with pytest.raises(CorruptTrajectoryError, match="shard_00001.safetensors.*truncated or corrupt"):
        load_trajectories(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.safetensors.*incomplete"):
        load_trajectories(tmp_path)
    _write(tmp_path)  # a re-run rewrites exactly the bad shard
    load_trajectories(tmp_path)


def test_resume_with_different_settings_is_refused(tmp_path):
    _write(tmp_path)
    with pytest.raises(ValueError, match="sigmas"):
        _write(tmp_path, sigmas=[4.0, 0.5, 0.0])
    with pytest.raises(FileNotFoundError, match="make_trajectories"):
        read_meta(tmp_path / "nowhere")


def test_datamodule_batches_and_metadata(tmp_path):
    _write(tmp_path)
    dm = TrajectoryData(str(tmp_path), val_fraction=0.2, batch_size=4, drop_last=False)
    assert dm.data_shape == SHAPE and dm.num_classes == 3 and dm.sigmas == SIGMAS and dm.sigma_start == 8.0
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    noise, states, labels = next(iter(dm.val_dataloader()))
    assert noise.shape == (2, *SHAPE) and states.shape == (2, 3, *SHAPE)
    torch.testing.assert_close(states, _states(noise, labels), rtol=0, atol=0)
    assert torch.equal(labels, torch.tensor([8, 9]) % 3)
    missing = TrajectoryData(str(tmp_path / "missing"))
    assert missing.data_shape is None and missing.num_classes is None
    assert dm.is_complete() and not missing.is_complete()
    missing.setup("predict")  # predict needs no trajectories
    with pytest.raises(FileNotFoundError, match="make_trajectories"):
        missing.setup("fit")
