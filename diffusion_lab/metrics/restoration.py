"""Full-reference restoration metrics (CT denoising, image translation) from torchmetrics, by name.

All metrics compare a restored image with its reference over a known ``data_range`` (max - min of the
intensity scale: 2 for images in [-1, 1], the HU window width for CT). None of them needs pretrained weights,
so they are the offline alternatives to LPIPS:

* ``psnr``:    ``10 log10(data_range^2 / MSE)`` over the whole batch (dB).
* ``ssim``:    structural similarity (Wang et al. 2004), Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03.
* ``ms_ssim``: multi-scale SSIM (Wang et al. 2003); needs images larger than ~ 160 px with the default 5 scales.
* ``rmse``:    root mean squared error in intensity units.
* ``mae``:     mean absolute error.
* ``vif``:     pixel-domain visual information fidelity (Sheikh & Bovik 2006); images of at least 41 x 41.

(The universal image quality index is left out on purpose: without SSIM's constants its ``2 mu_x mu_y /
(mu_x^2 + mu_y^2)`` term is 0/0 for zero-mean windows, and in float32 it gives 0.9965 for identical images
in [-1, 1].)
"""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, MetricCollection
from torchmetrics.image import (
    MultiScaleStructuralSimilarityIndexMeasure,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
    VisualInformationFidelity,
)

__all__ = ["RESTORATION_METRICS", "build_restoration_metrics"]

RESTORATION_METRICS = ("psnr", "ssim", "ms_ssim", "rmse", "mae", "vif")


def _build(name: str, data_range: float) -> Metric:
    if name == "psnr":
        return PeakSignalNoiseRatio(data_range=data_range)
    if name == "ssim":
        return StructuralSimilarityIndexMeasure(data_range=data_range)
    if name == "ms_ssim":
        return MultiScaleStructuralSimilarityIndexMeasure(data_range=data_range)
    if name == "rmse":
        return MeanSquaredError(squared=False)
    if name == "mae":
        return MeanAbsoluteError()
    if name == "vif":
        return VisualInformationFidelity()
    raise ValueError(f"unknown restoration metric {name!r}; expected one of {list(RESTORATION_METRICS)}")


def build_restoration_metrics(
    names: Sequence[str] = ("psnr", "ssim", "rmse"), data_range: float = 2.0, prefix: str = ""
) -> MetricCollection:
    """A MetricCollection ``{prefix + name: metric}``; call it as ``metrics(restored, reference)``.

    Args:
        names: metrics from :data:`RESTORATION_METRICS`.
        data_range: max - min of the intensity scale (2.0 for [-1, 1] images).
        prefix: key prefix, e.g. ``"test/"``.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return MetricCollection({name: _build(name, data_range) for name in names}, prefix=prefix or None)
