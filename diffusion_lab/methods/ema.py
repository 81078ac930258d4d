"""Exponential moving average of a module's weights, kept inside the LightningModule.

The EMA copy is a registered submodule, so it is part of ``state_dict()``: checkpoints hold it, resume restores
it bit-for-bit, and under DDP every rank applies the same update to the same (synchronised) weights.

Update (Polyak averaging with the usual warm-up, e.g. Song et al. 2021 / Nichol & Dhariwal 2021)::

    beta_k = min(decay, (1 + k) / (10 + k))       if warmup else decay
    ema    = beta_k * ema + (1 - beta_k) * weights
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``averaged``, an EMA copy of ``model``; call ``update(model)`` after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        k = int(self.num_updates)
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        beta = self.current_decay()
        ema_params = list(self.averaged.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"EMA tracks {len(ema_params)} parameters but the model has {len(params)}")
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(params, ema_params)], 1.0 - beta)
        for ema_buf, buf in zip(self.averaged.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - passthrough
        return self.averaged(*args, **kwargs)
