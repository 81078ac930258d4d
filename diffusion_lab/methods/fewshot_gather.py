"""Contrastive negatives from every DDP rank: gather a batch of features across processes, with gradients.

Under DDP each rank holds ``B_r`` of the ``N = sum_r B_r`` images of a global batch. A contrastive loss that
takes its negatives from the local batch only changes with the number of processes; AMDIM and SimCLR instead
score each local image against the *gathered* batch, as the reference setups do (SimCLR, Chen et al. 2020,
Sec. 2.2: negatives from the whole batch across TPU cores; AMDIM's code: one loss over the batch of all GPUs,
``DataParallel``). With

    L   = (1 / N) sum_{i in all ranks} l_i(F)          (the single-process loss on the whole batch)
    L_r = (W / N) sum_{i in rank r}   l_i(F)          (rank r's loss, ``RankSlice.scale`` = W B_r / N times
                                                       its local mean; 1 for equal batches)

``mean_r L_r = L``. The all-gather's backward sums every rank's gradient into the local shard,
``dL_r'/dF_r`` summed over r', so after DDP averages parameter gradients over the W ranks each rank holds
exactly ``dL / dtheta`` (``torch.distributed.nn.functional.all_gather``: reduce-scatter of the gradients).
Batch norm inside the network still normalises per rank unless the trainer uses ``sync_batchnorm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class RankSlice:
    """Where this rank's rows sit in the gathered batch and how to weight its loss.

    offset: index of this rank's first row in the gathered batch.
    scale: ``world_size * local_rows / total_rows``; multiplying the local mean loss by it makes the average of
        the ranks' losses (what DDP's gradient averaging optimises) the mean over the whole gathered batch.
    """

    offset: int = 0
    scale: float = 1.0


def distributed_world() -> int:
    """Number of processes of the default group; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_rows(*tensors: Tensor) -> tuple[list[Tensor], RankSlice]:
    """Concatenate each tensor over the DDP ranks along dim 0 (rank order), gradients flowing back to each
    rank's own rows; returns the gathered tensors and this rank's ``RankSlice``.

    All tensors must have the same number of rows ``B_r`` (which may differ between ranks: shorter shards are
    padded for the collective and the padding is dropped). Without an initialised process group (or with one
    process) the tensors come back unchanged with ``RankSlice(0, 1.0)``.
    """
    if not tensors:
        raise ValueError("gather_rows needs at least one tensor")
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(
            f"gather_rows: tensors must share their first dimension, got {[t.shape for t in tensors]}"
        )
    world = distributed_world()
    if world == 1:
        return list(tensors), RankSlice()
    from torch.distributed.nn.functional import all_gather  # differentiable; import only under DDP

    rank = dist.get_rank()
    counts = torch.zeros(world, dtype=torch.long, device=tensors[0].device)
    counts[rank] = rows
    dist.all_reduce(counts)  # every rank's row count (a tiny collective)
    sizes = counts.tolist()
    most = max(sizes)
    gathered = []
    for t in tensors:
        padded = t if rows == most else torch.cat([t, t.new_zeros((most - rows, *t.shape[1:]))])
        parts = all_gather(padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    total = sum(sizes)
    return gathered, RankSlice(offset=sum(sizes[:rank]), scale=world * rows / total)


__all__ = ["RankSlice", "distributed_world", "gather_rows"]
