"""Stateful data order: a training loader that can stop after any batch and continue at the next one.

The order of an epoch is a pure function of ``(seed, epoch)`` (a seeded ``randperm``, as in
``torch.utils.data.DistributedSampler``), so it needs no random state of its own; the only state is
*where* in the epoch the run is: ``{seed, epoch, batches}``. Lightning saves ``state_dict()`` of any
training loader that has one in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands
it back through ``load_state_dict`` before the first ``iter()`` after a resume, which then starts at
batch ``batches`` of epoch ``epoch``.

Exactness: the indices after a resume are exactly those an uninterrupted run would have drawn. With
``num_workers=0`` item-level randomness (random flips) comes from the global torch RNG, which
``ExactResume`` restores, so batches are bit-identical. With worker processes, each worker's RNG is seeded
per epoch from ``(seed, epoch)`` (the loader's own generator), but after a mid-epoch resume a worker sees
a different subsequence of items, so random augmentations inside workers are not replayed exactly.

The sampler subclasses ``DistributedSampler``, so under DDP Lightning keeps it instead of replacing it;
each rank takes every ``num_replicas``-th index of the shared permutation. Resume with the same number of
ranks for an exact continuation (a different number restarts at the same fraction of the epoch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

__all__ = ["ResumableDataLoader", "ResumableSampler", "default_shuffle_seed"]


def default_shuffle_seed() -> int:
    """The run's global seed (``PL_GLOBAL_SEED``, set by ``seed_everything`` and inherited by DDP ranks), else 0.

    Every rank must shuffle with the same seed so that the ranks' shares partition the epoch; the global RNG
    cannot give that (it may differ per rank), an environment variable set once per run can.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (permutation seeded by ``seed + epoch``) that can start ``start_index`` items in.

    Works without a process group: ``num_replicas=1, rank=0`` is a plain seeded shuffle of the whole set.
    ``start_index`` applies to the next iteration only (the loader sets it when resuming).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with ``state_dict`` / ``load_state_dict``.

    Construct it like a ``DataLoader`` with ``sampler=ResumableSampler(...)`` (see :meth:`for_training`).
    It counts the batches it has *delivered* (not those its workers prefetched), so the saved position is
    the one the training loop reached. Its ``generator`` is re-seeded from ``(seed, epoch)`` at each epoch,
    which makes worker seeds reproducible and keeps the global RNG untouched by ``iter()``.
    """

    @classmethod
    def for_training(
        cls,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        **loader_kwargs: Any,
    ) -> ResumableDataLoader:
        """The training loader of ``dataset``: shuffled by ``seed`` (default :func:`default_shuffle_seed`)."""
        seed = default_shuffle_seed() if seed is None else seed
        sampler = ResumableSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        return cls(
            dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **loader_kwargs
        )

    # position of the current (or last) epoch: (epoch, batches delivered in it)
    _position: tuple[int, int] = (0, 0)
    # position to continue from at the next iter(), set by load_state_dict
    _resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing happens until the first next(), by which time Lightning has called
        # sampler.set_epoch(...) for the epoch about to run (it calls iter() before set_epoch on a resume).
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # replaced (e.g. overfit_batches): plain loader
            yield from super().__iter__()
            return
        epoch, skip = sampler.epoch, 0
        if self._resume_at is not None:
            resume_epoch, resume_batches = self._resume_at
            self._resume_at = None
            if resume_epoch == epoch:
                skip = resume_batches
        sampler.start_index = min(skip * self.batch_size, sampler.num_samples)
        if self.generator is not None:
            # mix seed and epoch into one 63-bit seed (base seed of the workers' RNGs for this epoch)
            self.generator.manual_seed((sampler.seed * 1_000_003 + epoch) % (2**63))
        self._position = (epoch, skip)
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{seed, epoch, batches, num_replicas}``: where the training loop is (plain ints: weights-only safe)."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        epoch, batches = self._position
        return {
            "seed": sampler.seed,
            "epoch": epoch,
            "batches": batches,
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` at the next ``iter()`` (if that iteration is for the saved epoch)."""
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        missing = {"seed", "epoch", "batches"} - set(state)
        if missing:
            raise ValueError(f"data loader state lacks {sorted(missing)}; got keys {sorted(state)}")
        sampler.seed = int(state["seed"])
        sampler.set_epoch(int(state["epoch"]))
        batches = int(state["batches"])
        saved_replicas = int(state.get("num_replicas", sampler.num_replicas))
        if saved_replicas != sampler.num_replicas:
            # each rank's share had saved_replicas ranks; continue at the same fraction of the epoch
            batches = batches * saved_replicas // sampler.num_replicas
            log.warning(
                "resuming with %d ranks from a checkpoint written by %d: the data order continues at the same "
                "fraction of epoch %d, but not sample-exactly",
                sampler.num_replicas,
                saved_replicas,
                sampler.epoch,
            )
        self._resume_at = (int(state["epoch"]), batches)
