"""Exact resume: the random state of every rank travels with the checkpoint.

Lightning's checkpoint holds the model (with its EMA submodule), optimiser, LR schedulers, loop progress
and, for a stateful loader, the position in the epoch (see ``resumable_sampler``). It does not hold the
random number generators, which draw the noise levels, noise, label dropout and network dropout of every
step. :class:`ExactResume` adds them:

* ``state_dict`` (called on every rank while a checkpoint is written) gathers the torch, CUDA, NumPy and
  Python generator states of all ranks into ``checkpoint["callbacks"]["ExactResume"]["ranks"]``;
* after a resume each rank sets its own states back at ``on_train_start``, the first hook after which the
  resumed run replays what the original did after its save (the sanity check before it runs under
  Lightning's ``isolate_rng``);
* validation inside ``fit`` runs between a saved RNG state and its restore, so a run that validates and a
  resumed run that skips the already-done validation would draw different numbers afterwards. Validation
  is therefore made RNG-neutral: the state is stashed at ``on_validation_start`` and put back at
  ``on_validation_end``. This also makes training independent of how often one validates.

Everything stored is tensors, ints, strings and tuples, so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["ExactResume", "capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU, every CUDA device, NumPy legacy global and Python ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": tuple(int(v) for v in py_state), "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only if this process has as many devices)."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning(
                "checkpoint holds CUDA RNG states of %d devices, this process sees %d: restoring the first ones",
                len(cuda),
                torch.cuda.device_count(),
            )
        for device, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class ExactResume(L.Callback):
    """Save every rank's RNG states in checkpoints and restore them on resume; keep validation RNG-neutral.

    With it (and a stateful training loader), a run killed at any step and resumed from its last checkpoint
    ends with the same weights as an uninterrupted run: bit-identical on CPU with deterministic kernels;
    on GPU, identical up to the nondeterminism of the kernels themselves (``trainer.deterministic: true``).
    """

    def __init__(self) -> None:
        self._stash: dict[str, Any] | None = None  # training RNG state while validation runs
        self._to_restore: list[dict[str, Any]] | None = None  # per-rank states loaded from a checkpoint

    # ---- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        world_size = trainer.world_size if trainer is not None else 1
        mine = self._stash if self._stash is not None else capture_rng_state()
        return {"ranks": _all_gather(mine, world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise ValueError(
                f"ExactResume state must hold a non-empty list 'ranks', got {type(ranks).__name__}"
            )
        self._to_restore = ranks

    # ---- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is None:
            return
        ranks, self._to_restore = self._to_restore, None
        if len(ranks) != trainer.world_size:
            log.warning(
                "checkpoint holds RNG states of %d ranks, this run has %d: ranks beyond the saved ones keep "
                "their seeded state, so the continuation is not bit-exact",
                len(ranks),
                trainer.world_size,
            )
        if trainer.global_rank < len(ranks):
            restore_rng_state(ranks[trainer.global_rank])

    def _fitting(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fitting(trainer):
            self._stash = capture_rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stash is not None:
            restore_rng_state(self._stash)
            self._stash = None
