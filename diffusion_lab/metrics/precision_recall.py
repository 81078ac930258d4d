"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", eqs. 1-3).

Each set's manifold is approximated by the union of hyperspheres centred on its feature vectors, with radius
the distance to the point's k-th nearest neighbour within the same set (the point itself excluded). Then

    precision = fraction of generated features inside the real manifold,
    recall    = fraction of real features inside the generated manifold,

where ``phi`` is inside a manifold when ``||phi - phi_j|| <= r_j`` for at least one centre ``phi_j``. The paper
uses k = 3 and equally many real and generated samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _check(features: Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D) feature vectors, got shape {tuple(features.shape)}")


def knn_radii(features: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Distance of each row to its k-th nearest other row (N,), computed in chunks of ``chunk`` rows."""
    _check(features, "features")
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be in [1, N - 1] = [1, {features.shape[0] - 1}], got {k}")
    x = features.to(torch.float64)
    radii = []
    for start in range(0, x.shape[0], chunk):
        distances = torch.cdist(x[start : start + chunk], x)  # (c, N); the point itself sits at distance 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(centres: Tensor, radii: Tensor, queries: Tensor, chunk: int = 1024) -> Tensor:
    """Fraction of ``queries`` inside the union of balls ``B(centres_j, radii_j)`` (a float64 scalar)."""
    _check(centres, "centres")
    _check(queries, "queries")
    c, q = centres.to(torch.float64), queries.to(torch.float64)
    inside = []
    for start in range(0, q.shape[0], chunk):
        distances = torch.cdist(q[start : start + chunk], c)  # (c, M)
        inside.append((distances <= radii.to(torch.float64)[None, :]).any(dim=1))
    return torch.cat(inside).to(torch.float64).mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """(precision, recall) of generated features ``fake`` (N, D) against real features ``real`` (M, D)."""
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall
