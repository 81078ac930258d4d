"""The real CLI: quickstart end to end (TensorBoard image, checkpoint, resume, predict), swaps, typos, DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from probes import read_probe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lab.cli import DiffusionLabCLI, main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TOY = str(REPO / "configs" / "diffusion" / "toy2d.yaml")
FAST = [
    "--trainer.limit_val_batches=1",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.sampler.steps=2",
    "--model.init_args.network.init_args.base_channels=8",
]


def _events(log_dir: Path) -> EventAccumulator:
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {log_dir}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_quickstart_fit_resume_predict(tmp_path, cli_runner):
    probe = tmp_path / "probe"
    common = [
        "--config",
        QUICKSTART,
        *FAST,
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        "--trainer.callbacks+=probes.StateProbe",
        f"--trainer.callbacks.init_args.out_dir={probe}",
    ]
    first = cli_runner(["fit", *common, "--trainer.max_steps=6", "--trainer.limit_train_batches=3"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    version = tmp_path / "runs" / "quickstart" / "version_0"
    acc = _events(version)
    assert "samples" in acc.Tags()["images"] and "train/loss_step" in acc.Tags()["scalars"]
    assert (version / "samples.png").is_file()
    ckpt = version / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6

    second = cli_runner(
        ["fit", *common, "--trainer.max_steps=9", "--trainer.limit_train_batches=3", f"--ckpt_path={ckpt}"],
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_probe(probe)
    end_first, start_second, end_second = records[1], records[2], records[3]
    assert start_second["global_step"] == 6 and end_second["global_step"] == 9
    assert start_second["ema"] == end_first["ema"] and start_second["weights"] == end_first["weights"]
    assert end_second["ema_updates"] == 9

    out = tmp_path / "pred"
    third = cli_runner(
        [
            "predict",
            "--config",
            QUICKSTART,
            "--model.init_args.network.init_args.base_channels=8",
            f"--ckpt_path={ckpt}",
            "--model.init_args.sampler.method=dpmpp_2m",
            "--model.init_args.sampler.steps=5",
            "--model.init_args.predict_num_samples=20",
            "--model.init_args.predict_batch_size=8",
            f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
            "--trainer.callbacks+=diffusion_lab.metrics.sample_grid.SampleWriter",
            f"--trainer.callbacks.init_args.output_dir={out}",
        ],
        tmp_path,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].shape == (20, 1, 8, 8) and list(arrays["labels"][:12]) == [*range(10), 0, 1]
    assert (out / "samples.png").is_file()


def test_class_path_swaps_take_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DiffusionLabCLI(
        args=[
            "--config",
            QUICKSTART,
            "--model.init_args.network.class_path=probes.TinyConvNet",
            "--model.init_args.loss.init_args.sigma_sampler.class_path=diffusion_lab.diffusion.losses.LogUniformSigma",
            "--model.init_args.loss.init_args.weighting=eps",
            "--trainer.logger=false",
        ],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )
    from probes import TinyConvNet

    from diffusion_lab.diffusion.losses import LogUniformSigma

    assert isinstance(cli.model.denoiser.network, TinyConvNet)
    assert isinstance(cli.model.loss.sigma_sampler, LogUniformSigma) and cli.model.loss.weighting == "eps"
    # data shape was linked into the network: digits have 1 channel, 10 classes
    assert cli.model.denoiser.network.conv1.in_channels == 2 and cli.model.num_classes == 10


def test_contradicting_link_is_an_error(tmp_path, cli_runner):
    result = cli_runner(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.init_args.network.init_args.in_channels=2",
            "--trainer.max_steps=1",
        ],
        tmp_path,
    )
    assert result.returncode != 0
    assert "in_channels=2 contradicts the data" in result.stderr


@pytest.mark.parametrize(
    "override,name",
    [
        ("--model.init_args.netwrk=1", "netwrk"),
        ("--model.init_args.label_dropout=abc", "label_dropout"),
        ("--model.init_args.sampler.method=nope", "nope"),
    ],
)
def test_config_typo_exits_naming_the_key(tmp_path, cli_runner, override, name):
    result = cli_runner(["fit", "--config", QUICKSTART, override, "--trainer.max_steps=1"], tmp_path)
    assert result.returncode != 0
    assert name in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path, cli_runner):
    probe = tmp_path / "probe"
    result = cli_runner(
        [
            "fit",
            "--config",
            TOY,
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_steps=8",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
            "--trainer.logger=false",
            "--data.init_args.num_train=2048",
            "--trainer.callbacks+=probes.StateProbe",
            f"--trainer.callbacks.init_args.out_dir={probe}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = read_probe(probe, 0)[-1], read_probe(probe, 1)[-1]
    assert rank0["global_step"] == rank1["global_step"] == 8
    assert rank0["weights"] == rank1["weights"] and rank0["ema"] == rank1["ema"]
    assert read_probe(probe, 0)[0]["weights"] != rank0["weights"]  # it did train


def test_print_config_is_complete_and_reusable(tmp_path, cli_runner, monkeypatch):
    """``fit --print_config`` emits a config that parses again into the same model (linked values included)."""
    printed = cli_runner(["fit", "--config", QUICKSTART, "--print_config"], tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed.stdout)
    assert (
        "class_path: diffusion_lab.nets.unet.UNet" in printed.stdout and "guidance_w: 0.5" in printed.stdout
    )
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(saved), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]
    )
    assert cli.trainer.state.finished and cli.model.num_classes == 10 and cli.model.sampler.guidance_w == 0.5
    assert cli.model.denoiser.network.in_channels == 1
