"""The reliability pieces every ``diffusion-lab`` run gets unless it opts out (``--reliability false``).

:func:`with_reliability` completes a Trainer configuration (the keyword arguments the CLI is about to pass
to ``Trainer``) with

* :class:`~diffusion_lab.reliability.resume.ExactResume` -- RNG states of every rank in each checkpoint;
* :class:`~diffusion_lab.reliability.nan_guard.NaNGuard` -- non-finite updates skipped, K in a row stop;
* :class:`~diffusion_lab.reliability.preemption.Preemption` -- SIGTERM/SIGUSR1 save ``last.ckpt`` and exit;
* :class:`~diffusion_lab.reliability.atomic_checkpoint.AtomicCheckpointIO` -- temp file + rename writes and
  ``weights_only=True`` loads (unless the configuration already names a ``CheckpointIO`` plugin).

A callback of one of these types that the configuration already has (e.g. ``NaNGuard`` with another
``max_consecutive``) is kept and not added twice. The stateful training loader comes from
``data.base.DataModuleBase`` and needs nothing here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO

from diffusion_lab.reliability.atomic_checkpoint import AtomicCheckpointIO
from diffusion_lab.reliability.nan_guard import NaNGuard
from diffusion_lab.reliability.preemption import Preemption
from diffusion_lab.reliability.resume import ExactResume

__all__ = ["DEFAULT_CALLBACKS", "with_reliability"]

DEFAULT_CALLBACKS: tuple[type[L.Callback], ...] = (ExactResume, NaNGuard, Preemption)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def with_reliability(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"callbacks": [...], "plugins": [...]}``: ``trainer_kwargs``'s own plus the missing defaults."""
    callbacks = _as_list(trainer_kwargs.get("callbacks"))
    callbacks += [kind() for kind in DEFAULT_CALLBACKS if not any(isinstance(c, kind) for c in callbacks)]
    plugins = _as_list(trainer_kwargs.get("plugins"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return {"callbacks": callbacks, "plugins": plugins}
