"""Trained models that several benchmarks share, trained once and cached under benchmarks/.cache/.

``digits_teacher()`` is the digits quickstart model (configs/quickstart.yaml: class-conditional EDM UNet trained
with label dropout, so it is also a classifier-free-guidance teacher). The first call trains it through the real
CLI (a few minutes on CPU); later calls load the cached checkpoint. Delete the cache folder to retrain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion_lab.methods.loading import load_module

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def train_cached(name: str, configs: list[Path], overrides: list[str] = ()) -> Path:
    """Train ``configs`` with the CLI unless ``CACHE/name/last.ckpt`` exists; return that checkpoint path."""
    from diffusion_lab.cli import main

    target = CACHE / name / "last.ckpt"
    if target.is_file():
        return target
    run_dir = CACHE / name / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))]
    args += [
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=true",
        *overrides,
    ]
    main(args)
    checkpoints = sorted(run_dir.rglob("last.ckpt"))
    if not checkpoints:
        raise RuntimeError(f"training {name} wrote no last.ckpt under {run_dir}")
    shutil.copy(checkpoints[-1], target)
    return target


def digits_teacher():
    """The trained digits quickstart DiffusionModule (EMA weights in ``.ema.averaged``), eval mode, CPU."""
    ckpt = train_cached("digits_teacher", [QUICKSTART])
    return load_module(QUICKSTART, ckpt)
