"""Embeddings: the sinusoidal formula, Fourier features, and the condition vector's pieces."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.nets.embeddings import ConditionEmbedding, FourierFeatures, sinusoidal_embedding


@pytest.mark.parametrize("dim", [8, 7, 1])
def test_sinusoidal_embedding_matches_textbook_formula(dim):
    """emb[i] = cos(x / P^(i/half)), emb[half + i] = sin(x / P^(i/half)) (Vaswani et al. 2017, sec. 3.5)."""
    x = torch.tensor([0.0, 0.37, -1.5, 999.0])
    emb = sinusoidal_embedding(x, dim, max_period=10000.0)
    half = dim // 2
    expected = torch.zeros(len(x), dim)
    for b, xb in enumerate(x.tolist()):
        for i in range(half):
            angle = xb / 10000.0 ** (i / half)
            expected[b, i] = math.cos(angle)
            expected[b, half + i] = math.sin(angle)
    torch.testing.assert_close(emb, expected, atol=2e-4, rtol=0)  # float32 angles up to ~1000 rad


def test_fourier_features_formula():
    torch.manual_seed(0)
    ff = FourierFeatures(6, std=3.0)
    x = torch.tensor([0.25, -0.1])
    angles = 2 * math.pi * x[:, None] * ff.freqs[None]
    torch.testing.assert_close(ff(x), torch.cat([angles.cos(), angles.sin()], -1))
    assert 0.5 < ff.freqs.abs().max() < 30  # drawn with std 3


def test_condition_embedding_is_a_sum_of_its_parts():
    """emb = MLP(sinusoid(scale c)) + E[label] + W sinusoid(1000 w), checked term by term."""
    torch.manual_seed(0)
    ce = ConditionEmbedding(16, 8, num_classes=3, scalar_conditions=["guidance_w"], noise_embedding_scale=2.0)
    c = torch.tensor([0.1, -0.4])
    labels = torch.tensor([2, 3])
    w = torch.tensor([0.0, 1.5])
    expected = (
        ce.noise_mlp(sinusoidal_embedding(2.0 * c, 8))
        + ce.label_embedding.weight[labels]
        + sinusoidal_embedding(1000 * w, 8) @ ce.scalar_projections["guidance_w"].weight.T
    )
    torch.testing.assert_close(ce(c, 2, labels, {"guidance_w": w}), expected)
    assert ce.scalar_projections["guidance_w"].bias is None
    assert ce.label_embedding.num_embeddings == 4  # 3 classes + the null label


def test_condition_embedding_rejects_bad_names():
    with pytest.raises(ValueError, match="distinct identifiers"):
        ConditionEmbedding(8, 8, scalar_conditions=["w", "w"])
    with pytest.raises(ValueError, match="other than 'labels'"):
        ConditionEmbedding(8, 8, scalar_conditions=["labels"])
