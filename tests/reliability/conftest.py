"""Fixtures of the subprocess fault tests: the seconds-long toy configuration of ``reliability.drill`` run
through the real CLI, and the uninterrupted reference run (trained once per session)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion_lab.reliability.drill import checkpoint_differences, run_fit, signal_at, toy_config


class ToyRuns:
    """``fit`` the toy configuration in a subprocess under ``tmp_path``; load and compare checkpoints."""

    max_steps = 15  # of the fault tests; a multiple of the checkpoint interval 3, so runs end with last.ckpt
    every = 3
    config = staticmethod(toy_config)
    signal_at = staticmethod(signal_at)

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def fit(self, config: dict[str, Any], name: str, *args: str) -> Any:
        return run_fit(config, self.tmp_path, name, *args, timeout=300)

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)

    @staticmethod
    def assert_same(expected: Path, got: Path) -> None:
        """Bit-identical global step, weights (model and EMA) and optimiser state."""
        assert checkpoint_differences(expected, got) == []


@pytest.fixture
def toy(tmp_path) -> ToyRuns:
    return ToyRuns(tmp_path)


_REFERENCE: dict[str, Path] = {}


@pytest.fixture
def reference(toy, tmp_path_factory) -> Path:
    """last.ckpt of the uninterrupted toy run (trained once per session)."""
    if "path" not in _REFERENCE:
        root = tmp_path_factory.mktemp("reference")
        result = run_fit(toy_config(root, max_steps=ToyRuns.max_steps), root, "reference", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        _REFERENCE["path"] = root / "ckpt" / "last.ckpt"
    return _REFERENCE["path"]
