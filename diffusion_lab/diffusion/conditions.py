"""Conditional functions on the denoised estimate for guided restoration: colourisation, inpainting, super-resolution.

Wizadwongsa & Suwajanakorn (ICLR 2023, Sec. 6) run these tasks with the same splitting samplers as classifier
guidance; their code has none of them, so the functions are defined here as data-consistency losses on ``x0_hat``
(the DPS / DiffuseIT form of :class:`~diffusion_lab.diffusion.guidance.LossGuidance`)::

    L(x0_hat) = 1/2 || A(x0_hat) - y ||^2        (per sample, summed over pixels)
    delta     = -s sigma^2 grad_x L(D(x, sigma)),   g = -delta / sigma = s sigma J_D^T A^T (A D - y)

with a linear degradation ``A`` and its measurement ``y = A(reference)``:

* :class:`Colorization`: ``A`` = luma, ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601), (B, 3, H, W) -> (B, 1, H, W).
* :class:`Inpainting`: ``A`` = multiplication by a binary mask (1 = known pixel).
* :class:`SuperResolution`: ``A`` = average pooling by ``factor`` (box-filter downsampling).

The squared norm makes ``A^T (A x0_hat - y)`` the exact gradient, so the guidance term is zero whenever ``x0_hat``
already satisfies the condition (tested), and a small guided step lowers the loss. Each condition is bound to a
batch of reference images with :meth:`ConsistencyLoss.bind`, which stores ``y = A(reference)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma coefficients (sum 1: a grey image keeps its value)."""


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"{what} must be a floating-point image batch (B, C, H, W), got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )


class ConsistencyLoss(nn.Module):
    """``L(x0_hat) = 1/2 ||A(x0_hat) - y||^2`` per sample; subclasses define the linear operator ``A``.

    Call :meth:`bind` with the reference images (or set ``measurement``) before use; ``forward`` takes the extra
    keywords :class:`LossGuidance` passes (``x``, ``sigma``, conditioning) and ignores them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.measurement: Tensor | None = None

    def operator(self, images: Tensor) -> Tensor:
        """The degradation ``A`` (linear)."""
        raise NotImplementedError

    def bind(self, reference: Tensor) -> ConsistencyLoss:
        """Store ``y = A(reference)`` for the batch being restored; returns self."""
        _check_images(reference, "reference")
        self.measurement = self.operator(reference).detach()
        return self

    def degraded(self) -> Tensor:
        """The measurement as an image of the output size (for display): ``A`` undone the simplest way."""
        raise NotImplementedError

    def forward(self, x0_hat: Tensor, **_: object) -> Tensor:
        if self.measurement is None:
            raise RuntimeError(
                f"{type(self).__name__} has no measurement: call .bind(reference_images) first"
            )
        residual = self.operator(x0_hat) - self.measurement.to(x0_hat)
        return 0.5 * residual.pow(2).flatten(1).sum(1)


class Colorization(ConsistencyLoss):
    """Grayscale consistency: ``A(x) = sum_c w_c x_c`` with the BT.601 luma weights (3-channel images)."""

    def operator(self, images: Tensor) -> Tensor:
        _check_images(images, "images")
        if images.shape[1] != 3:
            raise ValueError(f"colourisation needs RGB images (3 channels), got {images.shape[1]} channels")
        weights = images.new_tensor(LUMA_WEIGHTS).reshape(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)

    def degraded(self) -> Tensor:
        return self.measurement.expand(-1, 3, -1, -1)


def box_mask(shape: Sequence[int], box: Sequence[float]) -> Tensor:
    """(1, 1, H, W) mask, 1 = known, 0 inside ``box = (top, left, height, width)`` given as fractions of H, W."""
    if len(box) != 4 or not all(0.0 <= float(b) <= 1.0 for b in box):
        raise ValueError(f"box must be (top, left, height, width) as fractions in [0, 1], got {list(box)}")
    h, w = int(shape[-2]), int(shape[-1])
    top, left = round(box[0] * h), round(box[1] * w)
    bottom, right = min(h, top + round(box[2] * h)), min(w, left + round(box[3] * w))
    mask = torch.ones(1, 1, h, w)
    mask[..., top:bottom, left:right] = 0
    return mask


class Inpainting(ConsistencyLoss):
    """Masked consistency: ``A(x) = mask * x`` (1 = known). The mask is a tensor broadcastable to the images or
    a ``box`` hole (fractions, see :func:`box_mask`) built at :meth:`bind`."""

    def __init__(self, mask: Tensor | None = None, box: Sequence[float] = (0.25, 0.25, 0.5, 0.5)) -> None:
        super().__init__()
        self.box = tuple(box)
        if mask is not None and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must contain only 0 (hole) and 1 (known pixel)")
        self.mask = mask

    def bind(self, reference: Tensor) -> Inpainting:
        _check_images(reference, "reference")
        if self.mask is None:
            self.mask = box_mask(reference.shape, self.box)
        return super().bind(reference)  # type: ignore[return-value]

    def operator(self, images: Tensor) -> Tensor:
        _check_images(images, "images")
        if self.mask is None:
            self.mask = box_mask(images.shape, self.box)
        return images * self.mask.to(images)

    def degraded(self) -> Tensor:
        return self.measurement


class SuperResolution(ConsistencyLoss):
    """Downsampling consistency: ``A(x) = avg_pool(x, factor)`` (H and W divisible by ``factor``)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        self.factor = factor

    def operator(self, images: Tensor) -> Tensor:
        _check_images(images, "images")
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the factor {self.factor}"
            )
        return F.avg_pool2d(images, self.factor)

    def degraded(self) -> Tensor:
        return F.interpolate(self.measurement, scale_factor=self.factor, mode="nearest")


CONDITIONS: dict[str, type[ConsistencyLoss]] = {
    "colorization": Colorization,
    "inpainting": Inpainting,
    "super_resolution": SuperResolution,
}

__all__ = [
    "LUMA_WEIGHTS",
    "ConsistencyLoss",
    "Colorization",
    "Inpainting",
    "SuperResolution",
    "box_mask",
    "CONDITIONS",
]
