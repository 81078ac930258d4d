"""Learning-rate schedules usable as ``lr_scheduler: {class_path: ..., init_args: ...}`` in YAML."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_lr_fraction: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then a half cosine down to ``final_lr_fraction`` at
    ``total_steps`` (Loshchilov & Hutter 2017), constant afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(LambdaLR):
    """Per-step LR multiplier ``warmup_cosine_factor`` (call ``step()`` every optimiser step)."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int = 100_000,
        final_lr_fraction: float = 0.0,
    ) -> None:
        if warmup_steps < 0 or total_steps < 1 or not 0.0 <= final_lr_fraction <= 1.0:
            raise ValueError(
                f"need warmup_steps >= 0, total_steps >= 1 and final_lr_fraction in [0, 1]; got {warmup_steps}, "
                f"{total_steps}, {final_lr_fraction}"
            )
        self.warmup_steps, self.total_steps, self.final_lr_fraction = (
            warmup_steps,
            total_steps,
            final_lr_fraction,
        )
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.final_lr_fraction)


class WarmupConstant(LambdaLR):
    """Linear warm-up over ``warmup_steps`` then constant (EDM's schedule)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0


def optimizer_with_step_schedule(
    parameters: Iterable[Any],
    optimizer_factory: Callable[[Iterable[Any]], Optimizer],
    lr_scheduler_factory: Callable[[Optimizer], LRScheduler] | None = None,
) -> Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns for every method here: the optimiser over ``parameters`` and, when
    a scheduler factory is given, that scheduler stepped once per optimisation step (``interval: step``; the
    warmup/cosine schedules above count steps, not epochs)."""
    optimizer = optimizer_factory(parameters)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
