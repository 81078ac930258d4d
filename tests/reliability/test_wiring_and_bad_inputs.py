"""The CLI adds the reliability pieces by default (and not with --reliability false); bad inputs fail with
errors naming the file or value: a folder with a corrupt JPEG, a zero-byte file and a 1x1 image; a corrupt
or code-running checkpoint given to --ckpt_path; wrong shapes and sigmas to a denoiser or sampler."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.cli import DiffusionLabCLI, main
from diffusion_lab.data.image_folder import BadImageError, ImageFolder
from diffusion_lab.diffusion.samplers import sample_heun
from diffusion_lab.reliability import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    ExactResume,
    NaNGuard,
    Preemption,
    ResumableDataLoader,
    UnsafeCheckpointError,
)

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs" / "diffusion" / "toy2d.yaml")
SMALL = ["--trainer.logger=false", "--data.init_args.num_train=64", "--data.init_args.num_val=16"]


def _cli(*args: str) -> DiffusionLabCLI:
    return DiffusionLabCLI(
        args=["--config", TOY, *SMALL, *args],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )


def test_cli_adds_reliability_defaults_once_and_can_opt_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = _cli().trainer
    kinds = [type(c) for c in trainer.callbacks]
    assert all(kinds.count(k) == 1 for k in (ExactResume, NaNGuard, Preemption))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # a guard configured by hand is kept, not doubled
    custom = _cli(
        "--trainer.callbacks+=diffusion_lab.reliability.NaNGuard",
        "--trainer.callbacks.init_args.max_consecutive=2",
    ).trainer
    guards = [c for c in custom.callbacks if isinstance(c, NaNGuard)]
    assert len(guards) == 1 and guards[0].max_consecutive == 2
    plain = _cli("--reliability=false").trainer
    assert not any(isinstance(c, (ExactResume, NaNGuard, Preemption)) for c in plain.callbacks)
    assert not isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO)


def test_training_loader_is_stateful(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli()
    cli.datamodule.setup("fit")
    assert isinstance(cli.datamodule.train_dataloader(), ResumableDataLoader)


# ---- a bad image folder -----------------------------------------------------------------------------
@pytest.fixture
def junk_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"good{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(data[: len(data) // 3])  # cut off mid-scan
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "tiny.png")
    return tmp_path


BAD = {
    "corrupt.jpg": "cannot read image .*corrupt.jpg",
    "empty.png": r"cannot read image .*empty.png.*empty \(0 bytes\)",
    "tiny.png": r"image .*tiny.png' is 1x1, smaller than the minimum shorter side 4 for resolution 16",
}


def test_each_bad_image_raises_naming_its_file(junk_folder):
    dataset = ImageFolder(str(junk_folder), resolution=16).train_dataloader().dataset
    names = [p.name for p in dataset.files]
    for name, message in BAD.items():
        with pytest.raises(BadImageError, match=message):
            dataset[names.index(name)]
    for i, name in enumerate(names):
        if name.startswith("good"):
            assert dataset[i][0].shape == (3, 16, 16)


def test_skip_mode_counts_and_names_every_skipped_file(junk_folder, caplog):
    with caplog.at_level(logging.WARNING):
        dm = ImageFolder(str(junk_folder), resolution=16, on_bad_image="skip")
        dm.setup("fit")
    assert sorted(p.name for p in dm.skipped_files) == sorted(BAD) and len(dm.train_set) == 3
    assert "skipped 3 unreadable images" in caplog.text
    for message in BAD.values():
        assert re.search(message, caplog.text), message
    with pytest.raises(ValueError, match="min_image_size must be >= 1 pixel, got 0"):
        ImageFolder(str(junk_folder), resolution=16, min_image_size=0)


# ---- bad checkpoints through the CLI -----------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("kind", ["truncated", "code"])
def test_cli_ckpt_path_bad_checkpoint_gives_a_clear_error(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.randn(256, 256)}}, bad)
        bad.write_bytes(bad.read_bytes()[:5000])
        expected, error = "truncated or corrupt", CorruptCheckpointError
    else:
        torch.save({"state_dict": {}, "x": _RunsCode()}, bad)
        expected, error = "refusing to load checkpoint", UnsafeCheckpointError
    with pytest.raises(error, match=rf"(?s)({expected}.*{bad.name}|{bad.name}.*{expected})"):
        main(
            [
                "fit",
                "--config",
                TOY,
                *SMALL,
                "--trainer.max_steps=1",
                "--trainer.enable_progress_bar=false",
                f"--ckpt_path={bad}",
            ]
        )
    assert not (tmp_path / "PWNED").exists()


# ---- bad tensors to a denoiser or sampler ------------------------------------------------------------
def test_wrong_shapes_and_sigmas_are_named():
    from diffusion_lab.diffusion.denoiser import Denoiser
    from diffusion_lab.nets.mlp import MLP

    denoiser = Denoiser(MLP(dim=2, hidden=8, depth=1), "edm", 0.5)
    with pytest.raises(ValueError, match="sigma has 3 entries but x has batch size 4"):
        denoiser(torch.randn(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match=r"MLP expects input of shape \(B, 2\), got \(4, 3\)"):
        denoiser(torch.randn(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match=r"sigmas must be finite and non-negative, got sigmas\[1\] = -0.5"):
        sample_heun(denoiser, torch.randn(4, 2), torch.tensor([1.0, -0.5, 0.0]))
    with pytest.raises(ValueError, match="sigmas must end with 0"):
        sample_heun(denoiser, torch.randn(4, 2), torch.tensor([2.0, 1.0]))
