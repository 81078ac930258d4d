"""N-way K-shot Q-query episodes over a class-labelled data set (Vinyals et al. 2016; Snell et al. 2017).

``EpisodeSampler`` is a batch sampler: each batch is the index list of one episode, laid out as

    [support: class 0 x K, class 1 x K, ..., class N-1 x K,  query: class 0 x Q, ..., class N-1 x Q]

where "class n" is the n-th class drawn for the episode. ``EpisodeCollate`` turns the loaded batch into a
dict with support / query images and episode labels 0..N-1, so the model needs no episode settings.

Reproducibility: episode ``e`` of epoch ``t`` comes from ``torch.Generator().manual_seed(seed)`` advanced
through episodes in order, with ``seed = base_seed`` for ``fixed`` samplers (validation and test: the same
episodes every time) and ``base_seed + t`` otherwise (training: new episodes each epoch, reproducible). No global
random state is used.

Distributed runs: with ``world_size`` W, rank r takes episodes r, r + W, r + 2W, ... of that same sequence (the
first ``W * (n_episodes // W)``), so the ranks together see each episode once. ``EpisodeLoader`` wraps the
DataLoader so that Lightning neither tries to inject a ``DistributedSampler`` into the episode sampler (it
cannot) nor misses it when calling ``set_epoch`` (it looks for ``loader.sampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


class EpisodeSampler(Sampler[list[int]]):
    """Yield ``n_episodes`` episodes of ``n_way * (k_shot + q_query)`` distinct indices each.

    Args:
        labels: class label of every item of the data set (any integers; only equality matters).
        n_way, k_shot, q_query: classes per episode, support and query images per class.
        n_episodes: episodes per epoch (the length of the loader).
        seed: base seed.
        fixed: same episodes every epoch (validation/test) instead of ``seed + epoch`` (training).
        rank, world_size: this process's share of the episodes (see module docstring).
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        n_episodes: int,
        seed: int = 0,
        fixed: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size or n_episodes < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size <= n_episodes, got rank={rank}, world_size={world_size}, "
                f"n_episodes={n_episodes}"
            )
        if min(n_way, k_shot, n_episodes) < 1 or q_query < 0:
            raise ValueError(
                f"need n_way, k_shot, n_episodes >= 1 and q_query >= 0, got n_way={n_way}, k_shot={k_shot}, "
                f"q_query={q_query}, n_episodes={n_episodes}"
            )
        labels = torch.as_tensor(labels).reshape(-1)
        classes, inverse = torch.unique(labels, return_inverse=True)
        self.class_indices = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
        if len(classes) < n_way:
            raise ValueError(
                f"{n_way}-way episodes need at least {n_way} classes, the data set has {len(classes)}"
            )
        per_class = k_shot + q_query
        too_small = [int(classes[c]) for c, idx in enumerate(self.class_indices) if len(idx) < per_class]
        if too_small:
            raise ValueError(
                f"{k_shot}-shot {q_query}-query episodes need {per_class} images per class; classes "
                f"{too_small[:10]} have fewer"
            )
        self.classes = classes
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.n_episodes, self.seed, self.fixed = n_episodes, seed, fixed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_episodes // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed if self.fixed else self.seed + self.epoch)
        for episode in range(len(self) * self.world_size):
            chosen = torch.randperm(len(self.class_indices), generator=g)[: self.n_way]
            support, query = [], []
            for c in chosen.tolist():
                members = self.class_indices[c]
                picked = members[torch.randperm(len(members), generator=g)[: self.k_shot + self.q_query]]
                support.append(picked[: self.k_shot])
                query.append(picked[self.k_shot :])
            if episode % self.world_size == self.rank:
                yield torch.cat(support + query).tolist()


class EpisodeCollate:
    """Collate one episode's ``(image, label)`` items into a dict (see module docstring for the layout).

    Returns ``support`` (N*K, C, H, W), ``support_labels`` (N*K,), ``query`` (N*Q, C, H, W),
    ``query_labels`` (N*Q,) with episode labels in 0..N-1, ``classes`` (N,) the data set's labels of the
    episode's classes, and the ints ``n_way`` and ``k_shot``.
    """

    def __init__(self, n_way: int, k_shot: int, q_query: int) -> None:
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query

    def __call__(self, items: list[tuple[Tensor, Tensor | int]]) -> dict:
        n, k, q = self.n_way, self.k_shot, self.q_query
        if len(items) != n * (k + q):
            raise ValueError(
                f"an {n}-way {k}-shot {q}-query episode has {n * (k + q)} items, got {len(items)}"
            )
        images = torch.stack([item[0] for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items])
        episode_labels = torch.arange(n)
        return {
            "support": images[: n * k],
            "support_labels": episode_labels.repeat_interleave(k),
            "query": images[n * k :],
            "query_labels": episode_labels.repeat_interleave(q),
            "classes": labels[: n * k : k],
            "n_way": n,
            "k_shot": k,
        }


class EpisodeLoader:
    """Iterable of collated episodes: a DataLoader over ``dataset`` with ``sampler`` as its batch sampler.

    Not a DataLoader itself, so Lightning leaves the sampling alone under DDP (sharding is the sampler's
    ``rank`` / ``world_size``); the episode sampler is exposed as ``sampler`` (so that Lightning's per-epoch
    ``set_epoch`` reaches it) and as ``batch_sampler`` (what it is to the inner DataLoader).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpisodeSampler,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.sampler = self.batch_sampler = sampler
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=EpisodeCollate(sampler.n_way, sampler.k_shot, sampler.q_query),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,  # the batch sampler runs in the main process
            pin_memory=pin_memory,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


def episode_key(n_way: int, k_shot: int) -> str:
    """Name of an episode setting in logs and results, e.g. ``5way1shot``."""
    return f"{n_way}way{k_shot}shot"


__all__ = ["EpisodeCollate", "EpisodeLoader", "EpisodeSampler", "episode_key"]
