"""Glyph generator: seed-determinism without global RNG, class independence, exact anti-aliased rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.data.glyphs import GlyphStyle, class_strokes, render_glyph_classes, render_segments


def test_same_seed_same_glyphs_and_no_global_rng():
    np.random.seed(123)
    torch.manual_seed(123)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = render_glyph_classes(range(4), 5, 16, seed=7)
    assert np.array_equal(np.random.get_state()[1], np_state)  # global numpy RNG untouched
    assert torch.equal(torch.get_rng_state(), torch_state)  # global torch RNG untouched
    b = render_glyph_classes(range(4), 5, 16, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, render_glyph_classes(range(4), 5, 16, seed=8))


def test_a_class_does_not_depend_on_the_other_classes_generated():
    together = render_glyph_classes([3, 9, 40], 6, 16, seed=1)
    alone = render_glyph_classes([9], 6, 16, seed=1)
    assert torch.equal(together[1], alone[0])
    # chunking of the renderer does not change pixels
    assert torch.equal(render_glyph_classes([9], 6, 16, seed=1, chunk=2), alone)


def test_instances_vary_but_classes_are_recognisable():
    """Leave-one-out nearest class mean on raw pixels: far above the 1/20 chance level, yet not trivial."""
    x = render_glyph_classes(range(20), 10, 24, seed=0).float().flatten(2) / 255  # (C, N, P)
    n_classes, n_inst, _ = x.shape
    assert (x.amax(-1) > 0).all()  # every glyph has ink
    assert all(len({bytes(v.numpy()) for v in per_class}) == n_inst for per_class in x)  # no two alike
    correct = 0
    for c in range(n_classes):
        for n in range(n_inst):
            centroids = x.mean(1)
            centroids[c] = (x[c].sum(0) - x[c, n]) / (n_inst - 1)
            correct += int(((x[c, n] - centroids) ** 2).sum(-1).argmin() == c)
    assert 0.5 < correct / (n_classes * n_inst) < 1.0


def test_render_matches_distance_to_a_segment():
    size = 32
    pixel = 2.0 / size
    # a horizontal segment through pixel-row centres: y = centre of row 16, from x=-0.5 to 0.5
    y0 = -1 + pixel * 16.5
    segments = torch.tensor([[[[-0.5, y0], [0.5, y0]]]], dtype=torch.float64)
    ink = render_segments(segments, torch.tensor([1.5 * pixel]), size)[0].float() / 255
    coords = -1 + pixel * (torch.arange(size) + 0.5)
    for i in range(size):
        for j in range(size):
            x, y = float(coords[j]), float(coords[i])
            dx = max(-0.5 - x, 0.0, x - 0.5)
            d = (dx**2 + (y - y0) ** 2) ** 0.5
            expected = min(max((1.5 * pixel - d) / pixel + 0.5, 0.0), 1.0)
            assert abs(float(ink[i, j]) - expected) <= 0.5 / 255 + 1e-6


def test_style_validation_and_stroke_counts():
    style = GlyphStyle(min_strokes=3, max_strokes=3)
    assert all(class_strokes(0, c, style).shape == (3, 3, 2) for c in range(5))
    with pytest.raises(ValueError, match="min_strokes"):
        GlyphStyle(min_strokes=3, max_strokes=2)
    with pytest.raises(ValueError, match="n_instances"):
        render_glyph_classes([0], 0)
