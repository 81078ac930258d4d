"""Image editing (SDEdit) and mask inpainting with a few-step distilled model (Meng et al. 2023, sec. 5.3-5.4).

Both start from a real image ``x0`` and run the distilled model on the tail of its N-step grid
``sigma_ve(i/N)`` (``distillation.distillation_sigmas``), so a distilled student is only ever asked about the
levels it was trained on.

**SDEdit** (Meng et al., ICLR 2022): with strength ``s`` in (0, 1], start at grid level ``k = ceil(s N)``
(``t = k / N``), perturb ``x_k = x0 + sigma_k eps`` and take the remaining ``k`` deterministic DDIM steps
``x' = x_hat + (sigma'/sigma)(x - x_hat)`` with the new condition (e.g. another class). ``s = 1`` is plain
generation from ``x0 + sigma_max eps``; small ``s`` keeps more of the input; ``s = 0`` takes no step and returns
the input.

**Inpainting** (the known region re-imposed at every step, as in Song et al. 2021, "imputation", and RePaint
without resampling): ``mask = 1`` marks the known pixels. After every step to level ``sigma'`` the known region is
replaced by a fresh forward-process draw of the data, ``x' <- m (x0 + sigma' z) + (1 - m) x'``; at the last level
``sigma' = 0`` this is ``x0`` itself, so the known region of the output equals the input exactly.

**Latent space** (Meng et al. 2023, sec. 5.2-5.4, on a latent-diffusion student): :func:`edit_latents` encodes the
image with the VAE's posterior mean, ``z0 = s (E(x) - b)``, runs SDEdit or inpainting on ``z0`` with the latent
student, and decodes. The pixel mask becomes a latent mask by :func:`latent_mask` (a latent cell is known when all
pixels of its patch are), so the known *latents* are preserved exactly; the decoded known pixels are
``D(E(x))`` there only up to the decoder's receptive field. Strength 0 returns ``D(E(x))``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.distillation import distillation_sigmas
from diffusion_lab.diffusion.samplers._base import ddim_step, randn_like
from diffusion_lab.diffusion.schedules import NoiseSchedule

MaskName = Literal["left", "right", "top", "bottom", "center", "border"]


def edit_start(steps: int, strength: float) -> int:
    """Number of distilled steps ``k = ceil(strength * N)`` an SDEdit of ``strength`` takes (>= 1 for strength > 0;
    0 for strength 0, which returns the input)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"edit strength must be in [0, 1] (0 = the input, 1 = generate from pure noise), got {strength}"
        )
    if strength == 0:
        return 0
    return max(1, math.ceil(strength * steps - 1e-9))


def edit_sigmas(schedule: NoiseSchedule, steps: int, strength: float) -> Tensor:
    """The levels of an SDEdit: the last ``edit_start(N, s) + 1`` levels of the N-step grid (float64)."""
    grid = distillation_sigmas(schedule, steps)
    return grid[len(grid) - 1 - edit_start(steps, strength) :]


@torch.no_grad()
def sdedit(
    denoiser: DenoiserFn,
    images: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    **cond: Tensor,
) -> Tensor:
    """SDEdit with deterministic DDIM over ``sigmas`` (from :func:`edit_sigmas`): ``x = x0 + sigmas[0] eps``, then
    ``len(sigmas) - 1`` steps, one denoiser call each. Images (B, ...) in the data range; returns the same shape."""
    s = [float(v) for v in sigmas]
    x = images + s[0] * randn_like(images, generator)
    return _ddim_loop(denoiser, x, s, None, images, generator, cond)


def _ddim_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    s: list[float],
    mask: Tensor | None,
    known: Tensor,
    generator: torch.Generator | None,
    cond: dict[str, Tensor],
) -> Tensor:
    for i in range(len(s) - 1):
        sigma = torch.full((x.shape[0],), s[i], dtype=x.dtype, device=x.device)
        x = ddim_step(x, denoiser(x, sigma, **cond), s[i], s[i + 1])
        if mask is not None:
            noisy_known = known if s[i + 1] == 0 else known + s[i + 1] * randn_like(known, generator)
            x = torch.where(mask, noisy_known, x)
    return x


@torch.no_grad()
def inpaint(
    denoiser: DenoiserFn,
    images: Tensor,
    mask: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    **cond: Tensor,
) -> Tensor:
    """Fill the unknown region (``mask == 0``) of ``images`` with DDIM over ``sigmas`` (last one 0), re-imposing the
    known region (``mask == 1``) at every level (module docstring). ``mask`` broadcasts against ``images``.
    The known region of the result is ``images`` exactly."""
    if sigmas[-1] != 0:
        raise ValueError(f"inpainting must end at sigma = 0 (got last level {float(sigmas[-1])})")
    known_mask = torch.as_tensor(mask, device=images.device) > 0.5
    if torch.broadcast_shapes(known_mask.shape, images.shape) != images.shape:
        raise ValueError(
            f"mask of shape {tuple(known_mask.shape)} does not broadcast to {tuple(images.shape)}"
        )
    s = [float(v) for v in sigmas]
    x = images + s[0] * randn_like(images, generator)
    return _ddim_loop(denoiser, x, s, known_mask, images, generator, cond)


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """The known region ``mask`` (..., H, W) of the pixels on a latent grid (..., h, w) (H, W multiples of h, w):
    a latent cell is known iff every pixel of its (H/h) x (W/w) patch is known (a min-pool)."""
    h, w = int(latent_size[0]), int(latent_size[1])
    height, width = mask.shape[-2], mask.shape[-1]
    if height % h or width % w:
        raise ValueError(f"mask of size {height}x{width} is not a multiple of the latent size {h}x{w}")
    known = torch.as_tensor(mask).float()
    lead = known.shape[:-2]
    pooled = -F.max_pool2d(-known.reshape(-1, 1, height, width), (height // h, width // w))
    return pooled.reshape(*lead, h, w) > 0.5


@torch.no_grad()
def edit_latents(
    denoiser: DenoiserFn,
    codec: torch.nn.Module,
    images: Tensor,
    sigmas: Tensor,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    **cond: Tensor,
) -> tuple[Tensor, Tensor]:
    """SDEdit (``mask`` None; ``sigmas`` from :func:`edit_sigmas`) or inpainting (``mask``: the known pixels;
    ``sigmas`` the full grid) of ``images`` through a latent ``denoiser``: encode (posterior mean), edit the
    latents, decode. ``codec`` has ``encode(images) -> z`` and ``decode(z) -> images``
    (``pretrained.diffusers.LatentCodec``). Returns ``(decoded images, latents)``."""
    z0 = codec.encode(images)
    if mask is None:
        z = sdedit(denoiser, z0, sigmas, generator=generator, **cond)
    else:
        known = latent_mask(torch.as_tensor(mask, device=z0.device), tuple(z0.shape[-2:]))
        z = inpaint(denoiser, z0, known, sigmas, generator=generator, **cond)
    return codec.decode(z), z


def named_mask(name: MaskName, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """A (1, 1, H, W) bool mask of the *known* region for ``shape = (..., H, W)``: ``left`` keeps the left half (the
    right half is inpainted), likewise ``right``/``top``/``bottom``; ``center`` keeps everything but the central
    square of half the size; ``border`` keeps only that central square."""
    h, w = shape[-2], shape[-1]
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    central = (rows >= h // 4) & (rows < h - h // 4) & (cols >= w // 4) & (cols < w - w // 4)
    masks = {
        "left": cols < w // 2,
        "right": cols >= w // 2,
        "top": rows < h // 2,
        "bottom": rows >= h // 2,
        "center": ~central,
        "border": central,
    }
    if name not in masks:
        raise ValueError(f"unknown mask {name!r}; expected one of {sorted(masks)}")
    return masks[name][None, None]


__all__ = [
    "MaskName",
    "edit_latents",
    "edit_sigmas",
    "edit_start",
    "inpaint",
    "latent_mask",
    "named_mask",
    "sdedit",
]
