"""NaN/Inf guard: injected non-finite losses/gradients are skipped (weights, optimiser state and EMA
unchanged, bit for bit), counted and logged; K in a row stop the run with the promised message; a
non-finite model is never checkpointed over a good one."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from state_compare import optimizer_states_equal, states_equal

from diffusion_lab.data.toy import GaussianMixture2D
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.reliability import NaNGuard, NonFiniteTrainingError, nonfinite_tensors
from diffusion_lab.reliability.faults import InjectNonFinite


class Snapshots(L.Callback):
    """Deep copies of weights, EMA and optimiser state at the start of every batch, by global step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step] = {
            "weights": copy.deepcopy(pl_module.denoiser.state_dict()),
            "ema": copy.deepcopy(pl_module.ema.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "skipped": trainer.callback_metrics.get("reliability/skipped_updates"),
        }


def _module() -> DiffusionModule:
    return DiffusionModule(MLP(dim=2, hidden=16, depth=2, num_classes=3), num_classes=3, sigma_data=0.9)


def _fit(
    tmp_path: Path, max_steps: int, *callbacks: L.Callback, checkpoint_every: int | None = None
) -> L.Trainer:
    L.seed_everything(0)
    extra = [ModelCheckpoint(tmp_path, save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=checkpoint_every is not None,
        callbacks=list(callbacks) + (extra if checkpoint_every else []),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        gradient_clip_val=1.0,
    )
    trainer.fit(_module(), datamodule=GaussianMixture2D(num_train=256, num_val=0, batch_size=32))
    return trainer


@pytest.mark.parametrize("where", ["batch", "loss", "gradient"])
def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, caplog, where):
    guard, snapshots = NaNGuard(max_consecutive=3), Snapshots()
    inject = InjectNonFinite(steps=[2, 3, 5], where=where)
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.reliability.nan_guard"):
        trainer = _fit(tmp_path, 7, inject, guard, snapshots)
    assert inject.injected == 3 and guard.skipped_total == 3 and guard.consecutive == 0
    at = snapshots.at
    for step in (2, 3, 5):  # a skipped update leaves everything exactly as it was
        assert states_equal(at[step]["weights"], at[step + 1]["weights"])
        assert states_equal(at[step]["ema"], at[step + 1]["ema"])
        assert optimizer_states_equal(at[step]["optimizer"], at[step + 1]["optimizer"])
    for step in (1, 4):  # good steps do update
        assert not states_equal(at[step]["weights"], at[step + 1]["weights"])
    assert int(at[6]["ema"]["num_updates"]) == 6 - 3
    assert int(at[6]["optimizer"]["state"][0]["step"]) == 6 - 3  # Adam's bias correction did not advance
    assert float(trainer.callback_metrics["reliability/skipped_updates"]) == 3.0
    assert "skipped the update of step 5" in caplog.text and "3 skipped in total" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_k_consecutive_stop_with_step_terms_and_last_good_checkpoint(tmp_path):
    guard = NaNGuard(max_consecutive=3)
    with pytest.raises(NonFiniteTrainingError) as info:
        _fit(tmp_path, 20, InjectNonFinite(steps=[7, 8, 9], where="loss"), guard, checkpoint_every=3)
    message = str(info.value)
    last = tmp_path / "last.ckpt"
    assert "training stopped at step 9" in message and "3 consecutive updates" in message
    assert "steps 7..9" in message and "loss terms at step 9: {'loss': nan}" in message
    assert f"last good checkpoint: {last}" in message and f"--ckpt_path {last}" in message
    saved = torch.load(last, map_location="cpu", weights_only=True)
    # written after step 8 (global step 9): steps 7 and 8 were skipped, so its weights are finite
    assert saved["global_step"] == 9 and not nonfinite_tensors(saved["state_dict"])


def test_a_nonfinite_model_is_never_checkpointed(tmp_path):
    class PoisonWeights(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # after step 3's update, before ModelCheckpoint's save at step 4
                with torch.no_grad():
                    next(pl_module.denoiser.parameters()).view(-1)[0] = float("inf")

    with pytest.raises(
        NonFiniteTrainingError, match=r"refusing to write a checkpoint at step 4: non-finite weights"
    ):
        _fit(tmp_path, 10, PoisonWeights(), NaNGuard(), checkpoint_every=2)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and not nonfinite_tensors(saved["state_dict"])


def test_without_a_guard_a_nonfinite_loss_raises_naming_the_step(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss at global step 1: \{'loss': nan\}"
    ):
        _fit(tmp_path, 4, InjectNonFinite(steps=[1], where="batch"))


def test_guard_counters_survive_a_checkpoint():
    guard = NaNGuard(max_consecutive=5)
    guard.skipped_total, guard.consecutive, guard.first_bad_step = 4, 2, 11
    restored = NaNGuard(max_consecutive=5)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped_total, restored.consecutive, restored.first_bad_step) == (4, 2, 11)
    with pytest.raises(ValueError, match="max_consecutive must be >= 1, got 0"):
        NaNGuard(max_consecutive=0)


def test_nonfinite_tensors_names_nested_entries():
    state = {"a": torch.ones(2), "b": {"c": torch.tensor([1.0, float("nan")]), "d": torch.tensor([1, 2])}}
    state["e"] = torch.tensor([float("-inf")])
    assert nonfinite_tensors(state) == ["b.c", "e"]
