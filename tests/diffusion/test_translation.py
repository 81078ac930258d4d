"""DiffuseIT's reverse loop (guided DDPM from the noised source, resampling, restarts) against an independent
guided-diffusion-style loop written in VP coordinates, with an exact Gaussian denoiser and a pixel "ViT"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gaussian_image_prior import GaussianImagePrior
from torch import nn
from translation_weights import NO_LOSSES

from diffusion_lab.diffusion.samplers import sample_ddpm
from diffusion_lab.diffusion.schedules import DiscreteVP
from diffusion_lab.diffusion.translation import (
    DiffuseITObjective,
    TranslationConfig,
    color_transfer_mkl,
    diffuseit_translate,
    guidance_variances,
    translation_sigmas,
)
from diffusion_lab.diffusion.translation_losses import noisy_mix
from diffusion_lab.pretrained.dino import ViTFeatures

SHAPE = (3, 4, 4)
ZERO = NO_LOSSES


class PixelViT(nn.Module):
    """A stand-in ViT: tokens are [mean, 2x2 patches] of the image, keys = tokens (smooth and cheap)."""

    depth = 1

    def forward(self, images: torch.Tensor, blocks=(-1,)) -> ViTFeatures:
        patches = F.unfold(images, 2, stride=2).transpose(1, 2)  # (B, P, 4 C)
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
        feats = ViTFeatures()
        for b in blocks:
            feats.keys[b] = feats.tokens[b] = tokens.tanh()
        return feats


class Counting(nn.Module):
    """Records the noise level of every denoiser call."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser, self.sigmas = denoiser, []

    def forward(self, x, sigma, **cond):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.denoiser(x, sigma, **cond)


@pytest.fixture(scope="module")
def prior() -> GaussianImagePrior:
    d = math.prod(SHAPE)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return GaussianImagePrior(
        0.2 * torch.randn(d, generator=g, dtype=torch.float64),
        0.3 * a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64),
        SHAPE,
    )


def _source(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def _objective(config: TranslationConfig, source: torch.Tensor, **kw) -> DiffuseITObjective:
    return DiffuseITObjective(config, PixelViT(), source, **kw)


# --------------------------------------------------------------------------------------- grid, variances
def test_grid_and_guidance_variances_are_guided_diffusions_respaced_betas():
    grid = translation_sigmas(nn.Identity(), 10).tolist()
    abar = [1 / (1 + s**2) for s in grid]  # 1 at the final sigma = 0
    assert grid == DiscreteVP().respaced_sigmas(10).tolist()
    beta = [1 - abar[i] / abar[i + 1] for i in range(10)]
    torch.testing.assert_close(torch.tensor(guidance_variances(grid, "large")), torch.tensor(beta))
    small = [beta[i] * (1 - abar[i + 1]) / (1 - abar[i]) for i in range(10)]
    small[-1] = small[-2]  # the clipped log-variance of guided-diffusion at t = 0
    torch.testing.assert_close(torch.tensor(guidance_variances(grid, "small")), torch.tensor(small))


# --------------------------------------------------------------------------------------- the loop
def test_without_losses_it_is_ddpm_from_the_noised_source_at_the_skip_level(prior):
    cfg = TranslationConfig(respacing=12, skip=5, resample_steps=0, **ZERO)
    src = _source()
    out = diffuseit_translate(prior, src, _objective(cfg, src), generator=torch.Generator().manual_seed(3))
    grid = translation_sigmas(prior, 12)
    g = torch.Generator().manual_seed(3)
    x = src + grid[5] * torch.randn(src.shape, generator=g, dtype=src.dtype)
    ref = sample_ddpm(prior, x, grid[5:].to(src.dtype), variance="small", generator=g)
    torch.testing.assert_close(out, ref)


def _vp_reference(denoiser, source, cfg, make_objective, seed):
    """guided-diffusion's p_sample with condition_mean, in VP coordinates: mean' = mu - Var grad_{x_vp} L,
    resampling by the forward transition sqrt(1 - beta) x + sqrt(beta) z back to the step's level."""
    grid = translation_sigmas(denoiser, cfg.respacing).tolist()
    abar = [1 / (1 + s**2) for s in grid]
    var = []
    for i in range(cfg.respacing):
        beta = 1 - abar[i] / abar[i + 1]
        var.append(beta * (1 - abar[i + 1]) / (1 - abar[i]))
    var[-1] = var[-2]  # guidance variance at the last step (clipped log-variance)
    objective = make_objective()
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(source.shape, generator=g, dtype=source.dtype)
    x = math.sqrt(abar[cfg.skip]) * source + math.sqrt(1 - abar[cfg.skip]) * eps
    n = cfg.respacing
    for i in range(cfg.skip, n):
        a, a_prev = abar[i], abar[i + 1]
        beta = 1 - a / a_prev
        repeats = cfg.resample_count if i - cfg.skip < cfg.resample_steps else 1
        for r in range(repeats):
            objective.begin_step(n - 1 - i)
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                level = torch.full((x.shape[0],), grid[i], dtype=torch.float32)
                x0 = denoiser(x_in / math.sqrt(a), level)
                loss = objective(x0, x=x_in / math.sqrt(a), sigma=level).sum()
                (grad,) = torch.autograd.grad(loss, x_in)
            x0 = x0.detach()
            mu = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * x
            mu = mu - var[i] * grad
            post = beta * (1 - a_prev) / (1 - a)
            if grid[i + 1] > 0:
                mu = mu + math.sqrt(post) * torch.randn(x.shape, generator=g, dtype=x.dtype)
            if r < repeats - 1:
                mu = math.sqrt(1 - beta) * mu + math.sqrt(beta) * torch.randn(
                    x.shape, generator=g, dtype=x.dtype
                )
            x = mu
    return x  # abar = 1 at sigma = 0: VP and VE coincide


@pytest.mark.parametrize("mix", [False, True])
def test_guided_loop_equals_guided_diffusions_vp_update_with_resampling(prior, mix):
    cfg = TranslationConfig(
        respacing=9,
        skip=5,
        resample_steps=2,
        resample_count=2,
        **{**ZERO, "structure_weight": 50.0, "range_weight": 20.0},
        source_mse_weight=300.0,
        source_mse_min_index=1,
        vit_noisy_mix=mix,
    )
    src = _source()
    out = diffuseit_translate(prior, src, _objective(cfg, src), generator=torch.Generator().manual_seed(7))
    ref = _vp_reference(prior, src, cfg, lambda: _objective(cfg, src), seed=7)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # the guidance is not negligible: without the losses the result is far away
    plain = TranslationConfig(respacing=9, skip=5, resample_steps=2, resample_count=2, **ZERO)
    unguided = diffuseit_translate(
        prior, src, _objective(plain, src), generator=torch.Generator().manual_seed(7)
    )
    assert (out - unguided).abs().max() > 1e-2


def test_start_level_resampling_count_and_evaluations_are_honoured(prior):
    cfg = TranslationConfig(respacing=8, skip=3, resample_steps=2, resample_count=3, **ZERO)
    counting = Counting(prior)
    src = _source()
    calls = []
    diffuseit_translate(
        counting,
        src,
        _objective(cfg, src),
        generator=torch.Generator().manual_seed(0),
        callback=lambda info: calls.append((info["index"], info["repeat"])),
    )
    grid = translation_sigmas(prior, 8).tolist()
    expected = [grid[3]] * 3 + [grid[4]] * 3 + grid[5:8]
    assert counting.sigmas == pytest.approx(expected, rel=1e-6)
    assert len(counting.sigmas) == cfg.evaluations == 5 + 2 * 2
    assert calls == [(4, 0), (4, 1), (4, 2), (3, 0), (3, 1), (3, 2), (2, 0), (1, 0), (0, 0)]


def test_runs_are_deterministic_under_a_seed(prior):
    cfg = TranslationConfig(respacing=6, skip=2, resample_count=2, **{**ZERO, "structure_weight": 10.0})
    src = _source()

    def run(seed):
        return diffuseit_translate(
            prior, src, _objective(cfg, src), generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(4), run(4))
    assert not torch.allclose(run(4), run(5))


def test_range_restart_starts_over_at_most_max_restarts_times(prior):
    cfg = TranslationConfig(
        respacing=6,
        skip=1,
        resample_steps=1,
        resample_count=2,
        **{**ZERO, "range_weight": 1.0},
        restart_range_threshold=-1.0,
        max_restarts=2,
    )  # threshold < 0: every run asks for a restart after its second step
    counting, attempts = Counting(prior), []
    src = _source()
    diffuseit_translate(
        counting,
        src,
        _objective(cfg, src),
        generator=torch.Generator().manual_seed(0),
        callback=lambda info: attempts.append(info["attempt"]),
    )
    # aborted runs: 2 evaluations at the first step + 1 at the second; the last run finishes (6 evaluations)
    assert attempts == [0] * 3 + [1] * 3 + [2] * cfg.evaluations
    assert counting.sigmas[3] == counting.sigmas[0]  # a restart begins again at the start level


# --------------------------------------------------------------------------------------- objective terms
def test_terms_vanish_where_they_should():
    src, trg = _source(seed=1), _source(seed=2)
    cfg = TranslationConfig(respacing=10, skip=2, vit_noisy_mix=False, semantic_min_index=5)
    obj = _objective(cfg, src, target_image=trg, image_mask=torch.tensor([True, False]))
    zero_sigma = torch.zeros(2, dtype=src.dtype)
    obj.begin_step(9)
    obj(src.clone(), x=src, sigma=zero_sigma)
    assert torch.equal(obj.terms["structure"], torch.zeros(2, dtype=src.dtype))  # x0_hat == source
    assert torch.equal(obj.terms["semantic"], torch.zeros(2, dtype=src.dtype))  # previous [CLS] = source's
    assert obj.terms["cls"][1] == 0 and obj.terms["cls"][0] > 0  # only image-guided rows have a [CLS] loss
    x0 = trg.clone()
    x0[1] = src[1]
    obj.begin_step(8)
    obj(x0, x=x0, sigma=zero_sigma)
    assert obj.terms["cls"][0] == 0  # x0_hat == target
    cls_now, cls_prev = PixelViT()(x0).cls(-1), PixelViT()(src).cls(-1)
    expected = -cfg.semantic_weight * (cls_now - cls_prev).pow(2).mean(1)
    torch.testing.assert_close(
        obj.terms["semantic"], expected
    )  # negative when consecutive predictions differ
    assert obj.terms["semantic"][0] < 0 and obj.terms["semantic"][1] == 0
    obj.begin_step(5)  # index <= semantic_min_index: the term is off
    obj(x0, x=x0, sigma=zero_sigma)
    assert "semantic" not in obj.terms


def test_contrastive_boost_doubles_the_term_once_the_clip_loss_is_low():
    src, x0 = _source(seed=1), _source(seed=3)
    base = TranslationConfig(**{**ZERO, "contrastive_weight": 1.0})
    boosted = TranslationConfig(**{**ZERO, "contrastive_weight": 1.0}, contrastive_boost_below=1.0)
    terms = []
    for cfg in (base, boosted):
        obj = _objective(cfg, src)
        obj(x0, x=x0, sigma=torch.ones(2))
        terms.append(obj.terms["contrastive"])
    torch.testing.assert_close(terms[1], 2 * terms[0])  # last CLIP loss 0 < 1: boosted


def test_objective_rejects_inconsistent_inputs():
    src = _source()
    with pytest.raises(ValueError, match="no CLIP encoder"):
        _objective(TranslationConfig(), src, prompts=["a tiger", ""])
    with pytest.raises(ValueError, match="must match source"):
        _objective(TranslationConfig(), src, target_image=src[:, :, :2])
    with pytest.raises(ValueError, match="one prompt"):
        _objective(TranslationConfig(), src, prompts=["a"])
    with pytest.raises(ValueError, match="skip"):
        TranslationConfig(respacing=10, skip=10)
    with pytest.raises(ValueError, match="structure_weight"):
        TranslationConfig(structure_weight=-1.0)


def test_noisy_mix_feeds_the_vit_when_enabled():
    src, x0, x = _source(seed=1), _source(seed=2), _source(seed=3)
    sigma = torch.full((2,), 0.7, dtype=torch.float64)
    cfg = TranslationConfig(**{**ZERO, "structure_weight": 1.0}, vit_noisy_mix=True)
    obj = _objective(cfg, src)
    obj(x0, x=x, sigma=sigma)
    direct = _objective(TranslationConfig(**{**ZERO, "structure_weight": 1.0}, vit_noisy_mix=False), src)
    direct(noisy_mix(x0, x, sigma), x=x, sigma=sigma)
    torch.testing.assert_close(obj.terms["structure"], direct.terms["structure"])


# --------------------------------------------------------------------------------------- colour transfer
def test_colour_transfer_gives_the_reference_colour_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    mix = torch.tensor([[1.0, 0.3, 0.0], [0.2, 0.5, 0.1], [0.0, 0.4, 0.9]], dtype=torch.float64)
    refs = torch.einsum("ij,bjhw->bihw", mix, torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)) - 0.3
    out = color_transfer_mkl(images, refs, eps=0.0)

    def stats(x):
        flat = x.flatten(2)
        centred = flat - flat.mean(-1, keepdim=True)
        return flat.mean(-1), centred @ centred.transpose(1, 2) / flat.shape[-1]

    for a, b in zip(stats(out), stats(refs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
