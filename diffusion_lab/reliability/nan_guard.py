"""NaN/Inf guard: an update whose loss or gradients are not finite is skipped, counted and logged.

A Lightning callback, so it serves every method (automatic or manual optimisation) without code in the
module; it works through two hooks that Lightning calls in both modes:

* ``on_before_backward(loss)``: remembers whether the loss is finite;
* ``on_before_optimizer_step(optimizer)`` (after backward and AMP unscaling, before clipping and the step):
  if the loss or any gradient of the optimiser's parameters is not finite, every gradient is set to
  ``None``, so ``optimizer.step()`` changes neither the weights nor the optimiser state (PyTorch optimisers
  skip parameters without a gradient). Under DDP the decision is OR-reduced over ranks, so all ranks skip
  together and the replicas stay identical.

Modules report the named terms of a bad loss through :func:`nonfinite_loss` (which raises the old
``FloatingPointError`` when no guard is attached) and skip their own follow-up work (e.g. the EMA update)
with :func:`update_skipped`. After ``max_consecutive`` skipped updates in a row the run stops with
:class:`NonFiniteTrainingError`, naming the step, the loss terms and the last good checkpoint. A
checkpoint whose weights are not finite is refused before it is written, so it can never replace a good one.

With fp16 AMP the ``GradScaler`` already skips steps with overflowing gradients while it calibrates its
scale; those are its business and not counted, only non-finite losses are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "NaNGuard",
    "NonFiniteTrainingError",
    "find_guard",
    "nonfinite_loss",
    "nonfinite_tensors",
    "update_skipped",
]


class NonFiniteTrainingError(FloatingPointError):
    """Training produced non-finite losses/gradients too many times in a row, or non-finite weights."""


def nonfinite_tensors(state: Mapping[str, Any], limit: int = 10) -> list[str]:
    """Names of the floating-point tensors in ``state`` (nested mappings allowed) holding a NaN or Inf."""
    bad: list[str] = []

    def visit(prefix: str, value: Any) -> None:
        if len(bad) >= limit:
            return
        if isinstance(value, Tensor):
            if value.is_floating_point() or value.is_complex():
                if not bool(torch.isfinite(value).all()):
                    bad.append(prefix)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)

    visit("", state)
    return bad


def _peak_abs(tensors: list[Tensor]) -> Tensor:
    """max |x| over all (non-sparse, non-empty) tensors: NaN/Inf propagate, and unlike the 2-norm it cannot
    overflow for large finite values."""
    dense = [t for t in tensors if not t.is_sparse and t.numel()]
    if not dense:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(dense, norm_type=math.inf)


def find_guard(trainer: L.Trainer | None) -> NaNGuard | None:
    """The trainer's :class:`NaNGuard`, if it has one."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, NaNGuard)), None)


def _as_float(value: Any) -> float:
    return float(value.detach().float().cpu()) if isinstance(value, Tensor) else float(value)


def nonfinite_loss(module: L.LightningModule, loss: Tensor, terms: Mapping[str, Any] | None = None) -> bool:
    """Whether the training ``loss`` is NaN/Inf; if so, hand its named ``terms`` to the trainer's guard.

    Returns ``False`` for a finite loss. For a non-finite one with a :class:`NaNGuard` attached, records the
    terms (for its messages) and returns ``True``: the module should return ``loss`` anyway (DDP needs every
    rank to run backward) and skip logging it; the guard then skips the update. Without a guard, raises
    ``FloatingPointError`` naming the step and the terms, as there is nothing to stop the NaN reaching the
    weights.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return False
    values = {name: _as_float(value) for name, value in (terms or {"loss": loss}).items()}
    trainer = module._trainer
    guard = find_guard(trainer)
    step = trainer.global_step if trainer is not None else None
    if guard is None:
        raise FloatingPointError(
            f"non-finite training loss at global step {step}: {values}; lower the learning rate, check the "
            f"data, or add the callback diffusion_lab.reliability.NaNGuard to skip such updates"
        )
    guard.record_terms(values)
    return True


def update_skipped(module: L.LightningModule) -> bool:
    """Whether the attached guard skipped the optimiser update that just ran (so e.g. the EMA should not move)."""
    guard = find_guard(module._trainer)
    return guard is not None and guard.skipping


class NaNGuard(L.Callback):
    """Skip updates with a non-finite loss or gradient; stop after ``max_consecutive`` in a row.

    Args:
        max_consecutive: K, the number of skipped updates in a row after which the run stops with
            :class:`NonFiniteTrainingError` (the naming step, loss terms and last good checkpoint).
        check_gradients: also test the gradients (one fused max-abs reduction per step), not only the loss.
        check_checkpoints: refuse to write a checkpoint whose model weights are not finite.

    Logged: ``reliability/skipped_updates`` (total, on every step with a skip). Saved in checkpoints: the
    counters, so a resumed run keeps counting.
    """

    def __init__(
        self, max_consecutive: int = 10, check_gradients: bool = True, check_checkpoints: bool = True
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.check_checkpoints = check_checkpoints
        self.skipped_total = 0
        self.consecutive = 0
        self.first_bad_step: int | None = None  # first step of the current run of skips
        self.skipping = False  # the update of the current batch was skipped
        self._stepped = False  # an optimiser step was decided in the current batch
        self._loss_finite = True
        self._terms: dict[str, float] = {}
        self._reason = ""

    # ---- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_total": self.skipped_total,
            "consecutive": self.consecutive,
            "first_bad_step": self.first_bad_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.first_bad_step = state_dict.get("first_bad_step")

    # ---- reporting ----------------------------------------------------------------------------------
    def record_terms(self, terms: Mapping[str, float]) -> None:
        """Named loss terms of the current (bad) step, for messages; called by :func:`nonfinite_loss`."""
        self._terms = dict(terms)

    @staticmethod
    def last_good_checkpoint(trainer: L.Trainer) -> str | None:
        """The newest checkpoint file on disk that a checkpoint callback wrote (they are all finite)."""
        paths = set()
        for callback in trainer.checkpoint_callbacks:
            for name in ("last_model_path", "best_model_path", "_last_checkpoint_saved"):
                path = getattr(callback, name, None)
                if path and os.path.isfile(path):
                    paths.add(path)
        return max(paths, key=os.path.getmtime) if paths else None

    # ---- hooks ------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.skipping = False
        self._stepped = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._loss_finite and not bool(torch.isfinite(loss.detach()).all()):
            self._loss_finite = False
            self._terms = self._terms or {"loss": _as_float(loss)}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        reason = "" if self._loss_finite else "loss"
        if not reason and self.check_gradients and not self._amp_scaler_active(trainer):
            if not bool(torch.isfinite(_peak_abs([p.grad.detach() for p in params]))):
                reason = "gradient"
        if trainer.strategy.reduce_boolean_decision(bool(reason), all=False):
            for p in params:
                p.grad = None
            self.skipping = True
            self._reason = reason or "value on another rank"
        self._stepped = True
        self._loss_finite = True  # the next accumulation window starts clean

    @staticmethod
    def _amp_scaler_active(trainer: L.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:  # accumulating gradients: no update decided in this batch
            return
        terms, self._terms = self._terms, {}
        if not self.skipping:
            self.consecutive = 0
            self.first_bad_step = None
            return
        step = trainer.global_step - 1  # the optimiser step counter has already advanced
        self.skipped_total += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        pl_module.log("reliability/skipped_updates", float(self.skipped_total), on_step=True, on_epoch=False)
        if trainer.is_global_zero:
            log.warning(
                "skipped the update of step %d: non-finite %s (loss terms %s); %d skipped in total, %d in a row",
                step,
                self._reason,
                terms or "not reported",
                self.skipped_total,
                self.consecutive,
            )
        if self.consecutive >= self.max_consecutive:
            checkpoint = self.last_good_checkpoint(trainer)
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {self.consecutive} consecutive updates had a non-finite "
                f"{self._reason} (steps {self.first_bad_step}..{step}; {self.skipped_total} skipped in total); "
                f"loss terms at step {step}: {terms or 'not reported'}; last good checkpoint: "
                f"{checkpoint or 'none written yet'}. Lower the learning rate or check the data, then resume "
                f"with --ckpt_path {checkpoint or 'PATH'}."
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.check_checkpoints:
            return
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            previous = self.last_good_checkpoint(trainer)
            raise NonFiniteTrainingError(
                f"refusing to write a checkpoint at step {trainer.global_step}: non-finite weights in {bad}; "
                f"the last good checkpoint stays {previous or 'none written yet'}"
            )
