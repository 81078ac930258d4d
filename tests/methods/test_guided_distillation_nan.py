"""GuidedDistillation (manual optimisation) handles a non-finite loss exactly as automatic optimisation does.

With a ``NaNGuard``: the update of a step whose batch holds a NaN is skipped (student weights, EMA and Adam state
unchanged, bit for bit), the skip is counted, good steps still train; K NaN steps in a row stop the run with the
message a ``DiffusionModule`` run gets for the same steps. Without a guard: ``FloatingPointError`` naming the step.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from state_compare import optimizer_states_equal, states_equal

from diffusion_lab.data.toy import GaussianMixture2D
from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.distillation import KarrasTime
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.guided_distillation import GuidedDistillation
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.reliability import NaNGuard, NonFiniteTrainingError
from diffusion_lab.reliability.faults import InjectNonFinite

MIXTURE = toy_mixture_2d()


pytestmark = pytest.mark.usefixtures("quiet_lightning")


class Snapshots(L.Callback):
    """Deep copies of the student, its EMA and the optimiser state at the start of every batch, by global step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step] = {
            "weights": copy.deepcopy(pl_module.student.state_dict()),
            "ema": copy.deepcopy(pl_module.ema.averaged.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def _distillation() -> GuidedDistillation:
    network = MLP(dim=2, hidden=16, depth=2, num_classes=3, scalar_conditions=["guidance_w"])
    model = GuidedDistillation(
        teacher=MIXTURE,
        student=Denoiser(network, parametrization="edm", sigma_data=1.0),
        schedule=KarrasTime(0.01, 20.0, 7.0),
        num_classes=3,
        null_label=MIXTURE.null_label,
        stage1_iterations=4,
        steps=[2, 1],
        phase_iterations=8,
        ema_decay=0.9,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    model.data_shape = (2,)
    return model


def _fit(module: L.LightningModule, tmp_path: Path, max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=GaussianMixture2D(num_train=256, num_val=0, batch_size=32))
    return trainer


def test_a_nan_batch_skips_the_update_and_counts_it(tmp_path, caplog):
    # step 2: stage 1; step 6: inside the 2-step phase (after its fresh optimiser), so both losses are covered
    guard, snapshots, inject = NaNGuard(max_consecutive=3), Snapshots(), InjectNonFinite([2, 6], "batch")
    module = _distillation()
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.reliability.nan_guard"):
        trainer = _fit(module, tmp_path, 10, inject, guard, snapshots)
    assert inject.injected == 2 and guard.skipped_total == 2 and guard.consecutive == 0
    at = snapshots.at
    for step in (2, 6):  # the skipped update left student, EMA and Adam exactly as they were
        assert states_equal(at[step]["weights"], at[step + 1]["weights"])
        assert states_equal(at[step]["ema"], at[step + 1]["ema"])
        assert optimizer_states_equal(at[step]["optimizer"], at[step + 1]["optimizer"])
    for step in (1, 3, 5, 7):  # good steps train
        assert not states_equal(at[step]["weights"], at[step + 1]["weights"])
    # Adam's step count: 4 stage-1 steps minus the skipped one; the phase's fresh state counts from step 4 on
    assert int(at[4]["optimizer"]["state"][0]["step"]) == 3
    assert int(at[8]["optimizer"]["state"][0]["step"]) == 4 - 1
    assert float(trainer.callback_metrics["reliability/skipped_updates"]) == 2.0
    assert "skipped the update of step 6" in caplog.text and "2 skipped in total" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_k_consecutive_nans_stop_with_the_automatic_optimisation_message(tmp_path):
    def message(module: L.LightningModule) -> str:
        with pytest.raises(NonFiniteTrainingError) as info:
            _fit(module, tmp_path, 12, InjectNonFinite([2, 3, 4], "batch"), NaNGuard(max_consecutive=3))
        return str(info.value)

    manual = message(_distillation())
    automatic = message(
        DiffusionModule(MLP(dim=2, hidden=16, depth=2, num_classes=3), num_classes=3, sigma_data=0.9)
    )
    assert manual == automatic
    assert "training stopped at step 4: 3 consecutive updates had a non-finite loss" in manual
    assert "(steps 2..4; 3 skipped in total)" in manual and "loss terms at step 4: {'loss': nan}" in manual


def test_without_a_guard_a_nan_loss_raises_naming_the_step(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss at global step 1: \{'loss': nan\}"
    ):
        _fit(_distillation(), tmp_path, 4, InjectNonFinite([1], "batch"))
