"""Bit-exact comparison of state dicts and optimiser states (tests of skipped updates and exact resume)."""

from __future__ import annotations

import torch


def states_equal(a: dict, b: dict) -> bool:
    """Same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_states_equal(a: dict, b: dict) -> bool:
    """Same per-parameter optimiser state (e.g. Adam moments), bit for bit."""
    return a["state"].keys() == b["state"].keys() and all(
        states_equal(a["state"][k], b["state"][k]) for k in a["state"]
    )
