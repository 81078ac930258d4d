"""DSNO on digits: FID and class accuracy at one network evaluation vs the teacher's training-free ODE samplers.

    OMP_NUM_THREADS=1 python -m benchmarks dsno                 (CPU: trajectories + training + evaluation)
    OMP_NUM_THREADS=1 python -m benchmarks dsno -- --quick      (a smoke run of every part)

1. Teacher: the digits quickstart model (``benchmarks._models.digits_teacher``), classifier-free guidance w = 0.5,
   sampled with DDIM and DPM-Solver++(2M) on EDM's Karras grid at 1, 2, 4, 8, 16, 64 steps (each step is one
   batched guided evaluation).
2. DSNO: ``configs/dsno/digits.yaml`` -- trajectories by ``tools/make_trajectories.py`` (32-step DPM-Solver++(2M),
   w = 0.5), training through the real CLI; both cached under ``benchmarks/.cache/``. Sampled with one evaluation.
3. Guided-distillation student at 1 step, if its benchmark has cached it (``benchmarks/.cache/guided_distillation``).
4. Quality: FID and class accuracy on the shipped digits feature net (``benchmarks.guided_distillation.Evaluator``)
   for the same noise and labels in every row; wall time per sample on the same run.

Headline (``dsno.json``): ``margin`` = (best training-free FID below 8 steps) - (DSNO FID at 1 evaluation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import CACHE, REPO, digits_teacher, train_cached
from benchmarks.guided_distillation import Evaluator, timed
from diffusion_lab.data.trajectories import TrajectoryData
from diffusion_lab.methods.loading import load_module
from diffusion_lab.methods.sampling import GuidedSamplerConfig, generate

CONFIG = REPO / "configs" / "dsno" / "digits.yaml"
KARRAS = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
STEPS = (1, 2, 4, 8, 16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part runs")
    p.add_argument("--num-trajectories", type=int, default=6000)
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    if args.quick:
        args.num_trajectories, args.max_steps, args.num_samples = 300, 20, 200
    return args


def dsno_model(args: argparse.Namespace):
    """Trajectories (resumable) and the trained DSNO (cached), loaded for inference."""
    from tools.make_trajectories import main as make_trajectories

    name = "dsno_digits_quick" if args.quick else "dsno_digits"
    out = CACHE / f"{name}_trajectories"
    make_trajectories(["--config", str(CONFIG), "--num", str(args.num_trajectories), "--out", str(out)])
    total = args.max_steps
    overrides = [
        f"--data.init_args.path={out}",
        f"--trainer.max_steps={total}",
        f"--model.init_args.lr_scheduler.init_args.total_steps={total}",
        f"--model.init_args.lr_scheduler.init_args.warmup_steps={min(100, total // 5)}",
    ]
    ckpt = train_cached(name, [CONFIG], overrides)
    assert TrajectoryData(str(out)).is_complete()
    return load_module(CONFIG, ckpt, overrides=[f"--data.init_args.path={out}"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    teacher = digits_teacher()
    evaluate = Evaluator()
    n = args.num_samples
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(n) % 10
    rows: list[dict] = []

    def record(model: str, method: str, steps: int, evaluations: int, draw) -> None:
        samples, seconds = timed(draw, noise, labels, 250)
        rows.append({"model": model, "method": method, "steps": steps, "nfe": evaluations, "sec": seconds,
                     **evaluate(samples, labels)})  # fmt: skip
        print(rows[-1])

    for method in ("ddim", "dpmpp_2m"):
        for steps in STEPS:
            config = GuidedSamplerConfig(method=method, steps=steps, schedule_kwargs=KARRAS, guidance_w=0.5)

            def draw(z, y, config=config):
                return generate(
                    teacher.ema.averaged, tuple(z.shape), config, labels=y, null_label=teacher.null_label,
                    unit_noise=z,
                )  # fmt: skip

            record("teacher (w=0.5)", method, steps, 2 * steps, draw)
    dsno = dsno_model(args)
    record("DSNO", "operator", 1, 1, lambda z, y: dsno.generate(len(z), labels=y, unit_noise=z))
    student_ckpt = CACHE / "guided_distillation" / "stage2_1_steps.ckpt"
    if student_ckpt.is_file():
        student = load_module(REPO / "configs" / "distillation" / "digits.yaml", student_ckpt)
        sampler = {"steps": 1, "guidance_w": 0.5, "method": "ddim"}
        record(
            "guided distillation",
            "ddim",
            1,
            1,
            lambda z, y: student.generate(len(z), y, None, sampler, unit_noise=z),
        )

    free = [r["fid"] for r in rows if r["model"].startswith("teacher") and r["steps"] < 8]
    dsno_fid = next(r["fid"] for r in rows if r["model"] == "DSNO")
    headline = {"dsno_fid_1nfe": dsno_fid, "best_training_free_fid_below_8_steps": min(free),
                "margin": min(free) - dsno_fid, "quick": args.quick, "num_samples": n}  # fmt: skip
    keys = [k for k in rows[0] if k not in ("model", "method", "steps", "nfe", "sec")]
    table = markdown_table(
        ["model", "sampler", "steps", "network evaluations", "ms / sample", *keys],
        [
            [r["model"], r["method"], r["steps"], r["nfe"], 1000 * r["sec"], *[r[k] for k in keys]]
            for r in rows
        ],
    )
    plot_fid_vs_nfe(rows, RESULTS_DIR / "dsno.png")
    write_results(
        "dsno",
        f"# DSNO on digits (1 network evaluation) vs training-free samplers\n\n{__doc__}\n\n{table}\n\n"
        f"margin (best training-free FID below 8 steps - DSNO FID) = {headline['margin']:.4g}\n\n"
        "![FID vs network evaluations](dsno.png)",
        {**headline, "rows": rows},
    )


def plot_fid_vs_nfe(rows: list[dict], path: Path) -> None:
    """FID vs network evaluations: one line per training-free teacher sampler, one point per 1-step model."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows if r["model"].startswith("teacher")}):
        line = sorted(
            (r["nfe"], r["fid"]) for r in rows if r["model"].startswith("teacher") and r["method"] == method
        )
        ax.plot(*zip(*line), marker="o", label=f"teacher + {method}")
    for r in rows:
        if not r["model"].startswith("teacher"):
            ax.scatter(
                [r["nfe"]], [r["fid"]], marker="*", s=160, zorder=3, label=f"{r['model']} (1 evaluation)"
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("FID (digits feature net)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
