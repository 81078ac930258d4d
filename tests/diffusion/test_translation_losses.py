"""DiffuseIT's losses against brute-force loops and the identities that define them (Kwon & Ye 2023, sec. 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.diffusion import translation_losses as tl


def _keys(b: int = 2, t: int = 5, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


# --------------------------------------------------------------------------------------- structure
def test_structure_loss_matches_a_double_loop_over_token_pairs():
    keys, src = _keys(seed=1), _keys(seed=2)
    out = tl.structure_loss(keys, src)
    for b in range(keys.shape[0]):
        t = keys.shape[1]
        total = sum(
            (_cos(keys[b, i], keys[b, j]) - _cos(src[b, i], src[b, j])) ** 2
            for i in range(t)
            for j in range(t)
        )
        assert out[b].item() == pytest.approx(total / t**2, rel=1e-12)


def test_structure_loss_is_zero_exactly_when_the_self_similarities_agree():
    src = _keys()
    assert torch.equal(tl.structure_loss(src, src), torch.zeros(2, dtype=src.dtype))
    # cosine self-similarity ignores each token's length: rescaled tokens keep the structure
    scaled = src * torch.rand(2, 5, 1, dtype=src.dtype).add(0.5)
    assert tl.structure_loss(scaled, src).abs().max() < 1e-14
    assert (tl.structure_loss(_keys(seed=3), src) > 1e-3).all()


def test_structure_loss_does_not_differentiate_the_source():
    keys, src = _keys(seed=1).requires_grad_(True), _keys(seed=2).requires_grad_(True)
    tl.structure_loss(keys, src).sum().backward()
    assert keys.grad.abs().sum() > 0 and src.grad is None


# --------------------------------------------------------------------------------------- contrastive
def _public_patch_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """The public code's PatchLoss for one image: positive logit first, the diagonal of the negatives
    masked with -10, cross-entropy with class 0, mean over the tokens."""
    t = q.shape[0]
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
    pos = cos.diagonal()[:, None]
    neg = cos.masked_fill(torch.eye(t, dtype=torch.bool), -10.0)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(t, dtype=torch.long))


def test_patch_contrastive_loss_matches_the_public_infonce_and_a_scalar_loop():
    keys, src = _keys(seed=4), _keys(seed=5)
    out = tl.patch_contrastive_loss(keys, src, temperature=0.07)
    for b in range(2):
        assert out[b].item() == pytest.approx(_public_patch_loss(keys[b], src[b], 0.07).item(), rel=1e-9)
        t = keys.shape[1]
        loop = 0.0
        for i in range(t):
            logits = [_cos(keys[b, i], src[b, j]) / 0.5 for j in range(t)]
            loop += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        assert tl.patch_contrastive_loss(keys, src, 0.5)[b].item() == pytest.approx(loop / t, rel=1e-12)


def test_patch_contrastive_loss_is_lowest_at_the_source_among_token_permutations():
    # orthogonal source tokens: the loss at x == source is its minimum log(1 + (T - 1) e^{-1/tau}) + ...
    src = torch.eye(6, dtype=torch.float64)[None]
    at_source = tl.patch_contrastive_loss(src, src, 0.1)
    assert at_source.item() == pytest.approx(math.log(1 + 5 * math.exp(-1 / 0.1)), rel=1e-12)
    for shift in range(1, 6):
        assert tl.patch_contrastive_loss(src.roll(shift, dims=1), src, 0.1) > at_source + 5


def test_contrastive_rejects_a_bad_temperature_and_mismatched_tokens():
    with pytest.raises(ValueError, match="temperature"):
        tl.patch_contrastive_loss(_keys(), _keys(), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        tl.structure_loss(_keys(t=5), _keys(t=4))


# --------------------------------------------------------------------------------------- [CLS] losses
def test_cls_loss_and_semantic_divergence():
    cls, target = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    expected = torch.stack([sum((cls[b, d] - target[b, d]) ** 2 for d in range(8)) / 8 for b in range(3)])
    torch.testing.assert_close(tl.cls_loss(cls, target), expected)
    assert torch.equal(tl.cls_loss(target, target), torch.zeros(3, dtype=torch.float64))
    # semantic divergence: zero for equal consecutive predictions, minus the [CLS] MSE otherwise
    assert torch.equal(tl.semantic_divergence_loss(cls, cls), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(tl.semantic_divergence_loss(cls, target), -expected)
    # its gradient points away from the previous [CLS]: a descent step increases the distance
    x = cls.clone().requires_grad_(True)
    tl.semantic_divergence_loss(x, target).sum().backward()
    moved = cls - 0.1 * x.grad
    assert ((moved - target).norm(dim=1) > (cls - target).norm(dim=1)).all()


# --------------------------------------------------------------------------------------- CLIP
def test_clip_target_embedding_is_the_normalised_combination():
    g = torch.Generator().manual_seed(0)
    trg, src_t, src_i = (F.normalize(torch.randn(2, 6, generator=g), dim=-1) for _ in range(3))
    out = tl.clip_target_embedding(trg, src_t, src_i, 0.4, 0.2)
    raw = trg - 0.4 * src_t + 0.2 * src_i
    torch.testing.assert_close(out, raw / raw.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(tl.clip_target_embedding(trg, src_t, src_i, 0.0, 0.0), trg)


def test_clip_global_loss_is_minus_the_mean_cosine_and_minimal_on_the_target():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(2, 4, 6, generator=g), dim=-1)
    target = F.normalize(torch.randn(2, 6, generator=g), dim=-1)
    out = tl.clip_global_loss(emb, target)
    for b in range(2):
        assert out[b].item() == pytest.approx(
            -sum(_cos(emb[b, n], target[b]) for n in range(4)) / 4, rel=1e-6
        )
    on_target = tl.clip_global_loss(target[:, None].expand(2, 4, 6), target)
    torch.testing.assert_close(on_target, torch.full((2,), -1.0))
    assert (out > on_target).all()


def test_clip_directional_loss_is_zero_along_the_text_direction_and_two_against_it():
    g = torch.Generator().manual_seed(2)
    src_img, trg_txt, src_txt = (F.normalize(torch.randn(2, 6, generator=g), dim=-1) for _ in range(3))
    direction = trg_txt - src_txt
    along = src_img[:, None] + torch.tensor([0.1, 0.5, 2.0])[None, :, None] * direction[:, None]
    torch.testing.assert_close(
        tl.clip_directional_loss(along, src_img, trg_txt, src_txt), torch.zeros(2), atol=1e-6, rtol=0
    )
    against = src_img[:, None] - 0.3 * direction[:, None]
    torch.testing.assert_close(
        tl.clip_directional_loss(against, src_img, trg_txt, src_txt), torch.full((2,), 2.0)
    )
    other = F.normalize(torch.randn(2, 3, 6, generator=g), dim=-1)
    loop = [sum(1 - _cos(other[b, n] - src_img[b], direction[b]) for n in range(3)) / 3 for b in range(2)]
    torch.testing.assert_close(
        tl.clip_directional_loss(other, src_img, trg_txt, src_txt), torch.tensor(loop), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------------- regularisers
def test_range_loss_is_zero_inside_and_the_mean_squared_excess_outside():
    x = torch.tensor([[[[0.5, -1.0], [1.5, -3.0]]]])
    assert tl.range_loss(x).item() == pytest.approx((0.5**2 + 2.0**2) / 4)
    assert tl.range_loss(x.clamp(-1, 1)).item() == 0.0


def test_noisy_mix_is_the_public_vp_formula():
    """x0_hat sqrt(1 - abar) + x_vp (1 - sqrt(1 - abar)) with x_vp = sqrt(abar) x_ve, sigma^2 = (1 - abar)/abar."""
    g = torch.Generator().manual_seed(3)
    x0, x = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.01])
    sigma = ((1 - abar) / abar).sqrt()
    fac = (1 - abar).sqrt()[:, None, None, None]
    expected = x0 * fac + abar.sqrt()[:, None, None, None] * x * (1 - fac)
    torch.testing.assert_close(tl.noisy_mix(x0, x, sigma), expected)
    torch.testing.assert_close(tl.noisy_mix(x0, x, torch.zeros(3)), x * 1.0)  # sigma = 0: no x0_hat weight


# --------------------------------------------------------------------------------------- augmentations
def test_crop_affines_without_randomness_are_the_identity():
    theta = tl.random_crop_affines(3, max_rotation_deg=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))

    g = torch.Generator().manual_seed(0)
    theta_g = tl.random_crop_affines(4, g)
    assert theta_g.shape == (4, 2, 3)


def test_augmented_crops_of_a_ramp_are_ramps_with_the_sampled_extent():
    """Bilinear sampling of the ramp I(u, v) = u (normalised coordinates) is exact: each crop is the affine
    ramp ``theta[0, 0] u' + theta[0, 1] v' + theta[0, 2]`` over the output grid (no rotation: no padding)."""
    size = 32
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # align_corners=False pixel centres
    ramp = coords[None, None, None, :].expand(1, 3, size, size).clone()
    gen = torch.Generator().manual_seed(5)
    crops = tl.augment_crops(ramp, 6, 16, gen)
    theta = tl.random_crop_affines(6, torch.Generator().manual_seed(5))
    out_coords = (torch.arange(16) + 0.5) / 16 * 2 - 1
    for n in range(6):
        a, b, c = theta[n, 0].tolist()
        expected = a * out_coords[None, :] + b * out_coords[:, None] + c
        interior = expected.abs() < 1 - 1 / size  # away from the border pixels (zero padding there)
        inside = interior & (
            (
                theta[n, 1, 0] * out_coords[None, :] + theta[n, 1, 1] * out_coords[:, None] + theta[n, 1, 2]
            ).abs()
            < 1 - 1 / size
        )
        assert inside.sum() > 100
        torch.testing.assert_close(crops[n, 0][inside], expected[inside], atol=1e-5, rtol=0)
        # half-extent of the crop along x: sqrt(area * ratio) within the configured ranges
        extent = math.hypot(a, theta[n, 1, 0].item())
        assert math.sqrt(0.8 * 0.9) - 1e-6 <= extent <= min(1.0, math.sqrt(1.0 * 1.1)) + 1e-6


def test_augment_crops_are_differentiable_and_row_ordered_by_image():
    img = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_(True)
    crops = tl.augment_crops(img, 3, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 8, 8)
    crops[:3].sum().backward()  # the first three crops come from image 0 only
    assert img.grad[0].abs().sum() > 0 and img.grad[1].abs().sum() == 0
