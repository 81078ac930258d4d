"""Keep the student of every distillation phase: a checkpoint at the end of each phase of ``GuidedDistillation``.

Progressive distillation produces one model per step count (Salimans & Ho 2022 evaluate each of them), but a
``fit`` ends with only the last. This callback writes ``{dirpath}/{phase_name}.ckpt`` (``stage1.ckpt``,
``stage2_8_steps.ckpt``, ...) right after the last optimiser step of each phase. Each is a full Lightning
checkpoint whose ``guided_distillation`` entry names its phase, so loading it and calling ``generate`` samples
that phase's student with its own step count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class PhaseCheckpoint(L.Callback):
    """Save a checkpoint when each phase of a ``GuidedDistillation`` fit ends (module docstring).

    Args:
        dirpath: folder of the files; default: the ``ModelCheckpoint``'s folder, else
            ``{trainer.default_root_dir}/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if not hasattr(pl_module, "phases"):
            raise TypeError(
                f"PhaseCheckpoint needs a GuidedDistillation module, got {type(pl_module).__name__}"
            )
        step, end = trainer.global_step, 0
        for phase in pl_module.phases:
            end += phase["iterations"]
            if step == end:
                path = self._folder(trainer) / f"{phase['name']}.ckpt"
                if path not in self.saved:
                    trainer.save_checkpoint(path)
                    self.saved.append(path)
                return


__all__ = ["PhaseCheckpoint"]
