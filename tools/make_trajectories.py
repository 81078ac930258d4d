"""Record teacher ODE trajectories for DSNO: sharded safetensors + meta.json, resumable, with a progress bar.

Either from a DSNO config (its teacher, sampler and record, and its data path as the output)::

    python tools/make_trajectories.py --config configs/dsno/digits.yaml --num 20000

or from any teacher checkpoint and any ODE sampler of the suite::

    python tools/make_trajectories.py --teacher-config configs/quickstart.yaml \
        --teacher-checkpoint benchmarks/.cache/digits_teacher/last.ckpt --method ddim --steps 64 \
        --record 16 32 48 64 --guidance-w 0.5 --num 20000 --out runs/trajectories/digits_ddim64

Trajectory i starts from randn with seed ``--seed + i`` and label ``i mod num_classes``; re-running the same command
after an interruption writes only the missing shards (see ``diffusion_lab.data.trajectories``). A DSNO config
trains on such a set when its ``sampler`` and ``record`` match (checked at fit start).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_lab.diffusion.samplers import ODE_SAMPLERS  # noqa: E402
from diffusion_lab.methods.distillation_student import load_teacher_denoiser_weights, resolve_path  # noqa: E402
from diffusion_lab.methods.dsno import DSNO  # noqa: E402
from diffusion_lab.methods.sampling import GuidedSamplerConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a DSNO YAML: teacher, sampler, record and output path from it")
    p.add_argument("--teacher-config", help="the teacher DiffusionModule YAML")
    p.add_argument("--teacher-checkpoint", help="the teacher checkpoint (.ckpt or safetensors)")
    p.add_argument("--method", choices=ODE_SAMPLERS, help="ODE sampler (default dpmpp_2m)")
    p.add_argument("--steps", type=int, help="sampler steps (default 32)")
    p.add_argument("--schedule", default=None, help="sigma grid: karras | loglinear | vp (default karras)")
    p.add_argument("--sigma-min", type=float, default=None)
    p.add_argument("--sigma-max", type=float, default=None)
    p.add_argument(
        "--guidance-w", type=float, default=None, help="classifier-free guidance strength (default 0)"
    )
    p.add_argument(
        "--record", type=int, nargs="+", help="grid indices to store, ending with --steps (default all)"
    )
    p.add_argument("--out", help="output directory (default: the config's data.init_args.path)")
    p.add_argument("--num", type=int, required=True, help="number of trajectories")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _dsno_settings(args: argparse.Namespace) -> tuple[dict, str | None]:
    """(DSNO init args, output path) from --config, then overridden by the explicit options."""
    init, out = {}, None
    if args.config:
        spec = yaml.safe_load(resolve_path(args.config).read_text())
        init = dict(spec["model"].get("init_args") or {})
        out = ((spec.get("data") or {}).get("init_args") or {}).get("path")
    sampler = dict(init.get("sampler") or {"method": "dpmpp_2m", "steps": 32})
    for key, value in (("method", args.method), ("steps", args.steps), ("schedule", args.schedule)):
        if value is not None:
            sampler[key] = value
    grid = dict(sampler.get("schedule_kwargs") or {})
    for key, value in (("sigma_min", args.sigma_min), ("sigma_max", args.sigma_max)):
        if value is not None:
            grid[key] = value
    sampler["schedule_kwargs"] = grid
    if args.guidance_w is not None:
        sampler["guidance_w"] = args.guidance_w
    settings = {
        "teacher_config": args.teacher_config or init.get("teacher_config"),
        "teacher_checkpoint": args.teacher_checkpoint or init.get("teacher_checkpoint"),
        "sampler": GuidedSamplerConfig(**sampler),
        "record": args.record if args.record is not None else init.get("record"),
    }
    if args.record is None and (args.steps is not None or args.method is not None) and args.config:
        settings["record"] = None  # a different grid: the config's indices no longer apply
    return settings, args.out or out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    settings, out = _dsno_settings(args)
    if not settings["teacher_config"] or not settings["teacher_checkpoint"] or not out:
        raise SystemExit(
            "need a teacher config, a teacher checkpoint and an output directory (--config or --teacher-*)"
        )
    model = DSNO(
        teacher_config=settings["teacher_config"], sampler=settings["sampler"], record=settings["record"]
    )
    load_teacher_denoiser_weights(model.teacher, settings["teacher_checkpoint"], settings["teacher_config"])
    model.teacher.to(args.device)
    # An explicit --out is relative to the working directory; a config's data path to the repository root (where
    # TrajectoryData looks when the path is not in the working directory).
    out_path = Path(out) if args.out or Path(out).is_absolute() else REPO / out
    source = {k: str(settings[k]) for k in ("teacher_config", "teacher_checkpoint")}
    directory = model.make_trajectories(
        out_path,
        args.num,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
        source=source,
    )
    print(
        f"wrote {args.num} trajectories ({len(model.record)} levels: {model.output_sigmas.tolist()}) to {directory}"
    )
    return directory


if __name__ == "__main__":
    main()
