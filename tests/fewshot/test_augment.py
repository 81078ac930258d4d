"""SSL batch augmentations: the [-1, 1] <-> [0, 1] round trip, per-image stroke-width draws against a
brute-force neighbourhood max / min, per-image parameters of the glyph pipeline, and the glyph config spells out
that same pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from diffusion_lab.cli import instantiate
from diffusion_lab.data.fewshot_augment import BatchAugment, RandomStrokeWidth, glyph_augmentation

REPO = Path(__file__).resolve().parents[2]


def _brute_filter(x: torch.Tensor, reduce) -> torch.Tensor:
    """3x3 max / min over the in-image neighbours of every pixel, by explicit loops."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            patch = x[..., max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
            out[..., i, j] = reduce(patch.flatten(-2), dim=-1).values
    return out


def test_stroke_width_is_identity_half_dilation_or_half_erosion_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 6, 7).repeat(300, 1, 1, 1) * 2 - 1
    thick = 0.5 * (x[:1] + _brute_filter(x[:1], torch.max))
    thin = 0.5 * (x[:1] + _brute_filter(x[:1], torch.min))
    y = RandomStrokeWidth(p=0.25)(x)
    kinds = []
    for image in y:
        matches = [torch.allclose(image, ref[0], atol=1e-6) for ref in (x[:1], thick, thin)]
        assert sum(matches) == 1
        kinds.append(matches.index(True))
    counts = torch.bincount(torch.tensor(kinds), minlength=3)
    assert 110 < counts[0] < 190 and 45 < counts[1] < 105 and 45 < counts[2] < 105  # 150 / 75 / 75 expected
    assert torch.equal(RandomStrokeWidth(p=0.0)(x), x)
    with pytest.raises(ValueError, match="p must be in"):
        RandomStrokeWidth(p=0.7)


def test_batch_augment_maps_to_unit_range_and_back():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append((float(x.min()), float(x.max())))
            return x

    x = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    assert torch.allclose(BatchAugment([Record()])(x), x)
    assert seen == [(0.0, 1.0)]  # kornia's colour ops see [0, 1]
    with pytest.raises(ValueError, match="B, C, H, W"):
        BatchAugment([])(x[0])


def test_glyph_augmentation_draws_per_image_and_stays_in_range():
    torch.manual_seed(0)
    x = -torch.ones(16, 1, 32, 32)
    x[:, :, 10:22, 14:18] = 1.0  # the same bar in every image
    y = glyph_augmentation(32)(x)
    assert float(y.min()) >= -1 - 1e-5 and float(y.max()) <= 1 + 1e-5
    distances = torch.cdist(y.flatten(1), y.flatten(1)) + torch.eye(16) * 1e9
    assert distances.min() > 0.5  # no two images got the same transform


def test_glyph_config_spells_out_glyph_augmentation():
    config = yaml.safe_load((REPO / "configs" / "fewshot" / "glyphs_amdim.yaml").read_text())
    from_yaml = instantiate(config["model"]["init_args"]["augmentation"])
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    torch.manual_seed(3)
    expected = glyph_augmentation(32)(x)
    torch.manual_seed(3)
    assert torch.equal(from_yaml(x), expected)
