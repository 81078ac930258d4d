"""Stateful data order: stopping after any batch and resuming yields exactly the batches an uninterrupted
loader would have produced; ranks partition each epoch; RNG state round-trips (exact resume's parts)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from diffusion_lab.reliability import (
    ResumableDataLoader,
    ResumableSampler,
    capture_rng_state,
    restore_rng_state,
)

DATA = TensorDataset(torch.arange(50))


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch[0].tolist() for batch in loader]


def test_order_is_distributed_samplers_seeded_permutation():
    for epoch in (0, 3):
        ours = ResumableSampler(DATA, seed=7)
        ours.set_epoch(epoch)
        reference = DistributedSampler(DATA, num_replicas=1, rank=0, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        assert list(ours) == list(reference)
    assert sorted(ResumableSampler(DATA, seed=7)) == list(range(50))


@pytest.mark.parametrize("stop_after", [0, 1, 4, 6])
def test_stop_after_any_batch_and_resume_gives_the_remaining_batches(stop_after):
    """7 batches per epoch; the loop stops after consuming batch ``stop_after`` (6: the epoch's last)."""
    reference = ResumableDataLoader.for_training(DATA, batch_size=8, seed=3)
    expected = _epoch(reference, 0) + _epoch(reference, 1)

    first = ResumableDataLoader.for_training(DATA, batch_size=8, seed=3)
    first.sampler.set_epoch(0)
    consumed = []
    for batch in first:
        consumed.append(batch[0].tolist())
        if len(consumed) == stop_after + 1:
            break
    state = first.state_dict()
    assert state == {"seed": 3, "epoch": 0, "batches": stop_after + 1, "num_replicas": 1}

    resumed = ResumableDataLoader.for_training(DATA, batch_size=8, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert consumed + _epoch(resumed, 0) + _epoch(resumed, 1) == expected


def test_ranks_partition_the_epoch_and_keep_their_position():
    loaders = [ResumableDataLoader.for_training(DATA, 5, seed=1, num_replicas=2, rank=r) for r in range(2)]
    shares = [sum(_epoch(loader, 2), []) for loader in loaders]
    assert sorted(shares[0] + shares[1]) == list(range(50)) and not set(shares[0]) & set(shares[1])
    state = loaders[1].state_dict()
    assert state["num_replicas"] == 2 and state["batches"] == 5 and state["epoch"] == 2


def test_resuming_with_other_rank_count_keeps_the_epoch_fraction(caplog):
    loader = ResumableDataLoader.for_training(DATA, 5, seed=1, num_replicas=1)
    loader.load_state_dict({"seed": 1, "epoch": 0, "batches": 4, "num_replicas": 2})
    loader.sampler.set_epoch(0)
    assert len(list(loader)) == 10 - 8  # 4 batches of 2 ranks = 8 of this single rank's 10
    assert "not sample-exactly" in caplog.text


def test_bad_state_and_arguments_are_named():
    loader = ResumableDataLoader.for_training(DATA, 5)
    with pytest.raises(ValueError, match=r"lacks \['batches'\]"):
        loader.load_state_dict({"seed": 0, "epoch": 0})
    with pytest.raises(ValueError, match="num_replicas >= 1 and 0 <= rank < num_replicas, got 2, 2"):
        ResumableSampler(DATA, num_replicas=2, rank=2)


def test_rng_state_round_trip_for_torch_numpy_and_python():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # leave a cached Gaussian behind in NumPy's legacy state
    state = capture_rng_state()
    first = (torch.randn(4), np.random.randn(4), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restore_rng_state(state)
    second = (torch.randn(4), np.random.randn(4), random.random(), random.gauss(0, 1))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]
    # the state is weights-only serialisable
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    assert torch.equal(torch.randn(4), first[0])
