"""DiffuseIT loss weights with every term switched off; tests switch on the terms they check."""

from __future__ import annotations

NO_LOSSES = dict(
    structure_weight=0.0,
    contrastive_weight=0.0,
    cls_weight=0.0,
    target_mse_weight=0.0,
    clip_weight=0.0,
    semantic_weight=0.0,
    range_weight=0.0,
)
