"""Preemption: on SIGTERM / SIGUSR1 finish the current step, save a checkpoint, (requeue,) and exit cleanly.

A signal handler runs between two Python bytecodes of the main thread, possibly in the middle of an
optimiser step; a checkpoint written there (as Lightning's own SLURM handler does) can hold half-updated
state. :class:`Preemption`'s handler therefore only records the signal. At the end of the training batch
in progress (``on_train_batch_end``, the point where ``ModelCheckpoint`` saves too) the ranks agree that a
signal arrived (an OR over ranks), every rank takes part in writing ``last.ckpt`` for each
``ModelCheckpoint(save_last=True)`` (or ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` without one, which
Lightning picks up by itself after a SLURM requeue), rank 0 asks SLURM to requeue the job when enabled,
and the run ends with Lightning's ``SIGTERMException`` (a ``SystemExit`` with ``exit_code``).

Resume with ``--ckpt_path last``: nothing is lost, the checkpoint is the state after the last finished step.
A signal that arrives during validation takes effect at the next training batch.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

__all__ = ["Preemption"]


def _signal_number(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    if not hasattr(signal, key):
        raise ValueError(f"unknown signal {name!r}; expected a name such as 'SIGTERM' or 'SIGUSR1'")
    return getattr(signal, key)


class Preemption(L.Callback):
    """Turn preemption signals into a checkpoint at a step boundary and a clean exit.

    Args:
        signals: signals to handle (names or numbers); default SIGTERM (``scancel``, Kubernetes, time limits)
            and SIGUSR1 (SLURM ``--signal=USR1@90`` warning before the time limit).
        requeue: run ``scontrol requeue $SLURM_JOB_ID`` after saving. ``None``: when the trainer's cluster
            environment is ``SLURMEnvironment(auto_requeue=True)``. This replaces Lightning's own SIGUSR1
            handler, which would save mid-step.
        exit_code: process exit status after a preemption checkpoint (0: a clean exit).

    After a preemption ``saved_path`` is the checkpoint written and ``preempted_at_step`` its global step.
    """

    def __init__(
        self,
        signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"),
        requeue: bool | None = None,
        exit_code: int = 0,
    ) -> None:
        self.signals = [_signal_number(s) for s in signals]
        self.requeue = requeue
        self.exit_code = exit_code
        self.received: signal.Signals | None = None
        self.saved_path: str | None = None
        self.preempted_at_step: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._trainer: L.Trainer | None = None

    # ---- signal handling ----------------------------------------------------------------------------
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signal.Signals(signum)
        trainer = self._trainer
        launcher = getattr(trainer.strategy, "launcher", None) if trainer is not None else None
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # processes this one started (DDP ranks on this node) get it too

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not in the main thread, cannot install signal handlers")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # ---- the step boundary ------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = self.received.name if self.received is not None else "a signal on another rank"
        paths = self._checkpoint_paths(trainer)
        for path in paths:
            trainer.save_checkpoint(path)
        self.saved_path, self.preempted_at_step = paths[0], trainer.global_step
        if trainer.is_global_zero:
            log.warning(
                "received %s: saved the state after step %d to %s; resume with --ckpt_path last",
                name,
                trainer.global_step,
                ", ".join(paths),
            )
            if self._should_requeue(trainer):
                self._requeue_slurm_job()
        self._restore_handlers()
        raise SIGTERMException(self.exit_code)

    @staticmethod
    def _checkpoint_paths(trainer: L.Trainer) -> list[str]:
        """``last.ckpt`` of every ``ModelCheckpoint(save_last=...)``, else Lightning's next ``hpc_ckpt_N.ckpt``."""
        metrics = {
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
            **trainer.callback_metrics,
        }
        paths = []
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                path = callback.format_checkpoint_name(metrics, filename=callback.CHECKPOINT_NAME_LAST)
                callback.last_model_path = path
                paths.append(path)
        if paths:
            return list(dict.fromkeys(paths))
        root = Path(trainer.default_root_dir)
        versions = [
            int(m.group(1))
            for p in root.glob("hpc_ckpt_*.ckpt")
            if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
        ]
        return [str(root / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt")]

    def _should_requeue(self, trainer: L.Trainer) -> bool:
        if self.requeue is not None:
            return self.requeue
        environment = getattr(trainer.strategy, "cluster_environment", None)
        return isinstance(environment, SLURMEnvironment) and environment.auto_requeue

    @staticmethod
    def _requeue_slurm_job() -> None:
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
        if not job or not re.fullmatch(r"[0-9_]+", job):
            log.warning("requeue asked for, but SLURM_JOB_ID is %r: not requeued", job)
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s", job)
        else:
            log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
