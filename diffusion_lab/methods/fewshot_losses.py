"""The math of few-shot SSL as pure tensor functions: AMDIM NCE, SimCLR NT-Xent, ProtoNet logits and the
95% confidence interval of episodic accuracy. The LightningModules in ``fewshot_ssl.py`` and
``fewshot_protonet.py`` only call these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.methods.fewshot_gather import RankSlice, gather_rows


# ---------------------------------------------------------------------------------------------------
# AMDIM (Bachman et al. 2019, Sec. 3.2-3.3), with the constants of Chen et al.'s few-shot code.
# ---------------------------------------------------------------------------------------------------
def tanh_clip(x: Tensor, clip: float) -> Tensor:
    """Soft clipping ``clip * tanh(x / clip)``: identity near 0, bounded by +-clip (AMDIM Sec. 3.3)."""
    return clip * torch.tanh(x / clip)


def _at_least_float32(x: Tensor) -> Tensor:
    """Scores in float32 under mixed precision, float64 inputs kept (exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def amdim_nce(
    src: Tensor, trg: Tensor, clip: float = 20.0, reg_weight: float = 4e-2, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """NCE of predicting target features from source features; returns ``(loss, regulariser)``.

    With ``s[i, j, l] = src[i] . trg[j, :, l] / sqrt(D)`` (raw score of image i's source against location l
    of image j's target) and ``c = tanh_clip(s, clip)``, each positive pair (i, p(i), l), ``p(i) = offset + i``,
    is scored against every location of every *other* image of the target batch:

        loss = -mean_{i,l} [ c[i,p(i),l] - log( exp c[i,p(i),l] + sum_{j != p(i)} sum_m exp c[i,j,m] ) ]
        reg  = reg_weight * mean_{i,j,l} s[i,j,l]^2       (computed before clipping)

    Args:
        src: (B, D) source vectors (a global feature or one sampled local feature per image).
        trg: (N, D, L) or (N, D, H, W) target feature maps, N >= offset + B: the same images as ``src``
            (N = B, offset 0) or a larger batch holding them at rows ``offset .. offset + B - 1`` (the batch
            gathered over DDP ranks, ``fewshot_gather.gather_rows``).
        offset: row of ``src[0]``'s own image in ``trg``.
    """
    if src.ndim != 2 or trg.ndim not in (3, 4) or trg.shape[1] != src.shape[1]:
        raise ValueError(
            f"amdim_nce expects src (B, D) and trg (N, D, L) or (N, D, H, W), got {tuple(src.shape)} "
            f"and {tuple(trg.shape)}"
        )
    batch, dim = src.shape
    total = trg.shape[0]
    if offset < 0 or offset + batch > total:
        raise ValueError(
            f"amdim_nce: src rows offset..offset+B-1 = {offset}..{offset + batch - 1} must lie in the "
            f"{total} target images"
        )
    if total < 2:
        raise ValueError("amdim_nce needs a batch of at least 2 images (negatives come from other images)")
    trg = trg.reshape(total, dim, -1)
    scores = torch.einsum("id,jdl->ijl", _at_least_float32(src), _at_least_float32(trg)) / math.sqrt(dim)
    reg = reg_weight * scores.pow(2).mean()  # (B, N, L)
    scores = tanh_clip(scores, clip)
    rows = torch.arange(batch, device=src.device)
    own = rows + offset
    positive = scores[rows, own]  # (B, L): scores[i, p(i), l]
    is_own = torch.zeros(batch, total, dtype=torch.bool, device=src.device)
    is_own[rows, own] = True
    negatives = scores.masked_fill(is_own[:, :, None], float("-inf")).reshape(batch, -1)
    log_negatives = torch.logsumexp(negatives, dim=1, keepdim=True)  # (B, 1): shared by i's positives
    log_softmax = positive - torch.logaddexp(positive, log_negatives)
    return -log_softmax.mean(), reg


def sample_locations(feature_map: Tensor, index: Tensor) -> Tensor:
    """Pick one location per image: (B, D, H, W) and flat indices (B,) in [0, H*W) -> (B, D)."""
    flat = feature_map.flatten(2)  # (B, D, H*W)
    return flat[torch.arange(flat.shape[0], device=flat.device), :, index]


def amdim_infomax(
    global_1: Tensor,
    local5_1: Tensor,
    local7_1: Tensor,
    global_2: Tensor,
    local5_2: Tensor,
    local7_2: Tensor,
    location_1: Tensor,
    location_2: Tensor,
    clip: float = 20.0,
    reg_weight: float = 4e-2,
    gather: bool = False,
) -> dict[str, Tensor]:
    """AMDIM's three infomax terms between two augmented views, each averaged over both directions.

    ``1t5``: global feature of one view vs every location of the other view's 5x5 map; ``1t7``: global vs
    7x7 map; ``5t5``: the 5x5 feature at a random location (``location_v``, flat index per image) of one view
    vs the other view's 5x5 map. ``reg`` is half the sum of the six directional regularisers and ``loss`` is
    ``1t5 + 1t7 + 5t5 + reg`` (as in AMDIM's ``NCE_MI_MULTI``).

    ``gather=True`` (under DDP): the target maps of all ranks are gathered (``fewshot_gather.gather_rows``,
    gradients flowing back to each rank), so the negatives are every other image of the global batch and each
    term is rank-weighted: the mean of the ranks' terms equals the single-process terms on the whole batch,
    and so do the DDP-averaged gradients. A no-op without a process group.
    """
    src5_1, src5_2 = sample_locations(local5_1, location_1), sample_locations(local5_2, location_2)
    targets, where = [local5_1, local5_2, local7_1, local7_2], RankSlice()
    if gather:
        targets, where = gather_rows(*targets)
    trg5_1, trg5_2, trg7_1, trg7_2 = targets
    pairs = {
        "1t5": ((global_1, trg5_2), (global_2, trg5_1)),
        "1t7": ((global_1, trg7_2), (global_2, trg7_1)),
        "5t5": ((src5_1, trg5_2), (src5_2, trg5_1)),
    }
    terms: dict[str, Tensor] = {}
    reg = global_1.new_zeros((), dtype=torch.float32)
    for name, directions in pairs.items():
        losses = []
        for src, trg in directions:
            loss, r = amdim_nce(src, trg, clip, reg_weight, offset=where.offset)
            losses.append(loss)
            reg = reg + 0.5 * r
        terms[name] = where.scale * 0.5 * (losses[0] + losses[1])
    terms["reg"] = where.scale * reg
    terms["loss"] = terms["1t5"] + terms["1t7"] + terms["5t5"] + terms["reg"]
    return terms


# ---------------------------------------------------------------------------------------------------
# SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning", eq. 1).
# ---------------------------------------------------------------------------------------------------
def nt_xent(z_1: Tensor, z_2: Tensor, temperature: float = 0.5, gather: bool = False) -> Tensor:
    """NT-Xent over 2B views: ``mean_k -log exp(sim(k, pos(k))/t) / sum_{m != k} exp(sim(k, m)/t)``.

    ``sim`` is cosine similarity; view k of ``z_1`` is positive with view k of ``z_2`` and vice versa; all
    other 2B - 2 views are negatives. z_1, z_2: (B, D) projections.

    ``gather=True`` (under DDP): the local views are scored against the views of all ranks (2N - 2 negatives,
    ``fewshot_gather.gather_rows``) and the loss is rank-weighted, so that the mean over ranks and the
    DDP-averaged gradients equal the single-process NT-Xent on the whole batch. A no-op without a process
    group.
    """
    if z_1.shape != z_2.shape or z_1.ndim != 2:
        raise ValueError(
            f"nt_xent expects two (B, D) tensors of equal shape, got {tuple(z_1.shape)}, {tuple(z_2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z_1.shape[0]
    (all_1, all_2), where = gather_rows(z_1, z_2) if gather else ((z_1, z_2), RankSlice())
    total = all_1.shape[0]
    queries = F.normalize(_at_least_float32(torch.cat([z_1, z_2])), dim=1)  # (2B, D): this rank's views
    keys = F.normalize(_at_least_float32(torch.cat([all_1, all_2])), dim=1)  # (2N, D): every rank's views
    logits = queries @ keys.T / temperature
    # view k of z_1 sits at key offset + k, of z_2 at total + offset + k; its twin in the other half
    own = torch.cat([torch.arange(batch), total + torch.arange(batch)]).to(z_1.device) + where.offset
    twin = torch.cat([own[batch:], own[:batch]])
    is_own = torch.zeros_like(logits, dtype=torch.bool)
    is_own[torch.arange(2 * batch, device=z_1.device), own] = True
    logits = logits.masked_fill(is_own, float("-inf"))
    return where.scale * F.cross_entropy(logits, twin)


# ---------------------------------------------------------------------------------------------------
# Prototypical networks (Snell et al. 2017, eqs. 1-2).
# ---------------------------------------------------------------------------------------------------
def prototypes(support: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """Class prototypes ``c_k = mean of the support embeddings of class k``: (N*K, D) -> (n_way, D)."""
    counts = torch.bincount(support_labels, minlength=n_way)
    if counts.numel() != n_way or bool((counts == 0).any()):
        raise ValueError(
            f"support labels must cover exactly the classes 0..{n_way - 1}, got counts {counts.tolist()}"
        )
    sums = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    sums.index_add_(0, support_labels, support)
    return sums / counts[:, None].to(support.dtype)


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise ``||a_i - b_j||^2``: (N, D), (M, D) -> (N, M), as an exact difference (no cancellation)."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def protonet_logits(query: Tensor, protos: Tensor, temperature: float = 1.0) -> Tensor:
    """ProtoNet logits ``-||f(x) - c_k||^2 / temperature``: (Q, D), (N, D) -> (Q, N)."""
    return -squared_euclidean(query, protos) / temperature


def episode_accuracy(
    support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, n_way: int
) -> Tensor:
    """Nearest-prototype accuracy of one episode (a 0-dim tensor in [0, 1])."""
    logits = protonet_logits(query, prototypes(support, support_labels, n_way))
    return (logits.argmax(dim=1) == query_labels).float().mean()


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------
def mean_confidence_interval(accuracies: Sequence[float] | Tensor) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96 * std / sqrt(n)`` over episodes (std with ddof=0, as in FEAT's code)."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).reshape(-1)
    if acc.numel() == 0:
        raise ValueError("mean_confidence_interval needs at least one episode accuracy")
    std = acc.std(correction=0)
    return float(acc.mean()), float(1.96 * std / math.sqrt(acc.numel()))


__all__ = [
    "amdim_infomax",
    "amdim_nce",
    "episode_accuracy",
    "mean_confidence_interval",
    "nt_xent",
    "protonet_logits",
    "prototypes",
    "sample_locations",
    "squared_euclidean",
    "tanh_clip",
]
