"""Procedural CT phantoms of the Shepp-Logan family, and scikit-image's Shepp-Logan phantom.

A phantom is a sum of uniform ellipses (Shepp & Logan 1974): every point gets the sum of the values of the
ellipses that contain it. Values here are attenuation relative to water, ``r = mu / mu_water`` (air 0,
water 1, dense bone about 2), so ``mu = r * mu_water``.

Random phantom (one draw, all sizes in the [-1, 1]^2 frame of the reconstruction circle):

* a body ellipse (semi-axes 0.55-0.9, inside radius 0.95: at 32 px and above no pixel centred outside the
  reconstruction circle is touched) of tissue value ``r_body ~ U(0.3, 1.1)``;
* with probability 0.7, a skull-like rim: the body ellipse at ``r_rim ~ U(1.5, 2.0)`` minus an inner ellipse
  0.02-0.06 thinner on each axis (the Shepp-Logan "skull");
* 4-11 inner ellipses (semi-axes log-uniform in [0.03, 0.3], centres inside the body) adding a contrast that
  is low (+-0.03 to 0.2, probability 0.75) or high (-0.2 to -0.4 towards air-like holes, +0.3 to +0.7 towards
  bone, probability 0.25);

clipped to [0, 2], rasterised with 4 x 4 supersampling per pixel (area anti-aliasing) and cut to the
reconstruction circle. scikit-image's
phantom (Toft's modified Shepp-Logan, values 0 to 1, skull 1) enters as ``r = 2 v``: skull 2 (bone), brain 0.4,
inside the family above.
"""

from __future__ import annotations

import numpy as np

from diffusion_lab.data.ct_simulation import reconstruction_circle

SUPERSAMPLE = 4


def rasterize_ellipses(ellipses: np.ndarray, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Sum of uniform ellipses on a ``size x size`` grid over [-1, 1]^2 (pixel areas averaged).

    Args:
        ellipses: (K, 6) rows ``(value, a, b, x0, y0, angle_rad)``: semi-axes a (along the rotated x axis)
            and b, centre (x0, y0) with y pointing up (row 0 is the top), rotation counter-clockwise.
        size: output height = width.
        supersample: sub-samples per pixel and axis.
    """
    ellipses = np.asarray(ellipses, dtype=np.float64).reshape(-1, 6)
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n * 2 - 1  # sub-pixel centres in [-1, 1]
    x, y = np.meshgrid(coords, -coords)  # y up, row 0 at the top
    image = np.zeros((n, n))
    for value, a, b, x0, y0, angle in ellipses:
        c, s = np.cos(angle), np.sin(angle)
        u = (x - x0) * c + (y - y0) * s
        v = -(x - x0) * s + (y - y0) * c
        image += value * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    return image.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def random_ellipses(rng: np.random.Generator) -> np.ndarray:
    """Ellipse table (K, 6) of one random phantom (module docstring)."""
    a, b = rng.uniform(0.55, 0.9, size=2)
    max_offset = max(0.0, 0.95 - max(a, b))
    x0, y0 = rng.uniform(-max_offset, max_offset, size=2) / np.sqrt(2)
    angle = rng.uniform(0, np.pi)
    body = rng.uniform(0.3, 1.1)
    rows = []
    if rng.uniform() < 0.7:
        rim = rng.uniform(1.5, 2.0)
        thickness = rng.uniform(0.02, 0.06)
        rows.append((rim, a, b, x0, y0, angle))
        rows.append((body - rim, a - thickness, b - thickness, x0, y0, angle))
        a, b = a - thickness, b - thickness
    else:
        rows.append((body, a, b, x0, y0, angle))
    c, s = np.cos(angle), np.sin(angle)
    for _ in range(rng.integers(4, 12)):
        # centre uniformly inside 0.8 x the (inner) body ellipse, in the body's own frame
        radius, phi = 0.8 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        u, v = radius * a * np.cos(phi), radius * b * np.sin(phi)
        cx, cy = x0 + u * c - v * s, y0 + u * s + v * c
        axes = np.exp(rng.uniform(np.log(0.03), np.log(0.3), size=2))
        if rng.uniform() < 0.25:
            value = rng.uniform(-0.4, -0.2) if rng.uniform() < 0.5 else rng.uniform(0.3, 0.7)
        else:
            value = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.2)
        rows.append((value, axes[0], axes[1], cx, cy, rng.uniform(0, np.pi)))
    return np.asarray(rows)


def random_phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """One random phantom ``r = mu / mu_water`` of shape (size, size), values in [0, 2], zero outside the
    reconstruction circle (which only small sizes' edge pixels reach)."""
    phantom = np.clip(rasterize_ellipses(random_ellipses(rng), size), 0.0, 2.0)
    return phantom * reconstruction_circle(size)


def shepp_logan(size: int) -> np.ndarray:
    """scikit-image's bundled (modified) Shepp-Logan phantom, area-resized to ``size``, as ``r = 2 v``."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(2.0 * phantom, 0.0, 2.0) * reconstruction_circle(size)


def phantom_seed(seed: int, split: str, index: int) -> list[int]:
    """Seed sequence of phantom ``index`` of ``split``: draws do not depend on order or on other splits."""
    return [seed, {"train": 0, "val": 1, "test": 2}[split], index]


__all__ = ["rasterize_ellipses", "random_ellipses", "random_phantom", "shepp_logan", "phantom_seed"]
