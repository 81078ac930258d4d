"""Fault drills: a seconds-long toy training configuration and helpers to run it through the real CLI in a
subprocess, kill it, resume it and compare the outcome with an uninterrupted run.

Used by ``tests/reliability`` and ``benchmarks/reliability.py``; the faults themselves are the callbacks and
plugins of :mod:`diffusion_lab.reliability.faults`, added to the configuration like any other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from diffusion_lab.reliability.atomic_checkpoint import load_checkpoint_file

__all__ = ["TOY_CONFIG", "checkpoint_differences", "run_fit", "signal_at", "toy_config"]

TOY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "diffusion" / "toy2d.yaml"


def toy_config(
    root: str | os.PathLike,
    *,
    max_steps: int,
    every_n_steps: int = 3,
    extra_callbacks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``configs/diffusion/toy2d.yaml`` shrunk to seconds: a 2x32 MLP, 4 steps per epoch, a validation every
    2 epochs (runs cross epoch boundaries and validations), ``last.ckpt`` every ``every_n_steps`` steps in
    ``root/ckpt``, deterministic kernels, no logger."""
    config = yaml.safe_load(TOY_CONFIG.read_text())
    trainer = config["trainer"]
    trainer.update(
        max_epochs=None,
        max_steps=max_steps,
        check_val_every_n_epoch=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(Path(root) / "ckpt"),
            "save_last": True,
            "save_top_k": 0,
            "every_n_train_steps": every_n_steps,
        },
    }
    trainer["callbacks"] = [checkpoint, *(extra_callbacks or [])]
    config["model"]["init_args"]["network"]["init_args"] = {"hidden": 32, "depth": 2}
    config["model"]["init_args"]["sampler"]["steps"] = 2
    config["data"]["init_args"].update(num_train=256, num_val=64, batch_size=64)
    return config


def signal_at(step: int, signal: str = "SIGKILL", phase: str = "before_optimizer_step") -> dict[str, Any]:
    """Config entry of a :class:`~diffusion_lab.reliability.faults.SignalAt` callback."""
    return {
        "class_path": "diffusion_lab.reliability.faults.SignalAt",
        "init_args": {"step": step, "signal": signal, "phase": phase},
    }


def run_fit(
    config: dict[str, Any], workdir: str | os.PathLike, name: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Write ``config`` to ``workdir/NAME.yaml`` and run ``python -m diffusion_lab.cli fit`` on it (plus
    ``args``) with one thread; output captured. A process killed by signal S has ``returncode == -S``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffusion_lab.cli", "fit", "--config", str(path), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checkpoint_differences(expected: str | os.PathLike, got: str | os.PathLike) -> list[str]:
    """What differs between two checkpoints' training state: global step, every model/EMA tensor (bitwise)
    and every optimiser state tensor. Empty when ``got`` continues exactly where ``expected`` is."""
    a, b = load_checkpoint_file(expected), load_checkpoint_file(got)
    diffs = (
        []
        if a["global_step"] == b["global_step"]
        else [f"global_step {a['global_step']} != {b['global_step']}"]
    )
    weights_a, weights_b = a["state_dict"], b["state_dict"]
    diffs += [f"missing {k}" for k in weights_a.keys() ^ weights_b.keys()]
    diffs += [k for k in weights_a.keys() & weights_b.keys() if not torch.equal(weights_a[k], weights_b[k])]
    for i, (opt_a, opt_b) in enumerate(zip(a["optimizer_states"], b["optimizer_states"])):
        for index in opt_a["state"].keys() | opt_b["state"].keys():
            sa, sb = opt_a["state"].get(index, {}), opt_b["state"].get(index, {})
            if sa.keys() != sb.keys() or not all(
                torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa
            ):
                diffs.append(f"optimizer {i} state of parameter {index}")
    return sorted(diffs)
