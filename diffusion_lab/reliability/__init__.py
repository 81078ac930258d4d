"""Reliability: exact resume, preemption, NaN/Inf guard, atomic checkpoints, safe loading, fault injection.

``diffusion-lab`` adds all of it to every Trainer (``defaults.with_reliability``; ``--reliability false``
opts out); the training loaders of ``data.base.DataModuleBase`` are stateful. See docs/reliability.md.
"""

from diffusion_lab.reliability.atomic_checkpoint import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    load_checkpoint_file,
)
from diffusion_lab.reliability.defaults import with_reliability
from diffusion_lab.reliability.nan_guard import (
    NaNGuard,
    NonFiniteTrainingError,
    nonfinite_loss,
    nonfinite_tensors,
    update_skipped,
)
from diffusion_lab.reliability.preemption import Preemption
from diffusion_lab.reliability.resumable_sampler import ResumableDataLoader, ResumableSampler
from diffusion_lab.reliability.resume import ExactResume, capture_rng_state, restore_rng_state

__all__ = [
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "ExactResume",
    "NaNGuard",
    "NonFiniteTrainingError",
    "Preemption",
    "ResumableDataLoader",
    "ResumableSampler",
    "UnsafeCheckpointError",
    "atomic_save",
    "capture_rng_state",
    "load_checkpoint_file",
    "nonfinite_loss",
    "nonfinite_tensors",
    "restore_rng_state",
    "update_skipped",
    "with_reliability",
]
