"""DiffusionModule trained on the analytic 2-D mixture approaches the exact optimum; bf16-mixed trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from diffusion_lab.data.toy import GaussianMixture2D
from diffusion_lab.diffusion.losses import DenoisingLoss
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.sampling import GuidedSamplerConfig
from diffusion_lab.nets.mlp import MLP


def _module(num_classes: int = 3, lr: float = 2e-3) -> DiffusionModule:
    return DiffusionModule(
        MLP(dim=2, hidden=128, depth=3, num_classes=num_classes),
        loss=DenoisingLoss(weighting="edm", sigma_data=0.9),
        sigma_data=0.9,
        num_classes=num_classes,
        label_dropout=0.1,
        ema_decay=0.99,
        sampler=GuidedSamplerConfig(method="heun", steps=10, schedule_kwargs={"sigma_max": 20.0}),
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
    )


def _eval_loss(denoiser, data: GaussianMixture2D, n: int = 8192) -> float:
    """Conditional EDM loss on a fixed evaluation draw (same x0, sigma, noise for every model)."""
    g = torch.Generator().manual_seed(123)
    x0, labels = data.mixture.sample(n, generator=g)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=g))
    noise = torch.randn(n, 2, generator=g)
    loss = DenoisingLoss(weighting="edm", sigma_data=0.9)
    with torch.no_grad():
        return loss.per_sample(denoiser, x0.float(), sigma, noise, labels=labels).mean().item()


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


def test_training_closes_gap_to_exact_optimum():
    """300 steps shrink (loss - exact optimum) by at least 5x; the optimum is the analytic mixture's loss."""
    L.seed_everything(0)
    data = GaussianMixture2D(num_train=8192, num_val=0, batch_size=256)
    model = _module()
    optimum = _eval_loss(data.mixture, data)
    gap_before = _eval_loss(model.denoiser, data) - optimum
    _trainer(max_steps=300).fit(model, datamodule=data)
    gap_after = _eval_loss(model.ema.averaged, data) - optimum
    assert gap_before > 0 and gap_after > -1e-3
    assert gap_after < gap_before / 5, (gap_before, gap_after, optimum)


def test_bf16_mixed_trains_and_loss_decreases():
    L.seed_everything(0)
    data = GaussianMixture2D(num_train=4096, num_val=0, batch_size=256)
    model = _module()
    before = _eval_loss(model.denoiser, data)
    _trainer(max_steps=60, precision="bf16-mixed").fit(model, datamodule=data)
    after = _eval_loss(model.denoiser, data)
    assert after < 0.7 * before


def test_label_dropout_uses_null_label_at_the_stated_rate():
    model = _module()
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (100_000,))
    dropped = model._cond(labels, dropout=0.1)["labels"]
    rate = (dropped == model.null_label).float().mean().item()
    assert abs(rate - 0.1) < 0.005
    kept = dropped != model.null_label
    assert torch.equal(dropped[kept], labels[kept])


def test_out_of_range_labels_are_named():
    model = _module()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*\[0, 7\]"):
        model._cond(torch.tensor([0, 7]))


def test_generate_with_exact_denoiser_matches_class_means():
    """generate() wires sampler + CFG: with the EMA replaced by the exact mixture, class-conditional samples
    land on that class's components (exact posterior of the class given the sample is ~1)."""
    data = GaussianMixture2D(num_train=16, num_val=0)
    model = _module()
    model.ema.averaged = data.mixture
    model.data_shape = (2,)
    labels = torch.arange(3).repeat_interleave(200)
    x = model.generate(600, labels=labels, generator=torch.Generator().manual_seed(0))
    post = data.mixture.class_log_posterior(x.double(), torch.tensor(1e-3)).exp()
    acc = (post.argmax(1) == labels).float().mean().item()
    assert acc > 0.99


def test_loss_parameters_are_optimised_with_the_network():
    """A loss that owns parameters (VDM's learned schedule) is in the optimiser: one step moves its endpoints
    by Adam's first step, lr * sign(grad), and the null-parameter losses add nothing."""
    from diffusion_lab.diffusion.vdm_schedule import VDMLoss

    torch.manual_seed(0)
    loss = VDMLoss(num_levels=None)
    module = DiffusionModule(
        MLP(dim=2, hidden=32, depth=2, num_classes=0),
        loss=loss,
        parametrization="eps",
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    schedule_params = [p for p in loss.parameters() if p.requires_grad]
    assert schedule_params and all(id(p) in optimised for p in schedule_params)
    assert len(optimised) == len(list(module.denoiser.parameters())) + len(schedule_params)
    before = [p.detach().clone() for p in schedule_params]
    x0 = GaussianMixture2D().mixture.sample(256, generator=torch.Generator().manual_seed(0))[0].float()
    optimizer.zero_grad()
    module.loss(module.denoiser, x0).backward()
    optimizer.step()
    moved = [(p - b).abs().max().item() for p, b in zip(schedule_params, before, strict=True)]
    assert max(moved) == pytest.approx(1e-2, rel=1e-3)
    # a parameter-free loss contributes nothing
    plain = _module()
    assert sum(len(g["params"]) for g in plain.configure_optimizers().param_groups) == len(
        list(plain.denoiser.parameters())
    )


def test_text_embeddings_condition_the_denoiser_with_null_text_dropout():
    """A floating second batch field is a text embedding: passed as text_emb (so the text projection gets
    gradient), dropped to the zero vector at the label-dropout rate, and a wrong shape is named."""
    from diffusion_lab.methods.distill_text import TextConditioned

    torch.manual_seed(0)
    module = DiffusionModule(
        TextConditioned(MLP(dim=2, hidden=32, depth=2, num_classes=0), text_dim=5),
        label_dropout=0.25,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    text = torch.randn(4000, 5)
    cond = module._cond(text, dropout=0.25)
    dropped = (cond["text_emb"] == 0).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    torch.testing.assert_close(cond["text_emb"][~dropped], text[~dropped])
    # the text changes the denoiser output, and the training loss sends gradient into the text projection
    x, sigma = torch.randn(8, 2), torch.full((8,), 0.7)
    projection = [p for n, p in module.denoiser.named_parameters() if "text" in n]
    assert projection
    with torch.no_grad():
        for p in projection:
            p.normal_()
    assert not torch.allclose(module.denoiser(x, sigma, text_emb=text[:8]), module.denoiser(x, sigma))
    loss = module.training_step((torch.randn(16, 2), torch.randn(16, 5)), 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection)
    with pytest.raises(ValueError, match=r"text embeddings of shape \(batch, dim\), got \(16, 5, 1\)"):
        module._cond(torch.randn(16, 5, 1))
