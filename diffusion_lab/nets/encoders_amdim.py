"""The AMDIM encoder (Bachman, Hjelm & Buchwalter 2019, "Learning Representations by Maximizing Mutual
Information Across Views", Sec. 3.4), as used as an embedding network by Chen et al. ("Self-supervised
learning for few-shot image classification"; their released encoder: ndf 192, n_rkhs 1536, depth 8 at
128x128 input).

The trunk uses unpadded ("valid") convolutions, so the receptive field of each output location is a
proper image patch, and shrinks the input to feature maps of exactly 7x7, 5x5 and 1x1:

* 32x32 input: conv3x3 (30) - 1x1 unit - stage k4/s2 (14) - stage k2/s2 (7);
* 64x64 input: conv3x3 (62) - stage k4/s2 (30) - stage k4/s2 (14) - stage k2/s2 (7);
* 128x128 input: conv5x5/s2 with reflect padding (64), then as 64x64;

then two k3 stages (7 -> 5 -> 3) and a final k3 unit to n_rkhs channels (3 -> 1). A stage is ``depth``
residual units: the first with the stage's kernel/stride, the rest 1x1. Widths double at every striding
stage from ``ndf``. Small residual 1x1-conv heads ("fake RKHS" networks in AMDIM) map the 7x7, 5x5 and 1x1
maps to ``n_rkhs``-dimensional features; the few-shot embedding is the 1x1 head's output (the global
feature). The infomax objective over these maps lives in ``methods/fewshot_losses.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_RESOLUTIONS = (32, 64, 128)


class MultiscaleFeatures(NamedTuple):
    """AMDIM features of a batch: global (B, D), local 5x5 map (B, D, 5, 5), local 7x7 map (B, D, 7, 7)."""

    global_: Tensor
    local5: Tensor
    local7: Tensor


def _norm(channels: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class _ResUnit(nn.Module):
    """Residual unit on valid convolutions: ``conv_kxk -> (BN) -> ReLU -> conv1x1`` plus a shortcut.

    The shortcut average-pools with the same kernel and stride (zero-padding extra channels when the width
    grows); when the width shrinks it is a learned conv of the same geometry.
    """

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, use_bn: bool) -> None:
        super().__init__()
        self.kernel, self.stride, self.n_in, self.n_out = kernel, stride, n_in, n_out
        self.conv1 = nn.Conv2d(n_in, n_out, kernel, stride, bias=False)
        self.norm1 = _norm(n_out, use_bn)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shrink = nn.Conv2d(n_in, n_out, kernel, stride) if n_out < n_in else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.norm1(self.conv1(x))))
        if self.shrink is not None:
            return h + self.shrink(x)
        skip = F.avg_pool2d(x, self.kernel, self.stride) if (self.kernel, self.stride) != (1, 1) else x
        if self.n_out > self.n_in:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h + skip


def _stage(n_in: int, n_out: int, kernel: int, stride: int, depth: int, use_bn: bool) -> nn.Sequential:
    units = [_ResUnit(n_in, n_out, kernel, stride, use_bn)]
    units += [_ResUnit(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
    return nn.Sequential(*units)


class _FeatureHead(nn.Module):
    """Residual 1x1-conv MLP to ``n_out`` features, batch-normalised output (AMDIM's per-scale heads).

    The linear shortcut starts near the identity (where ``n_out >= n_in``) so early training sees the trunk's
    features almost unchanged.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_in, n_out, 1, bias=False),
            nn.BatchNorm2d(n_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(n_out, n_out, 1, bias=False),
        )
        self.shortcut = nn.Conv2d(n_in, n_out, 1)
        if n_out >= n_in:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[:n_in, :, 0, 0] += torch.eye(n_in)
        self.out_norm = nn.BatchNorm2d(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_norm(self.body(x) + self.shortcut(x))


class AmdimEncoder(nn.Module):
    """AMDIM encoder with 7x7 / 5x5 / 1x1 feature heads; ``forward`` gives the global embedding (B, n_rkhs).

    Args:
        in_channels: image channels.
        resolution: input size, one of 32, 64, 128.
        ndf: base width (widths ndf, 2 ndf, 4 ndf[, 8 ndf] along the trunk).
        n_rkhs: feature dimension of the heads (= ``out_dim``).
        depth: residual units per stage.
        use_bn: batch norm inside the trunk's units (AMDIM's default is off; the heads always normalise).
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        ndf: int = 64,
        n_rkhs: int = 512,
        depth: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(
                f"AmdimEncoder supports input resolutions {SUPPORTED_RESOLUTIONS}, got {resolution}; "
                f"resize the images (the data module's image_size) to one of them"
            )
        if min(ndf, n_rkhs, depth) < 1:
            raise ValueError(f"ndf, n_rkhs and depth must be >= 1, got {ndf}, {n_rkhs}, {depth}")
        self.resolution, self.out_dim = resolution, n_rkhs
        if resolution == 32:
            layers = [
                nn.Conv2d(in_channels, ndf, 3, bias=False),
                _ResUnit(ndf, ndf, 1, 1, use_bn),
                _stage(ndf, 2 * ndf, 4, 2, depth, use_bn),
                _stage(2 * ndf, 4 * ndf, 2, 2, depth, use_bn),
            ]
            width = 4 * ndf
        else:
            layers = [nn.Conv2d(in_channels, ndf, 5, 2, padding=2, padding_mode="reflect", bias=False)]
            layers = layers if resolution == 128 else []
            layers += [
                nn.Conv2d(in_channels if resolution == 64 else ndf, ndf, 3, bias=False),
                _stage(ndf, 2 * ndf, 4, 2, depth, use_bn),
                _stage(2 * ndf, 4 * ndf, 4, 2, depth, use_bn),
                _stage(4 * ndf, 8 * ndf, 2, 2, depth, use_bn),
            ]
            width = 8 * ndf
        self.to_7x7 = nn.Sequential(*layers, _norm(width, use_bn))
        self.to_5x5 = _stage(width, width, 3, 1, depth, use_bn)
        self.to_1x1 = nn.Sequential(
            _stage(width, width, 3, 1, depth, use_bn),
            _ResUnit(width, n_rkhs, 3, 1, use_bn),
            nn.BatchNorm2d(n_rkhs),
        )
        self.head7 = _FeatureHead(width, n_rkhs)
        self.head5 = _FeatureHead(width, n_rkhs)
        self.head1 = _FeatureHead(n_rkhs, n_rkhs)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"AmdimEncoder(resolution={self.resolution}) expects (B, C, {self.resolution}, "
                f"{self.resolution}) images, got shape {tuple(x.shape)}"
            )

    def multiscale(self, x: Tensor) -> MultiscaleFeatures:
        """Global (B, n_rkhs) and local 5x5 / 7x7 feature maps (B, n_rkhs, k, k) of the AMDIM objective."""
        self._check_input(x)
        h7 = self.to_7x7(x)  # (B, width, 7, 7)
        h5 = self.to_5x5(h7)  # (B, width, 5, 5)
        h1 = self.to_1x1(h5)  # (B, n_rkhs, 1, 1)
        return MultiscaleFeatures(self.head1(h1).flatten(1), self.head5(h5), self.head7(h7))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.head1(self.to_1x1(self.to_5x5(self.to_7x7(x)))).flatten(1)


__all__ = ["SUPPORTED_RESOLUTIONS", "AmdimEncoder", "MultiscaleFeatures"]
