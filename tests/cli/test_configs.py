"""Every YAML in configs/ parses and instantiates through the CLI; CPU-sized trainable ones survive a
fast_dev_run ``fit`` (inference-only modules such as DDLM need a trained prior: their own tests run them).

GPU-scale configs are instantiated with CPU trainer overrides (their models are built, not trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch import LightningModule

from diffusion_lab.cli import DiffusionLabCLI, import_class, main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CPU_OVERRIDES = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
]


def _is_cpu_sized_and_trains(path: Path) -> bool:
    config = yaml.safe_load(path.read_text()) or {}
    if config.get("trainer", {}).get("accelerator", "cpu") != "cpu":
        return False
    model = config.get("model", {})
    cls = import_class(model["class_path"]) if isinstance(model, dict) and "class_path" in model else None
    return cls is None or cls.training_step is not LightningModule.training_step


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DiffusionLabCLI(
        args=["--config", str(path), *CPU_OVERRIDES],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize(
    "path",
    [p for p in CONFIGS if _is_cpu_sized_and_trains(p)],
    ids=lambda p: str(p.relative_to(REPO / "configs")),
)
def test_cpu_config_fast_dev_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(path), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]
    )
    assert cli.trainer.state.finished
