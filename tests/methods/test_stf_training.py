"""StableTargetLoss inside DiffusionModule: one class_path swap on the quickstart trains and samples; STF
training approaches the exact optimum of the analytic mixture; DDP reference draws are shared or per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_lab.cli import main
from diffusion_lab.data.digits import Digits
from diffusion_lab.data.toy import GaussianMixture2D
from diffusion_lab.diffusion.losses import DenoisingLoss
from diffusion_lab.diffusion.stf_loss import StableTargetLoss
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.sampling import GuidedSamplerConfig
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.nets.unet import UNet

REPO = Path(__file__).resolve().parents[2]
STF = "diffusion_lab.diffusion.stf_loss.StableTargetLoss"


def _dsm_eval_loss(denoiser, x0: torch.Tensor, labels: torch.Tensor) -> float:
    """Plain EDM DSM loss on a fixed draw of sigma and noise (the same for every model compared)."""
    g = torch.Generator().manual_seed(123)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(x0.shape[0], generator=g))
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        loss = DenoisingLoss(weighting="edm", sigma_data=0.6).per_sample(
            denoiser, x0, sigma, noise, labels=labels
        )
    return loss.mean().item()


@pytest.mark.slow  # ~40 s: 40 steps of the quickstart UNet + sampling through the real CLI
def test_quickstart_with_stf_loss_swapped_in_trains_and_samples(tmp_path, monkeypatch):
    """`fit -c configs/quickstart.yaml --model.init_args.loss.class_path=...StableTargetLoss`: the loss keeps the
    quickstart's EDM sigma sampler and weighting, gets the training split as reference pool, lowers the DSM
    loss of the (zero-initialised) network in 40 steps, and the fitted model writes its sample grid and
    generates finite digits."""
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "quickstart.yaml"),
            f"--model.init_args.loss.class_path={STF}",
            "--model.init_args.loss.init_args.reference_size=512",
            "--model.init_args.lr_scheduler.init_args.warmup_steps=5",
            "--trainer.max_steps=40",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    model, data = cli.model, cli.datamodule
    assert isinstance(model.loss, StableTargetLoss) and model.loss.sigma_data == 0.6
    assert model.loss.weighting == "edm" and model.loss.sigma_sampler.p_mean == -1.2
    assert len(model.loss.source) == len(data.train_set) and model.loss.num_classes == 10
    assert cli.trainer.global_step == 40
    x0, labels = data.val_set.images[:256], data.val_set.labels[:256]
    # the zero-initialised UNet starts as D(x, sigma) = c_skip(sigma) x (EDM preconditioning, sigma_data 0.6)
    untrained = lambda x, s, **_: (0.36 / (s**2 + 0.36))[:, None, None, None] * x  # noqa: E731
    assert _dsm_eval_loss(model.denoiser, x0, labels) < 0.8 * _dsm_eval_loss(untrained, x0, labels)
    assert (tmp_path / "samples.png").is_file()
    samples = model.generate(10, labels=torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all()


def test_validate_without_fit_gives_the_dsm_validation_loss():
    """`validate` never calls on_fit_start (no reference pool): the STF model's val/loss is the plain DSM loss,
    equal to that of a DSM-loss model with the same weights."""
    data = Digits(batch_size=64, val_fraction=0.1, seed=0)
    network = UNet(in_channels=1, resolution=8, num_classes=10, base_channels=8, channel_mult=[1],
                   num_res_blocks=1, attention_resolutions=[], mid_attention=False, norm_groups=4)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    losses = {}
    for name, loss in (("stf", StableTargetLoss(reference_size=256, sigma_data=0.6)), ("dsm", None)):
        model = DiffusionModule(network, loss=loss, sigma_data=0.6, num_classes=10)
        losses[name] = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
        if name == "stf":
            assert model.loss.source is None
    assert losses["stf"] == losses["dsm"] and losses["dsm"] > 0


@pytest.mark.slow  # ~15 s on a busy 2-core machine
def test_stf_training_approaches_the_exact_optimum():
    """Conditional STF training (auto class masks, label dropout) on the 2-D mixture shrinks the gap to the
    exact optimum (the analytic mixture's DSM loss) 5x in 300 steps, like DSM training does."""
    L.seed_everything(0)
    data = GaussianMixture2D(num_train=8192, num_val=0, batch_size=256)
    model = DiffusionModule(
        MLP(dim=2, hidden=128, depth=3, num_classes=3),
        loss=StableTargetLoss(weighting="edm", sigma_data=0.9, reference_size=1024),
        sigma_data=0.9,
        num_classes=3,
        label_dropout=0.1,
        ema_decay=0.99,
        sampler=GuidedSamplerConfig(method="heun", steps=10, schedule_kwargs={"sigma_max": 20.0}),
        optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
    )
    g = torch.Generator().manual_seed(7)
    x0, labels = data.mixture.sample(8192, generator=g)
    x0 = x0.float()

    def gap(denoiser) -> float:
        eval_loss = DenoisingLoss(weighting="edm", sigma_data=0.9)
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(8192, generator=torch.Generator().manual_seed(1)))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ours = eval_loss.per_sample(denoiser, x0, sigma, noise, labels=labels).mean()
            best = eval_loss.per_sample(data.mixture, x0, sigma, noise, labels=labels).mean()
        return (ours - best).item()

    before = gap(model.denoiser)
    L.Trainer(
        accelerator="cpu",
        max_steps=300,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(model, datamodule=data)
    assert model.loss.num_classes == 3 and len(model.loss.source) == 8192
    after = gap(model.ema.averaged)
    assert before > 0 and after > -1e-3 and after < before / 5, (before, after)


# ------------------------------------------------------------------------------------------ DDP
RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from diffusion_lab.diffusion.stf_loss import StableTargetLoss
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
torch.manual_seed(100 + rank)  # ranks seeded differently on purpose: sharing must not rely on the seeds
pool = torch.arange(1000, dtype=torch.float32)[:, None]
results = {}
for share in (True, False):
    loss = StableTargetLoss(reference_size=32, share_across_ranks=share)
    loss.set_reference_pool(pool)
    results[str(share)] = torch.stack([loss.draw_references(32, torch.device("cpu"))[0] for _ in range(3)])
torch.manual_seed(0)  # identical seeds now: per-rank draws must still differ
loss = StableTargetLoss(reference_size=32)
loss.set_reference_pool(pool)
results["same_seed"] = loss.draw_references(32, torch.device("cpu"))[0]
torch.save(results, out)
dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_ddp_reference_draws_shared_or_per_rank(tmp_path):
    """share_across_ranks: every rank draws the same references each step (rank 0's seed is broadcast) even
    when the ranks' RNGs differ; otherwise each rank draws its own, even when the ranks' RNGs agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(r), str(tmp_path / "init"), str(outs[r])], env=env
        )
        for r in (0, 1)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    r0, r1 = (torch.load(out, weights_only=True) for out in outs)
    assert torch.equal(r0["True"], r1["True"])
    assert not torch.equal(r0["True"][0], r0["True"][1])  # a new draw every step
    assert not any(torch.equal(a, b) for a, b in zip(r0["False"], r1["False"]))
    assert not torch.equal(r0["same_seed"], r1["same_seed"])
