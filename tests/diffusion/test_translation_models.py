"""DiffuseIT's objective on the real architectures (tiny random ADM UNet, DINO ViT, CLIP): every term reaches
x_t through the denoiser, and a gradient step on x_t lowers the loss of the new x0_hat."""

from __future__ import annotations

import pytest
import torch
from translation_weights import NO_LOSSES

from diffusion_lab.diffusion.translation import DiffuseITObjective, TranslationConfig
from diffusion_lab.diffusion.translation_losses import structure_loss
from diffusion_lab.methods.translation import random_pretrained_models

RES = 16
OFF = NO_LOSSES


@pytest.fixture(scope="module")
def models():
    return random_pretrained_models("tiny", RES, seed=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(2, 3, RES, RES, generator=g) * 2 - 1 for _ in range(3)]


def _objective(models, images, **weights) -> DiffuseITObjective:
    _, vit, clip = models
    src, trg, _ = images
    cfg = TranslationConfig(
        **{**OFF, **weights}, clip_crops=2, semantic_min_index=-1, source_mse_min_index=-1
    )
    return DiffuseITObjective(
        cfg,
        vit,
        src,
        target_image=trg,
        image_mask=torch.tensor([True, False]),
        clips=[clip],
        prompts=["", "a photo of a tiger"],
        source_prompts=["", "a photo of a cat"],
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(
    "term, weight, row",
    [
        ("structure", "structure_weight", 0),
        ("contrastive", "contrastive_weight", 0),
        ("cls", "cls_weight", 0),
        ("target_mse", "target_mse_weight", 0),
        ("clip", "clip_weight", 1),
        ("clip_directional", "clip_directional_weight", 1),
        ("semantic", "semantic_weight", 0),
        ("range", "range_weight", 0),
        ("source_mse", "source_mse_weight", 0),
    ],
)
def test_each_term_has_a_nonzero_gradient_with_respect_to_x_t_through_the_denoiser(
    models, images, term, weight, row
):
    denoiser = models[0]
    obj = _objective(models, images, **{weight: 1.0})
    x = (3.0 * images[2]).requires_grad_(True)  # x_t at sigma = 2: x0_hat leaves [-1, 1] (range term)
    sigma = torch.full((2,), 2.0)
    loss = obj(denoiser(x, sigma), x=x, sigma=sigma)
    assert set(obj.terms) == {term}
    (grad,) = torch.autograd.grad(loss[row], x)
    assert torch.isfinite(grad).all() and grad[row].abs().sum() > 0
    assert grad[1 - row].abs().sum() == 0  # per-sample losses: no cross-talk between the images


def test_structure_term_is_zero_for_the_source_through_the_real_vit(models, images):
    _, vit, _ = models
    src = images[0]
    keys = vit(src).keys[-1]
    assert torch.equal(structure_loss(keys, keys), torch.zeros(2))
    obj = _objective(models, images, structure_weight=1.0, cls_weight=1.0)
    obj.config.vit_noisy_mix = False
    obj(src, x=src, sigma=torch.zeros(2))
    assert obj.terms["structure"].abs().max() < 1e-10
    obj(images[1], x=images[1], sigma=torch.zeros(2))
    assert obj.terms["cls"][0].abs() < 1e-10  # x0_hat == target on the image-guided row


def test_a_gradient_step_on_x_t_lowers_the_loss_of_the_new_x0_hat(models, images):
    denoiser = models[0]
    obj = _objective(
        models,
        images,
        structure_weight=1000.0,
        contrastive_weight=200.0,
        cls_weight=2000.0,
        clip_weight=2000.0,
    )
    sigma = torch.full((2,), 0.5)
    x = images[2] * 1.2

    def total(x_in: torch.Tensor) -> torch.Tensor:
        obj.generator.manual_seed(0)  # the same CLIP crops on both sides of the comparison
        return obj(denoiser(x_in, sigma), x=x_in, sigma=sigma)

    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        before = total(x_in)
        (grad,) = torch.autograd.grad(before.sum(), x_in)
    with torch.no_grad():
        for step in (1e-3, 1e-2):
            after = total(x - step * grad / grad.flatten(1).norm(dim=1)[:, None, None, None])
            assert (after < before.detach()).all(), (step, before, after)
