"""Splitting samplers on the conditional tasks (inpainting, super-resolution) on digits
(``python -m benchmarks split_conditional``).

Wizadwongsa & Suwajanakorn (ICLR 2023, Sec. 6) run their conditional tasks with the same samplers as classifier
guidance. Here: the trained digits teacher (``benchmarks._models.digits_teacher``, its unconditional branch) as
the prior, held-out digits (the val split) as the ground truth, and ``methods.conditional_sampling`` doing the
restoration exactly as ``diffusion-lab predict --config configs/split/{inpaint,superres}_digits.yaml`` does:
loss guidance with ``L = 1/2 ||A(D(x)) - A(truth)||^2`` (``diffusion.conditions``), guidance scale ``--scale``,
Karras grid on [0.002, 80], per-image noise seeds. Tasks: ``inpainting`` (right half unknown) and
``super_resolution`` (2x, 4x4 box-filtered input). Samplers, all from the same noise: DDIM with guidance, naive
PLMS on f + g (AB warm-up), LTSP and STSP (``paper`` scheme); DDIM-250 is the reference. Per (task, sampler, NFE):

* ``consistency``: RMS of ``A(result) - A(truth)`` (observed pixels / low-res image) on [-1, 1];
* ``psnr``: PSNR of the result to the ground truth in dB (peak-to-peak 2: ``10 log10(4 / MSE)``);
* ``acc``: the shipped digits feature net's accuracy on the true labels (does the digit keep its identity);
* ``fid``: Frechet distance of that net's features to the training set's (few samples: compare rows only);
* ``rmse_to_ddim250``: RMS distance to the DDIM-250 result from the same noise (convergence);
* ``seconds``: CPU time of the whole batch (process time, one thread: unlike wall time it does not depend on
  other jobs sharing the machine).

NFE counts denoiser evaluations, as in ``benchmarks/split.py``; STSP also costs two and LTSP one loss gradient per
step (a backward through the denoiser), DDIM and naive PLMS one (their guided denoiser), so compare timings too.
``time_ratio`` (per task, in the .json): the CPU time of the cheapest STSP run whose consistency is within
``--tolerance`` of DDIM-250's and whose PSNR is not lower by more than 0.1 dB, divided by DDIM-250's time (None
if no run qualifies); ``time_ratio_ddim`` the same for DDIM with fewer steps.

Colourisation needs an RGB prior (``benchmarks/_rgb_prior.py``): its row is a labelled hook pointing to
``benchmarks/split_colorization.py``, which measures it on that prior.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import QUICKSTART, digits_teacher
from diffusion_lab.diffusion.conditions import ConsistencyLoss
from diffusion_lab.diffusion.samplers import SamplerConfig
from diffusion_lab.methods.conditional_sampling import ConditionalSampling, prior_denoiser
from diffusion_lab.methods.loading import build_from_config
from diffusion_lab.metrics.distances import frechet_distance
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.reference_stats import compute_reference_stats, reference_loader

GRID = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
TASKS = {
    "inpainting": {"mask_box": (0.0, 0.5, 1.0, 0.5)},  # right half unknown
    "super_resolution": {"factor": 2},
}
COLOURISATION_HOOK = "colourisation: needs an RGB prior (benchmarks/_rgb_prior.py)"
SAMPLERS = {
    "ddim": ("ddim", {}),
    "plms (naive)": ("plms", {"warmup": "ab"}),
    "ltsp": ("ltsp", {}),
    "stsp": ("stsp", {"scheme": "paper"}),
}
REFERENCE_NFE = 250


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=48, help="held-out digits restored per run")
    parser.add_argument("--scale", type=float, default=10.0, help="guidance scale s (the digits configs')")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument(
        "--tolerance", type=float, default=1.05, help="matching consistency: <= tol * DDIM-250's"
    )
    parser.add_argument("--examples", type=int, default=4, help="rows of the example grid per task")
    return parser.parse_args()


def _stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def psnr(result: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR in dB of images on [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = float((result.clamp(-1, 1) - truth).pow(2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def consistency(loss: ConsistencyLoss, images: torch.Tensor) -> float:
    """RMS of ``A(images) - y`` over the measured values (the known pixels for inpainting)."""
    residual = loss.operator(images) - loss.measurement
    mask = getattr(loss, "mask", None)
    count = float(mask.expand_as(residual).sum()) if mask is not None else residual.numel()
    return math.sqrt(float(residual.pow(2).sum()) / count)


def _restore(
    prior: torch.nn.Module,
    task: str,
    task_options: dict,
    scale: float,
    truth: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    options: dict,
    nfe: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(result, degraded input as shown, CPU seconds): ``ConditionalSampling.restore`` with the given sampler."""
    module = ConditionalSampling(
        task=task,
        prior=prior,
        scale=scale,
        output_dir=None,
        **task_options,
        sampler=SamplerConfig(method=method, steps=nfe, schedule_kwargs=GRID, options=options),
    )
    module.setup("predict")
    start = time.process_time()  # CPU time: robust to other jobs on a shared machine (1 thread)
    out, shown = module.restore(truth, labels, torch.arange(len(truth)))
    return out, shown, time.process_time() - start


def _run_task(
    task: str,
    task_options: dict,
    prior: torch.nn.Module,
    truth: torch.Tensor,
    labels: torch.Tensor,
    quality: Callable[[torch.Tensor], tuple[float, float]],
    args: argparse.Namespace,
) -> tuple[dict[str, list[dict]], list[list[object]], dict[str, torch.Tensor]]:
    """Every sampler and NFE on one task: (records per sampler, table rows, example images per column)."""
    rows: list[list[object]] = []
    run = partial(_restore, prior, task, task_options, args.scale, truth, labels)
    loss = ConditionalSampling(task=task, prior=prior, output_dir=None, **task_options).condition(truth)
    target, degraded, ref_seconds = run("ddim", {}, REFERENCE_NFE)
    shown = {"truth": truth, "input": degraded, f"ddim-{REFERENCE_NFE}": target}
    per_task: dict[str, list[dict]] = {}

    def evaluate(name: str, nfe: int, out: torch.Tensor, seconds: float) -> None:
        fid, acc = quality(out)
        record = {
            "nfe": nfe, "consistency": consistency(loss, out), "psnr": psnr(out, truth), "acc": acc,
            "fid": fid, "rmse_to_ddim250": float((out - target).pow(2).mean().sqrt()), "seconds": seconds,
        }  # fmt: skip
        per_task.setdefault(name, []).append(record)
        rows.append([task, name, nfe, *list(record.values())[1:], seconds / ref_seconds])
        print(rows[-1], flush=True)

    evaluate("ddim", REFERENCE_NFE, target, ref_seconds)
    for name, (method, options) in SAMPLERS.items():
        for nfe in args.nfe:
            out, _, seconds = run(method, options, nfe)
            evaluate(name, nfe, out, seconds)
            if nfe == 20:
                shown[f"{name}-20"] = out
    rows.append([task, "input (degraded, shown)", 0, consistency(loss, degraded), psnr(degraded, truth),
                 *quality(degraded)[::-1], "", "", ""])  # fmt: skip
    return per_task, rows, shown


def main() -> None:
    args = _options()
    torch.manual_seed(0)
    prior = prior_denoiser(digits_teacher())
    _, datamodule = build_from_config(QUICKSTART)
    datamodule.setup("fit")
    n = min(args.num_images, len(datamodule.val_set))
    truth = torch.stack([datamodule.val_set[i][0] for i in range(n)])
    labels = torch.stack([torch.as_tensor(datamodule.val_set[i][1]) for i in range(n)])
    feature_net = build_feature_extractor("feature_net")
    reference = compute_reference_stats(feature_net, reference_loader(datamodule, "train"), progress=False)

    def quality(samples: torch.Tensor) -> tuple[float, float]:
        features, logits = feature_net(samples.clamp(-1, 1))
        fid = float(frechet_distance(reference.mean, reference.cov, *_stats(features)))
        return fid, float((logits.argmax(1) == labels).float().mean())

    truth_fid, truth_acc = quality(truth)
    results: dict = {}
    rows: list[list[object]] = []
    examples: dict[str, dict[str, torch.Tensor]] = {}
    for task, task_options in TASKS.items():
        per_task, task_rows, shown = _run_task(task, task_options, prior, truth, labels, quality, args)
        rows += task_rows
        results[task] = per_task | {"headline": _time_ratios(per_task, args.tolerance)}
        examples[task] = {k: v[: args.examples] for k, v in shown.items()}

    table = markdown_table(
        ["task", "sampler", "NFE", "consistency RMSE", "PSNR (dB)", "accuracy", "FID (feature net)",
         "RMSE to DDIM-250", "CPU seconds", "time / DDIM-250"],
        rows,
    )  # fmt: skip
    headline = {
        "num_images": n, "scale": args.scale, "nfe": args.nfe, "tolerance": args.tolerance,
        "ground_truth": {"fid": truth_fid, "acc": truth_acc}, "results": results,
        "colourisation": COLOURISATION_HOOK,
    }  # fmt: skip
    ratios = "\n".join(
        f"* {task}: STSP {_ratio(r['time_ratio'])} (NFE {r['time_ratio_nfe']}); DDIM "
        f"{_ratio(r['time_ratio_ddim'])} (NFE {r['time_ratio_ddim_nfe']})"
        for task, r in ((t, results[t]["headline"]) for t in TASKS)
    )
    markdown = f"""# Splitting samplers on conditional tasks (digits)

`python -m benchmarks split_conditional` ({n} held-out digits, guidance scale s = {args.scale}, Karras grid on
[0.002, 80]; prior: the digits teacher's unconditional branch; the restoration code of
`configs/split/{{inpaint,superres}}_digits.yaml`). Inpainting: right half unknown; super-resolution: 2x from 4x4
box averages. Consistency: RMS of `A(result) - A(truth)` on [-1, 1]; PSNR to the ground truth; accuracy and FID
from the shipped digits feature net (ground truth itself: FID {truth_fid:.3g}, accuracy {truth_acc:.3g} on these
{n} images; FID on {n} samples is biased upwards, compare rows only). The `input` rows score the degraded input
as shown (hole = 0 / nearest-upsampled low-res image).

{table}

**CPU time to match DDIM-{REFERENCE_NFE}** (cheapest run with consistency <= {args.tolerance} x DDIM-{REFERENCE_NFE}'s
and PSNR within 0.1 dB; time / DDIM-{REFERENCE_NFE}'s time):
{ratios}

**{COLOURISATION_HOOK}**: not measured here (digits are grayscale); with that prior it is measured by
`python -m benchmarks split_colorization` (`benchmarks/results/split_colorization.md`).

![consistency and PSNR vs NFE, examples](split_conditional.png)
"""
    path = write_results("split_conditional", markdown, headline)
    _plot(results, examples)
    print(path.read_text())


def _ratio(value: float | None) -> str:
    return "none matches" if value is None else f"{value:.3f}"


def _time_ratios(per_task: dict[str, list[dict]], tolerance: float) -> dict:
    """Cheapest STSP / DDIM run matching DDIM-250's consistency (within ``tolerance``) and PSNR (-0.1 dB)."""
    reference = per_task["ddim"][0]
    out: dict = {"ddim250": reference}
    for name, key in (("stsp", "time_ratio"), ("ddim", "time_ratio_ddim")):
        matching = [
            r
            for r in per_task[name]
            if r["nfe"] < REFERENCE_NFE
            and r["consistency"] <= tolerance * reference["consistency"]
            and r["psnr"] >= reference["psnr"] - 0.1
        ]
        best = min(matching, key=lambda r: r["seconds"]) if matching else None
        out[key] = None if best is None else best["seconds"] / reference["seconds"]
        out[key + "_nfe"] = None if best is None else best["nfe"]
    return out


def _plot(results: dict, examples: dict[str, dict[str, torch.Tensor]]) -> None:
    plt = pyplot()
    tasks = list(examples)
    fig = plt.figure(figsize=(14, 8.5))
    grid = fig.add_gridspec(2, 2 * len(tasks), height_ratios=[1, 1.25])
    for t, task in enumerate(tasks):
        for m, (metric, label) in enumerate(
            (("consistency", "consistency RMSE"), ("psnr", "PSNR to truth (dB)"))
        ):
            ax = fig.add_subplot(grid[0, 2 * t + m])
            for name, records in results[task].items():
                if name == "headline":
                    continue
                sweep = [r for r in records if r["nfe"] != REFERENCE_NFE or name != "ddim"]
                ax.plot([r["nfe"] for r in sweep], [r[metric] for r in sweep], "o-", label=name)
            ref = results[task]["ddim"][0][metric]
            ax.axhline(ref, color="k", ls="--", lw=0.8, label=f"ddim-{REFERENCE_NFE}")
            ax.set(xlabel="NFE", ylabel=label, xscale="log", title=task.replace("_", "-"))
            nfes = sorted({r["nfe"] for r in results[task]["stsp"]})
            ax.set_xticks(nfes, [str(v) for v in nfes])
            ax.minorticks_off()
            if metric == "consistency":
                ax.set_yscale("log")
            if t == 0 and m == 0:
                ax.legend(fontsize=7)
        shown = examples[task]
        columns = list(shown)
        rows = [torch.cat([shown[c][i, 0] for c in columns], -1) for i in range(len(shown["truth"]))]
        image = (torch.cat(rows, -2).clamp(-1, 1) + 1) / 2
        ax = fig.add_subplot(grid[1, 2 * t : 2 * t + 2])
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        width = shown["truth"].shape[-1]
        ax.set_xticks([width * (i + 0.5) for i in range(len(columns))], columns, rotation=30, fontsize=7)
        ax.set_yticks([])
        ax.set_title(f"{task.replace('_', '-')} examples", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "split_conditional.png", dpi=110)


if __name__ == "__main__":
    main()
