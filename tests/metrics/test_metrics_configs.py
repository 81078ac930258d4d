"""configs/metrics/: SampleQuality wired through the real CLI logs its numbers to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion_lab.cli import main
from diffusion_lab.metrics.sample_quality import SampleQuality

REPO = Path(__file__).resolve().parents[2]
LOGGED = ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "class_accuracy")


def small_digits_fid_config(tmp_path: Path) -> Path:
    """configs/metrics/digits_fid.yaml as shipped, except a tiny evaluation and only the SampleQuality callback."""
    config = yaml.safe_load((REPO / "configs" / "metrics" / "digits_fid.yaml").read_text())
    trainer = config["trainer"]
    (callback,) = [c for c in trainer["callbacks"] if c["class_path"].endswith(".SampleQuality")]
    callback["init_args"].update(
        num_samples=24, batch_size=16, sampler={"method": "heun", "steps": 2}, kid_subset_size=24
    )
    trainer["callbacks"] = [callback]
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    trainer["limit_val_batches"] = 1
    path = tmp_path / "digits_fid_small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_logs_sample_quality_to_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "validate",
            "--config",
            str(small_digits_fid_config(tmp_path)),
            "--trainer.enable_progress_bar=false",
        ]
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SampleQuality)]
    assert callback.sampler == {"method": "heun", "steps": 2} and callback.num_samples == 24
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    for key in LOGGED:
        (scalar,) = events.Scalars(f"val/{key}")
        assert scalar.value == pytest.approx(callback.last_results[key], rel=1e-6, abs=1e-7), key
    assert callback.last_results["fid"] > 0  # an untrained model is far from the data
    # the reference statistics were cached where tools/fid_stats.py puts them
    assert len(list((tmp_path / "data_cache" / "fid_stats").glob("digits-train-8px-feature_net-*"))) == 1
