"""Guided distillation on digits: the distilled student at 1-128 steps vs the classifier-free-guided teacher.

    OMP_NUM_THREADS=1 python -m benchmarks guided_distillation                 (CPU; see the timing in the .md)
    OMP_NUM_THREADS=1 python -m benchmarks guided_distillation -- --quick      (a smoke run of every part)

1. Teacher: the digits quickstart model (``benchmarks._models.digits_teacher``: class-conditional EDM UNet trained
   with label dropout 0.1), sampled with deterministic DDIM and classifier-free guidance
   ``(1 + w) D_c - w D_u`` (2 network evaluations per step; 1 at w = 0) on the N-step grid of the distillation
   schedule (``KarrasTime(0.002, 80, 7)``, EDM's rho = 7 spacing), 8-256 steps at every w.
2. Student: ``configs/distillation/digits.yaml`` trained through the real CLI (stage 1, then the halvings of its
   ``steps`` schedule); ``PhaseCheckpoint`` keeps the student of every phase, each sampled at its own step count
   with DDIM (4 and 8 steps also with the paper's stochastic sampler), one evaluation per step, guidance strength
   ``w`` as an input. The stage-1 student (guided output in one evaluation, before any step distillation) is
   sampled at the step count of the first stage-2 teacher.
3. Quality: FID and class accuracy on the shipped digits feature net (``metrics.features`` /
   ``metrics.factory.quality_from_features``) against the digits training split, for the same fixed noise and
   labels (``num_samples``, labels cycling over the 10 classes) for every row. Wall time per sample is measured
   on the same run, batch by batch. Fidelity: RMS pixel distance to the teacher's samples at the most steps from
   the same noise (``rms_distance``).

Headline (``guided_distillation.json``): at the headline ``w``, ``fid_ratio`` = FID(student, 4 steps) / FID(teacher,
256 steps = 512 NFE), ``nfe_speedup`` = (fewest teacher NFE in the sweep whose FID <= the 4-step student's) / 4 and
``nfe_speedup_equal_fidelity`` = (fewest teacher NFE as close to the 256-step teacher as the 4-step student) / 4.
The teacher, the students (per training overrides) and the teacher's samples are cached under
``benchmarks/.cache/``; ``--retrain`` distills again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
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
# row label of the w-conditioned student before step distillation (sampled at its first stage-2 teacher's steps)
STAGE1 = "stage-1 student"


# ------------------------------------------------------------------------------------------ models
def phase_checkpoints(folder: Path) -> dict[tuple[str, int], Path]:
    """{(row label, sampling steps): checkpoint} of the ``PhaseCheckpoint`` files in ``folder``: each stage-2
    phase's student at its own step count, and the stage-1 student at the first stage-2 teacher's step count
    (twice the largest student step count); empty if the run is incomplete."""
    distilled = {int(path.stem.split("_")[1]): path for path in folder.glob("stage2_*_steps.ckpt")}
    if not distilled or not (folder / "stage1.ckpt").is_file():
        return {}
    phases = {(STAGE1, 2 * max(distilled)): folder / "stage1.ckpt"}
    return phases | {("student", n): path for n, path in sorted(distilled.items())}


def distilled_students(
    retrain: bool, overrides: list[str], name: str = "guided_distillation"
) -> tuple[dict[tuple[str, int], Path], float | None]:
    """Phase checkpoints (``phase_checkpoints``) of the CLI run of ``CONFIG`` with ``overrides`` (trained once,
    cached under ``benchmarks/.cache/NAME``) and the seconds the run took."""
    folder = CACHE / name
    info = folder / "train_info.json"
    if retrain:
        shutil.rmtree(folder, ignore_errors=True)
    if info.is_file() and (phases := phase_checkpoints(folder)):
        return phases, json.loads(info.read_text())["seconds"]
    teacher_ckpt = train_cached("digits_teacher", [REPO / "configs" / "quickstart.yaml"])
    start = time.perf_counter()
    last = train_cached(name, [CONFIG], [f"--model.init_args.teacher_checkpoint={teacher_ckpt}", *overrides])
    seconds = time.perf_counter() - start
    for path in last.parent.joinpath("run").rglob("stage*.ckpt"):
        shutil.copy(path, folder / path.name)
    info.write_text(json.dumps({"seconds": seconds, "overrides": overrides}))
    return phase_checkpoints(folder), seconds


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

    def fid_ratio_spread(self, numerator: Tensor, denominator: Tensor, reps: int = 200) -> dict[str, float]:
        """Paired bootstrap of FID(numerator) / FID(denominator) over sample indices (the same resampled indices
        for both, as both were drawn from the same noise): how much of a ratio is the finite sample. Resampling
        with replacement repeats samples, so the spread is indicative, not an exact interval."""
        first, second = self._features(numerator)[0], self._features(denominator)[0]
        generator = torch.Generator().manual_seed(0)

        def fid(features: Tensor) -> float:
            return quality_from_features(self.reference, features, config=self.config)["fid"]

        ratios = []
        for _ in range(reps):
            index = torch.randint(0, len(first), (len(first),), generator=generator)
            ratios.append(fid(first[index]) / fid(second[index]))
        r = torch.tensor(ratios, dtype=torch.float64)
        return {
            "std": r.std().item(),
            "q05": r.quantile(0.05).item(),
            "q95": r.quantile(0.95).item(),
            "fraction_above_1.10": (r > 1.10).double().mean().item(),
        }


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


def rms_distance(samples: Tensor, reference: Tensor) -> float:
    """Root-mean-square pixel distance (images in [-1, 1]) between samples drawn from the same noise and labels:
    how closely a deterministic sampler reproduces the reference's noise-to-image map, which FID cannot tell
    (a student that under-guides can have a lower FID than its teacher)."""
    return (samples.double() - reference.double()).square().mean().sqrt().item()


def first_teacher_nfe_at_least_as_good(rows: list[dict], w: float, metric: str, value: float) -> int | None:
    """Fewest teacher NFE at guidance ``w`` whose ``metric`` (lower is better: ``fid``, ``rmse_to_teacher``) is
    at most ``value``; None if no teacher row in the sweep is that good."""
    candidates = [r["nfe"] for r in rows if r["model"] == "teacher" and r["w"] == w and r[metric] <= value]
    return min(candidates) if candidates else None


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--w", type=float, nargs="+", default=[0.0, 0.3, 1.0, 2.0, 4.0])
    parser.add_argument("--headline-w", type=float, default=1.0)
    parser.add_argument(
        "--teacher-steps",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64, 128, 256],
        help="teacher DDIM steps at every w (NFE = 2 x steps for w > 0); rows are cached across runs",
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
        args.teacher_steps = [2, 4]
        overrides += [
            "--model.init_args.stage1_iterations=4",
            "--model.init_args.phase_iterations=2",
        ]
    if args.headline_w not in args.w:
        args.w.append(args.headline_w)

    torch.manual_seed(0)
    teacher = digits_teacher()
    cache_name = "guided_distillation_quick" if args.quick else "guided_distillation"
    if args.train_override and not args.quick:
        cache_name += "_" + hashlib.sha256(" ".join(args.train_override).encode()).hexdigest()[:8]
    paths, train_seconds = distilled_students(args.retrain or args.quick, overrides, cache_name)
    students = {key: load_module(CONFIG, path) for key, path in paths.items()}
    schedule = next(iter(students.values())).schedule
    evaluate = Evaluator()
    labels = torch.arange(args.num_samples) % 10
    noise = torch.randn(args.num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(2024))

    rows: list[dict] = []
    # Teacher samples depend only on the cached teacher, the noise and the sweep: kept across runs (e.g. to compare
    # students), with their wall time.
    teacher_cache = CACHE / "digits_teacher" / f"guided_distillation_samples_{args.num_samples}"
    teacher_cache.mkdir(parents=True, exist_ok=True)
    reference: Tensor | None = None  # the teacher's samples at the most steps, for the same w
    headline_samples: dict[tuple[str, int], Tensor] = {}

    def record(model: str, steps: int, nfe: int, w: float, draw, method: str = "ddim") -> Tensor:
        cached = teacher_cache / f"w{w}_steps{steps}.pt"
        if model == "teacher" and cached.is_file() and not args.quick:
            saved = torch.load(cached, weights_only=True)
            samples, seconds, was_cached = saved["samples"], saved["seconds_per_sample"], True
        else:
            with torch.no_grad():
                samples, seconds = timed(draw, noise, labels, args.batch)
            was_cached = False
            if model == "teacher" and not args.quick:
                torch.save({"samples": samples, "seconds_per_sample": seconds}, cached)
        row = {"model": model, "method": method, "steps": steps, "nfe": nfe, "w": w, "cached": was_cached}
        row |= evaluate(samples, labels) | {"ms_per_sample": 1000 * seconds}
        row["rmse_to_teacher"] = rms_distance(samples, reference) if reference is not None else 0.0
        rows.append(row)
        if w == args.headline_w and method == "ddim":
            headline_samples[model, steps] = samples
        print(
            f"  {model:15s} {method:21s} w={w:<4} steps={steps:<4} NFE={nfe:<4} FID={row['fid']:.3f} "
            f"acc={row['class_accuracy']:.3f} rmse={row['rmse_to_teacher']:.3f} {row['ms_per_sample']:.2f} ms/sample"
        )
        return samples

    for w in args.w:
        reference = None
        for n in sorted(args.teacher_steps, reverse=True):  # the reference first: the most steps
            samples = record("teacher", n, n * (2 if w != 0 else 1), w, teacher_draw(teacher, schedule, n, w))
            reference = samples if reference is None else reference
        for (model, n), student in students.items():
            record(model, n, n, w, student_draw(student, n, w, "ddim"))
        for n in (4, 8) if not args.quick else (4,):
            if ("student", n) in students:
                draw = student_draw(students["student", n], n, w, "distilled_stochastic")
                record("student", n, n, w, draw, "distilled_stochastic")

    headline = headline_numbers(rows, args, train_seconds)
    headline["fid_ratio_bootstrap"] = evaluate.fid_ratio_spread(
        headline_samples["student", 4], headline_samples["teacher", max(args.teacher_steps)]
    )
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
    equal = first_teacher_nfe_at_least_as_good(rows, w, "fid", student4["fid"])
    equal_row = next((r for r in rows if r["model"] == "teacher" and r["w"] == w and r["nfe"] == equal), None)
    # never None: the reference teacher row itself has distance 0
    as_close = first_teacher_nfe_at_least_as_good(rows, w, "rmse_to_teacher", student4["rmse_to_teacher"])
    return {
        "headline_w": w,
        "num_samples": args.num_samples,
        "student4_fid": student4["fid"],
        "student4_class_accuracy": student4["class_accuracy"],
        "student4_rmse_to_teacher": student4["rmse_to_teacher"],
        "teacher_full_steps": max(args.teacher_steps),
        "teacher_full_nfe": teacher_full["nfe"],
        "teacher_full_fid": teacher_full["fid"],
        "teacher_full_class_accuracy": teacher_full["class_accuracy"],
        "fid_ratio": student4["fid"] / teacher_full["fid"],
        "nfe_speedup": None if equal is None else equal / student4["nfe"],
        "nfe_speedup_vs_full_teacher": teacher_full["nfe"] / student4["nfe"],
        "nfe_speedup_equal_fidelity": as_close / student4["nfe"],
        "time_speedup_at_equal_quality": None
        if equal_row is None
        else equal_row["ms_per_sample"] / student4["ms_per_sample"],
        "time_speedup_vs_full_teacher": teacher_full["ms_per_sample"] / student4["ms_per_sample"],
        "distillation_train_seconds": train_seconds,
        "rows": rows,
    }


def by_w(rows: list[dict], metric: str) -> str:
    """``metric`` per guidance strength (rows) and model / step count (columns), a digest of the full table."""

    def key(r: dict) -> tuple:
        return r["model"], r["method"], r["steps"]

    columns = sorted(
        {key(r) for r in rows},
        key=lambda k: ({"student": 0, STAGE1: 1, "teacher": 2}[k[0]], k[1] != "ddim", k[2]),
    )

    def title(model: str, method: str, steps: int) -> str:
        if model == "teacher":
            return f"teacher {steps}"
        return f"{model}{' stochastic' if method != 'ddim' else ''} {steps}"

    value = {(r["w"], key(r)): r[metric] for r in rows}
    return markdown_table(
        ["w", *(title(*c) for c in columns)],
        [[w, *(value.get((w, c), "") for c in columns)] for w in sorted({r["w"] for r in rows})],
    )


def command_options() -> str:
    """The options this run was given (`` -- --w 1.0 ...``), so a results file says how to reproduce it."""
    options = sys.argv[1:]
    return f" -- {shlex.join(options)}" if options else ""


def write_report(rows: list[dict], headline: dict, args: argparse.Namespace) -> None:
    table = markdown_table(
        ["model", "sampler", "w", "steps", "NFE", "FID", "class acc.", "RMS to teacher", "ms / sample"],
        [
            [
                r["model"],
                r["method"],
                r["w"],
                r["steps"],
                r["nfe"],
                r["fid"],
                r["class_accuracy"],
                r["rmse_to_teacher"],
                r["ms_per_sample"],
            ]
            for r in sorted(rows, key=lambda r: (r["w"], r["model"] != "student", r["method"], r["nfe"]))
        ],
    )
    h = headline
    b = h["fid_ratio_bootstrap"]
    cached_note = (
        "\nTeacher samples and their wall times were reused from an earlier run of this benchmark with the same\n"
        "teacher, noise and labels (`benchmarks/.cache/digits_teacher/guided_distillation_samples_*/`)."
        if any(r.get("cached") for r in rows)
        else ""
    )
    speed = "not reached in the sweep" if h["nfe_speedup"] is None else f"**{h['nfe_speedup']:.3g}x**"
    text = f"""# Guided distillation on digits (Meng et al. 2023): distilled student vs guided teacher

Command: `OMP_NUM_THREADS=1 python -m benchmarks guided_distillation{command_options()}` (distillation run cached
under `benchmarks/.cache/`; distillation took {h["distillation_train_seconds"] or float("nan"):.0f} s
of wall time through the CLI, `configs/distillation/digits.yaml`). {args.num_samples} samples per row (labels
cycling over the 10 classes, the same noise for every row), FID and class accuracy on the shipped digits feature
net against the digits training split. Teacher: DDIM + classifier-free guidance on the same time grid (2 NFE per
step for w > 0). Student: the checkpoint of each phase at its own step count (1 NFE per step).{cached_note}

## Headline (w = {h["headline_w"]})

* 4-step student: FID {h["student4_fid"]:.3f}, class accuracy {h["student4_class_accuracy"]:.3f}.
* Teacher at {h["teacher_full_steps"]} steps ({h["teacher_full_nfe"]} NFE): FID {h["teacher_full_fid"]:.3f},
  class accuracy {h["teacher_full_class_accuracy"]:.3f}.
* `fid_ratio` (student-4 / teacher-{h["teacher_full_steps"]}) = **{h["fid_ratio"]:.3f}** (goal: <= 1.10); finite-sample
  spread (paired bootstrap, `fid_ratio_bootstrap`): std {b["std"]:.3f}, 5-95 % {b["q05"]:.3f}-{b["q95"]:.3f},
  {100 * b["fraction_above_1.10"]:.0f} % of resamples above 1.10.
* `nfe_speedup` at equal quality (fewest teacher NFE in the sweep with FID <= the student's, / 4) = {speed};
  vs the full teacher: {h["nfe_speedup_vs_full_teacher"]:.0f}x fewer evaluations,
  {h["time_speedup_vs_full_teacher"]:.0f}x less wall time per sample.
* Fidelity: the 4-step student's samples are {h["student4_rmse_to_teacher"]:.3f} (RMS, pixels in [-1, 1]) from the
  teacher-{h["teacher_full_steps"]} samples of the same noise; the teacher itself needs
  {h["nfe_speedup_equal_fidelity"] * 4:.0f} NFE to come as close (`nfe_speedup_equal_fidelity` =
  **{h["nfe_speedup_equal_fidelity"]:.3g}x**).

## FID by guidance strength (columns: student steps, stage-1 student, teacher steps)

Students make one network evaluation (NFE) per step; the teacher two (conditional and unconditional), one at
w = 0.

{by_w(rows, "fid")}

## Fidelity: RMS pixel distance to the teacher at {h["teacher_full_steps"]} steps (same noise, labels and w)

Deterministic samplers map the same noise to nearly the same image when the student reproduces its teacher;
this is what distillation optimises, and it cannot be gamed by a change of guidance strength as FID can.
Images are in [-1, 1].

{by_w(rows, "rmse_to_teacher")}

## All rows

{table}

![FID vs NFE](guided_distillation.png)
"""
    write_results(args.name, text, headline)


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    plt = pyplot()

    def points(model: str, w: float, key: str = "nfe", value: str = "fid") -> list[tuple[float, float]]:
        chosen = [r for r in rows if r["model"] == model and r["w"] == w and r["method"] == "ddim"]
        return sorted((r[key], r[value]) for r in chosen)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for w in sorted(set(r["w"] for r in rows)):
        line = axes[0].plot(*zip(*points("student", w)), "o-", label=f"student w={w}")[0]
        color = line.get_color()
        axes[0].plot(*zip(*points("teacher", w)), "s--", color=color, alpha=0.6, label=f"teacher w={w}")
        if stage1 := points(STAGE1, w):
            axes[0].plot(*zip(*stage1), "*", color=color, markersize=10)
    axes[0].set(
        xscale="log",
        xlabel="network evaluations per sample",
        ylabel="FID (feature net)",
        title="distilled student (solid), stage-1 student (star),\nguided DDIM teacher (dashed)",
    )
    axes[0].legend(fontsize=7, ncol=2)
    for n in sorted(set(r["steps"] for r in rows if r["model"] == "student" and r["steps"] <= 16)):
        pts = sorted(
            (r["w"], r["class_accuracy"])
            for r in rows
            if r["model"] == "student" and r["steps"] == n and r["method"] == "ddim"
        )
        axes[1].plot(*zip(*pts), "o-", label=f"student {n} steps")
    full = max(args.teacher_steps)
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
