"""Improved precision/recall (Kynkaanniemi et al. 2019) against limits, a hand-computed case and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.metrics.precision_recall import knn_radii, precision_recall


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        return np.array([np.sort(np.linalg.norm(points - p, axis=1))[k] for p in points])

    def coverage(centres, r, queries):
        return np.mean([any(np.linalg.norm(q - c) <= rc for c, rc in zip(centres, r)) for q in queries])

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def test_identical_sets_give_one_one():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    precision, recall = precision_recall(x, x.clone(), k=3)
    assert (float(precision), float(recall)) == (1.0, 1.0)


def test_disjoint_far_apart_sets_give_zero_zero():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(100, 8, generator=g), torch.randn(80, 8, generator=g) + 100.0
    precision, recall = precision_recall(real, fake, k=3)
    assert (float(precision), float(recall)) == (0.0, 0.0)


def test_hand_computed_one_dimensional_case():
    """Real points 0..9 have 1-NN radius 1, so of the fakes {0.5, 20} only 0.5 is covered (precision 1/2).
    The two fakes' 1-NN radius is 19.5, so a ball around 0.5 or 20 covers all of 0..9 (recall 1)."""
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [20.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert float(precision) == 0.5 and float(recall) == 1.0
    # 2nd neighbour: the end points reach 2 away, interior points have one neighbour at 1 on each side
    expected = torch.tensor([2.0, 1, 1, 1, 1, 1, 1, 1, 1, 2], dtype=torch.float64)
    assert torch.equal(knn_radii(real, k=2), expected)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    real, fake = torch.randn(60, 3, generator=g), torch.randn(45, 3, generator=g) * 1.5 + 0.7
    got = precision_recall(real, fake, k=k)
    expected = brute_force_precision_recall(real.double().numpy(), fake.double().numpy(), k)
    assert (float(got[0]), float(got[1])) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # an informative case, not a limit


def test_chunking_does_not_change_radii():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(knn_radii(x, 3, chunk=7), knn_radii(x, 3, chunk=1000))


def test_bad_k_and_shapes_are_errors():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="k must be in"):
        knn_radii(x, k=5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(x, torch.randn(5))
