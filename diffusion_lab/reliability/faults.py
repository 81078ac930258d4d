"""Fault injection for testing the reliability features (tests and ``benchmarks/reliability.py`` use these).

Each fault is a callback or plugin added from the command line like any other, e.g.
``--trainer.callbacks+=diffusion_lab.reliability.faults.SignalAt --trainer.callbacks.init_args.step=7``:

* :class:`SignalAt` -- the process sends itself a signal (SIGKILL, SIGTERM, ...) at a chosen step and phase
  of that step (before the forward pass, between backward and the optimiser step, or after the batch);
* :class:`InjectNonFinite` -- NaN in the input batch, the loss or one gradient at chosen steps;
* :class:`CrashingCheckpointIO` -- the n-th checkpoint write is cut off half-way by SIGKILL, optionally
  without the atomic rename (``atomic: false``, to show what a plain writer leaves behind).

Nothing here is used unless configured.
"""

from __future__ import annotations

import io
import os
import signal as signals
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from diffusion_lab.reliability.atomic_checkpoint import AtomicCheckpointIO

__all__ = ["CrashingCheckpointIO", "InjectNonFinite", "SignalAt"]

Phase = Literal["batch_start", "before_optimizer_step", "batch_end"]


class SignalAt(L.Callback):
    """Send ``signal`` to this process during global step ``step`` at ``phase``.

    ``batch_end`` fires after the step's update but before a ``ModelCheckpoint`` save of that step (Lightning
    runs checkpoint callbacks last); the others interrupt the step itself. Steps are 0-based: step ``k`` is
    the batch that starts at ``trainer.global_step == k``.
    """

    def __init__(self, step: int, signal: str = "SIGKILL", phase: Phase = "before_optimizer_step") -> None:
        if phase not in ("batch_start", "before_optimizer_step", "batch_end"):
            raise ValueError(f"phase must be batch_start, before_optimizer_step or batch_end, got {phase!r}")
        self.step, self.phase = step, phase
        name = signal.upper() if signal.upper().startswith("SIG") else f"SIG{signal.upper()}"
        if not hasattr(signals, name):
            raise ValueError(f"unknown signal {signal!r}")
        self.signum = getattr(signals, name)
        self._step_of_batch = -1

    def _fire(self, trainer: L.Trainer, phase: str) -> None:
        if phase == self.phase and self._step_of_batch == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_of_batch = trainer.global_step
        self._fire(trainer, "batch_start")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self._fire(trainer, "before_optimizer_step")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._fire(trainer, "batch_end")


class InjectNonFinite(L.Callback):
    """Make steps ``steps`` non-finite: NaN in the input batch, a NaN loss, or an Inf in one gradient."""

    def __init__(self, steps: Sequence[int], where: Literal["batch", "loss", "gradient"] = "batch") -> None:
        if where not in ("batch", "loss", "gradient"):
            raise ValueError(f"where must be 'batch', 'loss' or 'gradient', got {where!r}")
        self.steps, self.where = {int(s) for s in steps}, where
        self.injected = 0
        self._active = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = trainer.global_step in self.steps
        if self._active and self.where == "batch":
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x.view(-1)[0] = float("nan")  # the collated batch is a fresh tensor: the data set is untouched
            self.injected += 1

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._active and self.where == "loss":
            with torch.no_grad():
                loss.mul_(float("nan"))  # d(nan * loss) = nan: the gradients follow, as with a real NaN
            self.injected += 1

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and self.where == "gradient":
            param = next(p for p in pl_module.parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf")
            self.injected += 1


class CrashingCheckpointIO(AtomicCheckpointIO):
    """Checkpoint writer whose ``crash_on_save``-th write (1-based) is killed half-way with SIGKILL.

    ``atomic: false`` writes straight into the target file, like a naive ``torch.save(checkpoint, path)``.
    """

    def __init__(self, crash_on_save: int = 2, atomic: bool = True) -> None:
        super().__init__()
        self.crash_on_save, self.atomic = crash_on_save, atomic
        self.saves = 0

    def write(self, checkpoint: dict[str, Any], f: io.BufferedWriter) -> None:
        self.saves += 1
        if self.saves != self.crash_on_save:
            super().write(checkpoint, f)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signals.SIGKILL)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if self.atomic:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
        with open(path, "wb") as f:
            self.write(checkpoint, f)
