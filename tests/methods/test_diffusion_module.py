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
