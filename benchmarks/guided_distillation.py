"""Guided distillation on digits: the distilled student at 1-8 steps vs the classifier-free-guided teacher.

    OMP_NUM_THREADS=1 python -m benchmarks guided_distillation                 (CPU; see the timing in the .md)
    OMP_NUM_THREADS=1 python -m benchmarks guided_distillation -- --quick      (a smoke run of every part)

1. Teacher: the digits quickstart model (``benchmarks._models.digits_teacher``: class-conditional EDM UNet trained
   with label dropout 0.1), sampled with deterministic DDIM and classifier-free guidance
   ``(1 + w) D_c - w D_u`` (2 network evaluations per step; 1 at w = 0) on the N-step grid of the distillation
   schedule (``KarrasTime(0.002, 80, 7)``, EDM's rho = 7 spacing).
2. Student: ``configs/distillation/digits.yaml`` trained through the real CLI (stage 1, then 8 -> 4 -> 2 -> 1
   steps); ``PhaseCheckpoint`` keeps the student of every phase, each sampled at its own step count with DDIM (and
   with the paper's stochastic sampler), one evaluation per step, guidance strength ``w`` as an input. The
   stage-1 student (guided output in one evaluation, before any step distillation) is sampled at 16 steps.
3. Quality: FID and class accuracy on the shipped digits feature net (``metrics.features`` /
   ``metrics.factory.quality_from_features``) against the digits training split, for the same fixed noise and
   labels (``num_samples``, labels cycling over the 10 classes) for every row. Wall time per sample is measured
   on the same run, batch by batch.

Headline (``guided_distillation.json``): at the headline ``w``, ``fid_ratio`` = FID(student, 4 steps) / FID(teacher,
256 steps = 512 NFE) and ``nfe_speedup`` = (fewest teacher NFE in the sweep whose FID <= the 4-step student's) / 4.
Both models are cached under ``benchmarks/.cache/``; ``--retrain`` distills again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import CACHE, REPO, digits_teacher, train_cached
from diffusion_lab.data.digits import Digits
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance
from diffusion_lab.methods.distillation_student import sample_on_grid
from diffusion_lab.methods.loading import load_module
from diffusion_lab.metrics.factory import QualityConfig, quality_from_features
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.reference_stats import ReferenceStats

CONFIG = REPO / "configs" / "distillation" / "digits.yaml"
# student steps -> phase checkpoint; 16: the stage-1 (w-conditioned, not yet step-distilled) student at 16 steps
PHASES = {16: "stage1", 8: "stage2_8_steps", 4: "stage2_4_steps", 2: "stage2_2_steps", 1: "stage2_1_steps"}


# ------------------------------------------------------------------------------------------ models
def distilled_students(
    retrain: bool, overrides: list[str], name: str = "guided_distillation"
) -> tuple[dict[int, Path], float | None]:
    """Phase checkpoints {student steps: path} of the CLI run of ``CONFIG`` (trained once, cached)."""
    folder = CACHE / name
    paths = {n: folder / f"{name}.ckpt" for n, name in PHASES.items()}
    info = folder / "train_info.json"
    if retrain:
        shutil.rmtree(folder, ignore_errors=True)
    if all(p.is_file() for p in paths.values()):
        return paths, json.loads(info.read_text())["seconds"] if info.is_file() else None
    teacher_ckpt = train_cached("digits_teacher", [REPO / "configs" / "quickstart.yaml"])
    start = time.perf_counter()
    last = train_cached(name, [CONFIG], [f"--model.init_args.teacher_checkpoint={teacher_ckpt}", *overrides])
    seconds = time.perf_counter() - start
    for path in paths.values():
        shutil.copy(next(last.parent.joinpath("run").rglob(path.name)), path)
    info.write_text(json.dumps({"seconds": seconds, "overrides": overrides}))
    return paths, seconds


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """FID and class accuracy of digits samples on the shipped feature net, vs the training split."""

    def __init__(self) -> None:
        self.extractor = build_feature_extractor("feature_net").eval()
        data = Digits(batch_size=512, val_fraction=0.1, seed=0)
        data.setup("fit")
        real = torch.cat([x for x, _ in data.train_dataloader()])
        self.reference = ReferenceStats.from_features(self._features(real)[0])
        self.config = QualityConfig(kid=False, inception_score=False, precision_recall=False)

    @torch.no_grad()
    def _features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = zip(*(self.extractor(chunk.clamp(-1, 1)) for chunk in images.split(500)))
        return torch.cat(feats), torch.cat(logits)

    def __call__(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        features, logits = self._features(samples)
        return quality_from_features(
            self.reference, features, labels=labels, predicted=logits.argmax(1), config=self.config
        )


def timed(draw, noise: Tensor, labels: Tensor, batch: int) -> tuple[Tensor, float]:
    """Samples drawn batch by batch, and the wall time per sample."""
    start, out = time.perf_counter(), []
    for x, y in zip(noise.split(batch), labels.split(batch)):
        out.append(draw(x, y))
    return torch.cat(out), (time.perf_counter() - start) / len(noise)


def teacher_draw(teacher, schedule, steps: int, w: float):
    guidance = partial(ClassifierFreeGuidance, w=w, null_label=teacher.null_label) if w != 0 else None
    denoiser = teacher.ema.averaged

    def draw(noise: Tensor, labels: Tensor) -> Tensor:
        return sample_on_grid(denoiser, schedule, steps, noise, cond={"labels": labels}, guidance=guidance)

    return draw


def student_draw(student, steps: int, w: float, method: str):
    def draw(noise: Tensor, labels: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(1)
        sampler = {"steps": steps, "guidance_w": w, "method": method}
        return student.generate(
            len(noise), labels=labels, unit_noise=noise, generator=generator, sampler=sampler
        )

    return draw


def first_teacher_nfe_at_least_as_good(rows: list[dict], w: float, fid: float) -> int | None:
    candidates = [r["nfe"] for r in rows if r["model"] == "teacher" and r["w"] == w and r["fid"] <= fid]
    return min(candidates) if candidates else None


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--w", type=float, nargs="+", default=[0.0, 0.3, 1.0, 2.0, 4.0])
    parser.add_argument("--headline-w", type=float, default=1.0)
    parser.add_argument(
        "--teacher-steps",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64, 128, 256],
        help="teacher DDIM steps at the headline w (NFE = 2 x steps)",
    )
    parser.add_argument(
        "--teacher-steps-other-w",
        type=int,
        nargs="+",
        default=[8, 32],
        help="teacher DDIM steps at the other w (the full sweep costs minutes per w on CPU)",
    )
    parser.add_argument("--retrain", action="store_true", help="distill again (the teacher stays cached)")
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        help="a CLI override of the distillation fit (repeatable; write --train-override=--model.init_args.X=V); "
        "runs with overrides are cached in their own folder",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets everywhere")
    parser.add_argument(
        "--name", default="guided_distillation", help="results file name under benchmarks/results/"
    )
    args = parser.parse_args()
    overrides: list[str] = list(args.train_override)
    if args.quick:
        args.num_samples, args.w, args.headline_w = 40, [0.0, 1.0], 1.0
        args.teacher_steps, args.teacher_steps_other_w = [2, 4], [2]
        overrides += [
            "--model.init_args.stage1_iterations=4",
            "--model.init_args.phase_iterations=[2, 2, 2, 2]",
        ]
    if args.headline_w not in args.w:
        args.w.append(args.headline_w)

    torch.manual_seed(0)
    teacher = digits_teacher()
    cache_name = "guided_distillation_quick" if args.quick else "guided_distillation"
    if args.train_override and not args.quick:
        cache_name += "_" + hashlib.sha256(" ".join(args.train_override).encode()).hexdigest()[:8]
    paths, train_seconds = distilled_students(args.retrain or args.quick, overrides, cache_name)
    students = {n: load_module(CONFIG, path) for n, path in paths.items()}
    schedule = students[1].schedule
    evaluate = Evaluator()
    labels = torch.arange(args.num_samples) % 10
    noise = torch.randn(args.num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(2024))

    rows: list[dict] = []
    # Teacher rows depend only on the cached teacher and the sweep: kept across runs (e.g. to compare students).
    teacher_cache = CACHE / "digits_teacher" / f"guided_distillation_rows_{args.num_samples}.json"
    known = json.loads(teacher_cache.read_text()) if teacher_cache.is_file() and not args.quick else {}

    def record(model: str, steps: int, nfe: int, w: float, draw, method: str = "ddim") -> None:
        key = f"{w}-{steps}"
        if model == "teacher" and key in known:
            row = known[key] | {"cached": True}
        else:
            with torch.no_grad():
                samples, seconds = timed(draw, noise, labels, args.batch)
            row = {"model": model, "method": method, "steps": steps, "nfe": nfe, "w": w}
            row |= evaluate(samples, labels) | {"ms_per_sample": 1000 * seconds}
            if model == "teacher" and not args.quick:
                known[key] = row
                teacher_cache.write_text(json.dumps(known, indent=1))
        rows.append(row)
        print(
            f"  {model:8s} {method:21s} w={w:<4} steps={steps:<4} NFE={nfe:<4} "
            f"FID={row['fid']:.3f} acc={row['class_accuracy']:.3f} {row['ms_per_sample']:.2f} ms/sample"
        )

    for w in args.w:
        for n, student in sorted(students.items()):
            record("student", n, n, w, student_draw(student, n, w, "ddim"))
        for n in (4, 8) if not args.quick else (4,):
            record(
                "student",
                n,
                n,
                w,
                student_draw(students[n], n, w, "distilled_stochastic"),
                "distilled_stochastic",
            )
        for n in args.teacher_steps if w == args.headline_w else args.teacher_steps_other_w:
            record("teacher", n, n * (2 if w != 0 else 1), w, teacher_draw(teacher, schedule, n, w))

    headline = headline_numbers(rows, args, train_seconds)
    write_report(rows, headline, args)
    plot(rows, args)


def headline_numbers(rows: list[dict], args: argparse.Namespace, train_seconds: float | None) -> dict:
    w = args.headline_w

    def pick(model: str, steps: int, method: str = "ddim") -> dict | None:
        match = [
            r
            for r in rows
            if r["model"] == model and r["steps"] == steps and r["w"] == w and r["method"] == method
        ]
        return match[0] if match else None

    student4, teacher_full = pick("student", 4), pick("teacher", max(args.teacher_steps))
    equal = first_teacher_nfe_at_least_as_good(rows, w, student4["fid"])
    equal_row = next((r for r in rows if r["model"] == "teacher" and r["w"] == w and r["nfe"] == equal), None)
    return {
        "headline_w": w,
        "num_samples": args.num_samples,
        "student4_fid": student4["fid"],
        "student4_class_accuracy": student4["class_accuracy"],
        "teacher_full_steps": max(args.teacher_steps),
        "teacher_full_nfe": teacher_full["nfe"],
        "teacher_full_fid": teacher_full["fid"],
        "teacher_full_class_accuracy": teacher_full["class_accuracy"],
        "fid_ratio": student4["fid"] / teacher_full["fid"],
        "nfe_speedup": None if equal is None else equal / student4["nfe"],
        "nfe_speedup_vs_full_teacher": teacher_full["nfe"] / student4["nfe"],
        "time_speedup_at_equal_quality": None
        if equal_row is None
        else equal_row["ms_per_sample"] / student4["ms_per_sample"],
        "time_speedup_vs_full_teacher": teacher_full["ms_per_sample"] / student4["ms_per_sample"],
        "distillation_train_seconds": train_seconds,
        "rows": rows,
    }


def write_report(rows: list[dict], headline: dict, args: argparse.Namespace) -> None:
    table = markdown_table(
        ["model", "sampler", "w", "steps", "NFE", "FID", "class acc.", "ms / sample"],
        [
            [
                r["model"],
                r["method"],
                r["w"],
                r["steps"],
                r["nfe"],
                r["fid"],
                r["class_accuracy"],
                r["ms_per_sample"],
            ]
            for r in sorted(rows, key=lambda r: (r["w"], r["model"] != "student", r["method"], r["nfe"]))
        ],
    )
    h = headline
    cached_note = (
        "\nTeacher rows (FID, accuracy and time) were reused from an earlier run of this benchmark with the same\n"
        "teacher, noise and labels (`benchmarks/.cache/digits_teacher/guided_distillation_rows_*.json`)."
        if any(r.get("cached") for r in rows)
        else ""
    )
    speed = "not reached in the sweep" if h["nfe_speedup"] is None else f"**{h['nfe_speedup']:.3g}x**"
    text = f"""# Guided distillation on digits (Meng et al. 2023): distilled student vs guided teacher

Command: `OMP_NUM_THREADS=1 python -m benchmarks guided_distillation` (distillation run cached under
`benchmarks/.cache/guided_distillation/`; distillation took {h["distillation_train_seconds"] or float("nan"):.0f} s
of wall time through the CLI, `configs/distillation/digits.yaml`). {args.num_samples} samples per row (labels
cycling over the 10 classes, the same noise for every row), FID and class accuracy on the shipped digits feature
net against the digits training split. Teacher: DDIM + classifier-free guidance on the same time grid (2 NFE per
step for w > 0). Student: the checkpoint of each phase at its own step count (1 NFE per step).{cached_note}

## Headline (w = {h["headline_w"]})

* 4-step student: FID {h["student4_fid"]:.3f}, class accuracy {h["student4_class_accuracy"]:.3f}.
* Teacher at {h["teacher_full_steps"]} steps ({h["teacher_full_nfe"]} NFE): FID {h["teacher_full_fid"]:.3f},
  class accuracy {h["teacher_full_class_accuracy"]:.3f}.
* `fid_ratio` (student-4 / teacher-{h["teacher_full_steps"]}) = **{h["fid_ratio"]:.3f}** (goal: <= 1.10).
* `nfe_speedup` at equal quality (fewest teacher NFE in the sweep with FID <= the student's, / 4) = {speed};
  vs the full teacher: {h["nfe_speedup_vs_full_teacher"]:.0f}x fewer evaluations,
  {h["time_speedup_vs_full_teacher"]:.0f}x less wall time per sample.

## All rows

{table}

![FID vs NFE](guided_distillation.png)
"""
    write_results(args.name, text, headline)


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for w in sorted(set(r["w"] for r in rows)):
        teacher = sorted((r["nfe"], r["fid"]) for r in rows if r["model"] == "teacher" and r["w"] == w)
        student = sorted(
            (r["nfe"], r["fid"])
            for r in rows
            if r["model"] == "student" and r["w"] == w and r["method"] == "ddim"
        )
        line = axes[0].plot(*zip(*student), "o-", label=f"student w={w}")[0]
        axes[0].plot(*zip(*teacher), "s--", color=line.get_color(), alpha=0.6, label=f"teacher w={w}")
    axes[0].set(
        xscale="log",
        xlabel="network evaluations per sample",
        ylabel="FID (feature net)",
        title="distilled student (solid) vs guided DDIM teacher (dashed)",
    )
    axes[0].legend(fontsize=7, ncol=2)
    for n in sorted(set(r["steps"] for r in rows if r["model"] == "student")):
        pts = sorted(
            (r["w"], r["class_accuracy"])
            for r in rows
            if r["model"] == "student" and r["steps"] == n and r["method"] == "ddim"
        )
        axes[1].plot(*zip(*pts), "o-", label=f"student {n} steps")
    full = max(args.teacher_steps_other_w)
    pts = sorted(
        (r["w"], r["class_accuracy"]) for r in rows if r["model"] == "teacher" and r["steps"] == full
    )
    axes[1].plot(*zip(*pts), "s--k", label=f"teacher {full} steps")
    axes[1].set(xlabel="guidance strength w", ylabel="class accuracy (feature net)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
