"""Procedurally generated glyph classes: an offline few-shot benchmark in the spirit of Omniglot.

A *class* is a random set of 2-4 strokes (quadratic Bezier curves in the square [-1, 1]^2; with
probability ``connect_prob`` a stroke starts on a point of an earlier stroke, so glyphs look drawn
rather than scattered). An *instance* of a class is rendered with three kinds of noise:

* jitter: every control point moves by N(0, ``jitter^2``);
* thickness: the stroke half-width is drawn from U(``thickness``);
* affine: rotation N(0, ``rotation_deg^2``), isotropic scale U(``scale``), shear N(0, ``shear^2``) and
  translation N(0, ``translation^2``) per axis.

Rendering is anti-aliased: a pixel's ink is ``clamp((w - d) / p + 1/2, 0, 1)`` where ``d`` is the
distance from the pixel centre to the nearest stroke segment, ``w`` the half-width and ``p`` the pixel
size, all in the [-1, 1] frame. Output is uint8 ink (0 = background, 255 = full ink).

Determinism: class ``c`` under seed ``s`` draws its strokes from ``numpy.random.default_rng([s, c, 0])``
and its instances from ``default_rng([s, c, 1])``; no global random state is touched. A class therefore
looks the same however many other classes are generated, and every split's classes have distinct ids
(so splits never share a class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Points at which each quadratic Bezier stroke is sampled; consecutive points form the rendered segments.
CURVE_POINTS = 10


@dataclass(frozen=True)
class GlyphStyle:
    """Class-structure and instance-noise parameters of the glyph generator (see module docstring)."""

    min_strokes: int = 2
    max_strokes: int = 4
    extent: float = 0.7  # control points lie in [-extent, extent]^2
    connect_prob: float = 0.6
    jitter: float = 0.05
    thickness: tuple[float, float] = (0.07, 0.13)
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.85, 1.1)
    shear: float = 0.08
    translation: float = 0.06

    def __post_init__(self) -> None:
        for name in ("thickness", "scale"):  # lists (from YAML or JSON) become tuples: the style is hashable
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not 1 <= self.min_strokes <= self.max_strokes:
            raise ValueError(
                f"need 1 <= min_strokes <= max_strokes, got {self.min_strokes} and {self.max_strokes}"
            )
        if not 0.0 < self.thickness[0] <= self.thickness[1]:
            raise ValueError(f"thickness must be an increasing positive range, got {self.thickness}")
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be an increasing positive range, got {self.scale}")


def class_strokes(seed: int, class_id: int, style: GlyphStyle) -> np.ndarray:
    """Control points of one class: (S, 3, 2) for S quadratic Bezier strokes."""
    rng = np.random.default_rng([seed, class_id, 0])
    n_strokes = int(rng.integers(style.min_strokes, style.max_strokes + 1))
    strokes = rng.uniform(-style.extent, style.extent, size=(n_strokes, 3, 2))
    for s in range(1, n_strokes):
        if rng.uniform() < style.connect_prob:  # start on an earlier stroke: glyphs are connected shapes
            t = rng.uniform()
            strokes[s, 0] = _bezier(strokes[int(rng.integers(0, s))], np.array([t]))[0]
    return strokes


def _bezier(control: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Quadratic Bezier B(t) = (1-t)^2 P0 + 2 t (1-t) P1 + t^2 P2 for control (..., 3, 2), t (T,) -> (..., T, 2)."""
    t = t[:, None]
    p0, p1, p2 = control[..., 0:1, :], control[..., 1:2, :], control[..., 2:3, :]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2


def instance_segments(strokes: np.ndarray, n_instances: int, seed: int, class_id: int, style: GlyphStyle):
    """Noisy renderings' geometry: segments (n, S*(CURVE_POINTS-1), 2, 2) and half-widths (n,)."""
    rng = np.random.default_rng([seed, class_id, 1])
    n_strokes = strokes.shape[0]
    control = strokes[None] + rng.normal(0.0, style.jitter, size=(n_instances, n_strokes, 3, 2))
    points = _bezier(control, np.linspace(0.0, 1.0, CURVE_POINTS))  # (n, S, T, 2)
    angle = np.deg2rad(rng.normal(0.0, style.rotation_deg, size=n_instances))
    scale = rng.uniform(*style.scale, size=n_instances)
    shear = rng.normal(0.0, style.shear, size=n_instances)
    shift = rng.normal(0.0, style.translation, size=(n_instances, 2))
    half_width = rng.uniform(*style.thickness, size=n_instances)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shear_m = np.zeros((n_instances, 2, 2))
    shear_m[:, 0, 0] = shear_m[:, 1, 1] = 1.0
    shear_m[:, 0, 1] = shear
    affine = scale[:, None, None] * rotation @ shear_m  # (n, 2, 2)
    points = np.einsum("nij,nstj->nsti", affine, points) + shift[:, None, None, :]
    segments = np.stack([points[:, :, :-1], points[:, :, 1:]], axis=3)  # (n, S, T-1, 2, 2)
    return segments.reshape(n_instances, -1, 2, 2), half_width


def render_segments(segments: Tensor, half_width: Tensor, image_size: int) -> Tensor:
    """Anti-aliased ink of thick polylines: segments (n, M, 2, 2), half_width (n,) -> uint8 (n, H, W).

    The y axis points down the image (row index grows with y); pixel centres sit at
    ``-1 + (i + 1/2) * 2 / image_size``.
    """
    pixel = 2.0 / image_size
    coords = -1.0 + pixel * (torch.arange(image_size, dtype=torch.float32) + 0.5)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # (P, 2)
    a, b = segments[:, :, 0].float(), segments[:, :, 1].float()  # (n, M, 2)
    ab = b - a
    ab_len2 = (ab * ab).sum(-1).clamp_min(1e-12)  # (n, M)
    ap = grid[None, :, None, :] - a[:, None]  # (n, P, M, 2)
    t = ((ap * ab[:, None]).sum(-1) / ab_len2[:, None]).clamp(0.0, 1.0)  # projection onto the segment
    nearest = ap - t[..., None] * ab[:, None]
    dist = nearest.pow(2).sum(-1).min(dim=-1).values.sqrt()  # (n, P)
    ink = ((half_width.float()[:, None] - dist) / pixel + 0.5).clamp(0.0, 1.0)
    return (ink * 255).round().to(torch.uint8).reshape(-1, image_size, image_size)


def render_glyph_classes(
    class_ids: list[int] | range,
    n_instances: int,
    image_size: int = 32,
    seed: int = 0,
    style: GlyphStyle | None = None,
    chunk: int = 64,
) -> Tensor:
    """Render ``n_instances`` noisy instances of each class: uint8 (len(class_ids), n_instances, H, W)."""
    if n_instances < 1 or image_size < 4:
        raise ValueError(f"need n_instances >= 1 and image_size >= 4, got {n_instances} and {image_size}")
    style = style or GlyphStyle()
    out = torch.empty(len(class_ids), n_instances, image_size, image_size, dtype=torch.uint8)
    for row, class_id in enumerate(class_ids):
        strokes = class_strokes(seed, int(class_id), style)
        segments, half_width = instance_segments(strokes, n_instances, seed, int(class_id), style)
        segments_t, half_width_t = torch.from_numpy(segments), torch.from_numpy(half_width)
        for start in range(0, n_instances, chunk):  # bounded memory: (chunk, H*W, M, 2) floats at once
            stop = min(start + chunk, n_instances)
            out[row, start:stop] = render_segments(
                segments_t[start:stop], half_width_t[start:stop], image_size
            )
    return out


def glyph_grid(images: Tensor, nrow: int) -> Tensor:
    """Tile uint8 glyphs (N, H, W) into one (ceil(N/nrow)*H, nrow*W) uint8 image (for a PNG preview)."""
    n, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = torch.zeros(rows * h, nrow * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return canvas


__all__ = [
    "GlyphStyle",
    "class_strokes",
    "glyph_grid",
    "instance_segments",
    "render_glyph_classes",
    "render_segments",
]
