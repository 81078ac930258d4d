"""DiffuseIT's losses (Kwon & Ye, ICLR 2023, sec. 3): content, style, semantic divergence and regularisers.

Every loss is a pure function of features and returns one value per sample, shape (B,), so that a batch's
guidance gradient is the sum of independent per-image gradients. Token features are (B, T, D) with the
[CLS] token at index 0 (DINO ViT keys: the qkv projection of one block, all heads concatenated); CLIP
embeddings are unit vectors (B, E) or (B, N, E) for N augmented crops.

Content (DiffuseIT eqs. 5-6, after Splicing ViT, Tumanyan et al. 2022):

* :func:`structure_loss` ``||S(k(x)) - S(k(x_src))||^2 / T^2`` with the cosine self-similarity
  ``S(k)_ij = cos(k_i, k_j)`` (:func:`cosine_self_similarity`); zero exactly when the two self-similarity
  matrices agree, in particular for ``x = x_src``.
* :func:`patch_contrastive_loss`: InfoNCE per token i (CUT, Park et al. 2020): the positive is the source
  key at the same position, the negatives all other source keys,
  ``-log softmax_j(cos(k_i(x), k_j(x_src)) / tau)[j = i]``, averaged over the T tokens.

Style: :func:`cls_loss` ``||e_[CLS](x) - e_[CLS](x_trg)||^2 / D`` (image-guided, eq. 7);
:func:`clip_global_loss` ``-<mean_n E_I(aug_n(x)), v_trg>`` with the target direction of
:func:`clip_target_embedding` ``v_trg = normalize(E_T(d_trg) - l_s E_T(d_src) + l_i E_I(x_src))``
(text-guided, eq. 8; ``l_s = l_i = 0`` is the plain global CLIP loss); :func:`clip_directional_loss`
``1 - cos(E_I(aug_n(x)) - E_I(x_src), E_T(d_trg) - E_T(d_src))`` (StyleGAN-NADA, Gal et al. 2022), zero
exactly when the image embedding has moved along the text direction.

Semantic divergence (eq. 9): :func:`semantic_divergence_loss` ``-||e_[CLS](x0_t) - sg(e_[CLS](x0_{t+1}))||^2 / D``:
decreasing it pushes this step's prediction away from the previous step's.

Regularisers: :func:`range_loss` (mean squared excess outside [-1, 1]), :func:`pixel_mse`.

Helpers: :func:`noisy_mix` (DiffuseIT's "noise-augmented" loss input), :func:`random_crop_affines` /
:func:`augment_crops` (CLIP's augmentations as one differentiable ``grid_sample`` per crop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.denoiser import append_dims


def _check_tokens(name: str, a: Tensor, b: Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            f"{name} expects two token tensors of the same shape (B, T, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# ---------------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------------
def cosine_self_similarity(tokens: Tensor) -> Tensor:
    """``S_ij = cos(t_i, t_j)``: (B, T, D) -> (B, T, T)."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)


def structure_loss(keys: Tensor, source_keys: Tensor) -> Tensor:
    """Mean squared difference of the key self-similarity matrices (B,); the source side is not differentiated."""
    _check_tokens("structure_loss", keys, source_keys)
    diff = cosine_self_similarity(keys) - cosine_self_similarity(source_keys.detach())
    return diff.pow(2).mean(dim=(1, 2))


def patch_contrastive_loss(keys: Tensor, source_keys: Tensor, temperature: float = 0.07) -> Tensor:
    """Per-token InfoNCE against the source keys (positive: same position; negatives: all others), mean over
    tokens (B,). Logits are cosine similarities divided by ``temperature``."""
    _check_tokens("patch_contrastive_loss", keys, source_keys)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = F.normalize(keys, dim=-1) @ F.normalize(source_keys.detach(), dim=-1).transpose(1, 2)
    log_prob = torch.log_softmax(logits / temperature, dim=-1)  # (B, T, T): row i = query token i
    return -log_prob.diagonal(dim1=1, dim2=2).mean(dim=1)


# ---------------------------------------------------------------------------------------------------
# Style and semantic divergence ([CLS] tokens)
# ---------------------------------------------------------------------------------------------------
def cls_loss(cls: Tensor, target_cls: Tensor) -> Tensor:
    """``mean_d (cls - target_cls)^2`` per sample (B,); the target is not differentiated."""
    if cls.ndim != 2 or cls.shape != target_cls.shape:
        raise ValueError(
            f"cls_loss expects (B, D) tensors of one shape, got {tuple(cls.shape)}, {tuple(target_cls.shape)}"
        )
    return (cls - target_cls.detach()).pow(2).mean(dim=1)


def semantic_divergence_loss(cls: Tensor, previous_cls: Tensor) -> Tensor:
    """``-mean_d (cls - sg(previous_cls))^2`` (B,): zero when consecutive predictions agree, negative otherwise,
    so that minimising it drives this step's [CLS] away from the previous step's."""
    return -cls_loss(cls, previous_cls)


# ---------------------------------------------------------------------------------------------------
# CLIP (text-guided style)
# ---------------------------------------------------------------------------------------------------
def clip_target_embedding(
    target_text: Tensor,
    source_text: Tensor | None = None,
    source_image: Tensor | None = None,
    lambda_source_text: float = 0.4,
    lambda_source_image: float = 0.2,
) -> Tensor:
    """DiffuseIT's CLIP target ``normalize(E_T(d_trg) - l_s E_T(d_src) + l_i E_I(x_src))`` (B, E)."""
    target = target_text.clone()
    if source_text is not None and lambda_source_text:
        target = target - lambda_source_text * source_text
    if source_image is not None and lambda_source_image:
        target = target + lambda_source_image * source_image
    return F.normalize(target, dim=-1)


def clip_global_loss(crop_embeddings: Tensor, target: Tensor) -> Tensor:
    """``-<mean_n e_n, target>`` (B,) for unit crop embeddings (B, N, E) and a unit target (B, E)."""
    if crop_embeddings.ndim != 3 or target.shape != (crop_embeddings.shape[0], crop_embeddings.shape[2]):
        raise ValueError(
            f"expected crop embeddings (B, N, E) and a target (B, E), got {tuple(crop_embeddings.shape)}, "
            f"{tuple(target.shape)}"
        )
    return -(crop_embeddings.mean(dim=1) * target.detach()).sum(dim=-1)


def clip_directional_loss(
    crop_embeddings: Tensor, source_image: Tensor, target_text: Tensor, source_text: Tensor
) -> Tensor:
    """``mean_n 1 - cos(e_n - E_I(x_src), E_T(d_trg) - E_T(d_src))`` (B,) (StyleGAN-NADA's directional loss)."""
    image_dir = crop_embeddings - source_image.detach()[:, None]  # (B, N, E)
    text_dir = (target_text - source_text).detach()[:, None]  # (B, 1, E)
    return (1 - F.cosine_similarity(image_dir, text_dir, dim=-1, eps=1e-12)).mean(dim=1)


# ---------------------------------------------------------------------------------------------------
# Regularisers
# ---------------------------------------------------------------------------------------------------
def range_loss(x: Tensor) -> Tensor:
    """Mean squared excess of the values outside [-1, 1], per sample (B,)."""
    return (x - x.clamp(-1, 1)).pow(2).flatten(1).mean(dim=1)


def pixel_mse(x: Tensor, reference: Tensor) -> Tensor:
    """Per-sample mean squared error to a (not differentiated) reference image, (B,)."""
    if x.shape != reference.shape:
        raise ValueError(f"pixel_mse: shapes differ, {tuple(x.shape)} vs {tuple(reference.shape)}")
    return (x - reference.detach()).pow(2).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------------------
# Loss inputs
# ---------------------------------------------------------------------------------------------------
def noisy_mix(x0_hat: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """DiffuseIT's noise-augmented input ``x0_hat sqrt(1 - abar) + x_vp (1 - sqrt(1 - abar))``.

    Written in the VE view (``x = x0 + sigma eps``): ``x_vp = x / sqrt(1 + sigma^2)`` and
    ``sqrt(1 - abar) = sigma / sqrt(1 + sigma^2)``. At ``sigma -> 0`` it returns ``x0_hat``.
    """
    s = append_dims(sigma.to(x.dtype), x.ndim)
    root = torch.rsqrt(1 + s**2)
    weight = s * root
    return x0_hat * weight + x * root * (1 - weight)


def random_crop_affines(
    count: int,
    generator: torch.Generator | None = None,
    *,
    max_rotation_deg: float = 10.0,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (0.9, 1.1),
    flip: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """``count`` affine maps (count, 2, 3) for ``affine_grid``: random rotation, resized crop and flip.

    The torchvision chain ``RandomRotation(10), RandomResizedCrop(scale=(0.8, 1), ratio=(0.9, 1.1)),
    RandomHorizontalFlip`` that DiffuseIT applies before CLIP, as one sampling map in normalised
    coordinates: a crop of area fraction ``s`` and aspect ``r`` has half-extents ``sqrt(s r)`` and
    ``sqrt(s / r)`` (clipped to the image), a random centre inside the image, then the rotation about the
    image centre.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if generator is not None:
        device = generator.device
    u = torch.rand(count, 6, generator=generator, device=device, dtype=torch.float64)
    angle = math.radians(max_rotation_deg) * (2 * u[:, 0] - 1)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 2]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx, cy = (1 - w) * (2 * u[:, 3] - 1), (1 - h) * (2 * u[:, 4] - 1)
    sign = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if flip else torch.ones_like(w)
    cos, sin = angle.cos(), angle.sin()
    crop = torch.zeros(count, 3, 3, dtype=torch.float64, device=u.device)
    crop[:, 0, 0], crop[:, 0, 2] = w * sign, cx
    crop[:, 1, 1], crop[:, 1, 2] = h, cy
    crop[:, 2, 2] = 1
    rotation = torch.zeros_like(crop)
    rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, -sin, sin, cos
    rotation[:, 2, 2] = 1
    return (rotation @ crop)[:, :2].float()


def augment_crops(
    images: Tensor, count: int, size: int | tuple[int, int], generator: torch.Generator | None = None
) -> Tensor:
    """``count`` random augmented crops of each image: (B, C, H, W) in [-1, 1] -> (B * count, C, *size).

    Differentiable in ``images`` (bilinear ``grid_sample``); area outside the rotated image is black (-1),
    as torchvision's rotation fill of 0 in [0, 1]. Crop ``n`` of image ``b`` is row ``b * count + n``.
    """
    b, c = images.shape[:2]
    size = (size, size) if isinstance(size, int) else tuple(size)
    theta = random_crop_affines(b * count, generator, device=images.device).to(images)
    grid = F.affine_grid(theta, [b * count, c, *size], align_corners=False)
    repeated = images.repeat_interleave(count, dim=0)
    return F.grid_sample(repeated + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


__all__ = [
    "augment_crops",
    "clip_directional_loss",
    "clip_global_loss",
    "clip_target_embedding",
    "cls_loss",
    "cosine_self_similarity",
    "noisy_mix",
    "patch_contrastive_loss",
    "pixel_mse",
    "random_crop_affines",
    "range_loss",
    "semantic_divergence_loss",
    "structure_loss",
]
