"""Restoration metrics against their definitions and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from diffusion_lab.metrics.restoration import RESTORATION_METRICS, build_restoration_metrics


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(4, 1, 48, 48, generator=g) * 2 - 1
    restored = (reference + 0.1 * torch.randn(reference.shape, generator=g)).clamp(-1, 1)
    return restored, reference


def test_psnr_rmse_mae_match_their_definitions(pair):
    restored, reference = pair
    values = build_restoration_metrics(["psnr", "rmse", "mae"], data_range=2.0, prefix="test/")(
        restored, reference
    )
    mse = float((restored.double() - reference.double()).square().mean())
    assert float(values["test/psnr"]) == pytest.approx(10 * math.log10(2.0**2 / mse), rel=1e-5)
    assert float(values["test/rmse"]) == pytest.approx(math.sqrt(mse), rel=1e-5)
    assert float(values["test/mae"]) == pytest.approx(float((restored - reference).abs().mean()), rel=1e-5)


def test_ssim_matches_scikit_image(pair):
    restored, reference = pair
    ssim = float(build_restoration_metrics(["ssim"], data_range=2.0)(restored, reference)["ssim"])
    expected = np.mean(
        [
            structural_similarity(
                a[0].double().numpy(),
                b[0].double().numpy(),
                data_range=2.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(restored, reference)
        ]
    )
    assert ssim == pytest.approx(expected, abs=2e-2)  # border handling differs slightly
    assert 0.3 < ssim < 0.99


def test_identical_images_are_perfect(pair):
    _, reference = pair
    values = build_restoration_metrics(["ssim", "vif", "rmse", "mae"], data_range=2.0)(reference, reference)
    assert float(values["ssim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(values["vif"]) == pytest.approx(1.0, abs=1e-4)
    assert float(values["rmse"]) == 0.0 and float(values["mae"]) == 0.0


def test_every_listed_metric_builds_and_bad_input_is_an_error():
    assert set(build_restoration_metrics(RESTORATION_METRICS).keys()) == set(RESTORATION_METRICS)
    with pytest.raises(ValueError, match="unknown restoration metric 'lpips'"):
        build_restoration_metrics(["psnr", "lpips"])
    with pytest.raises(ValueError, match="data_range must be > 0"):
        build_restoration_metrics(data_range=0)
