"""Colourisation with splitting samplers, end to end on real images (``python -m benchmarks split_colorization``).

Wizadwongsa & Suwajanakorn (ICLR 2023, Sec. 6) run conditional tasks with the samplers they use for classifier
guidance. Here: the project's RGB prior (``benchmarks._rgb_prior.rgb_prior``: EDM, 32x32 crops of scikit-image's
colour photographs) colourises the grayscale (BT.601 luma) versions of held-out crops (the strip of each
photograph that training never sees) with the colourisation condition ``L = 1/2 ||luma(D(x)) - y||^2``
(``diffusion.conditions.Colorization``) through :class:`~diffusion_lab.methods.conditional_sampling
.ConditionalSampling` (the predict module; per-image noise seeds ``seed + index``, the same noise for every
sampler). Per (sampler, NFE) on a Karras grid on [0.002, 80] (rho 7; NFE = steps):

* ``luma_rmse``: grayscale-consistency error ``RMS(luma(result) - y)`` on the [-1, 1] scale;
* ``psnr`` / ``ssim`` to the ground-truth colour crops (torchmetrics over the batch, data range 2);
* ``seconds``: wall time of the batch (each guided evaluation is one forward and one backward of the UNet;
  STSP takes two guidance gradients per step, so its NFE counts the UNet passes of ``f`` only).

Baselines: the grayscale input itself (luma error 0), and the unguided sample (scale 0, DDIM). One setting is
also run through the real CLI (``diffusion-lab predict`` with configs/split/colorize_imagefolder.yaml on a folder
of the crops as PNG files) and compared with the in-process result.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import CACHE, REPO, train_cached
from benchmarks._rgb_prior import CONFIG as PRIOR_CONFIG
from benchmarks._rgb_prior import heldout_crops, rgb_prior
from diffusion_lab.diffusion.conditions import Colorization
from diffusion_lab.diffusion.samplers import SamplerConfig
from diffusion_lab.methods.conditional_sampling import ConditionalSampling, prior_denoiser
from diffusion_lab.metrics.restoration import build_restoration_metrics

SAMPLERS = {"ddim": ("ddim", {}), "ltsp": ("ltsp", {}), "stsp": ("stsp", {"scheme": "paper"})}
GRID = {"schedule": "karras", "schedule_kwargs": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}}
CLI_CONFIG = REPO / "configs" / "split" / "colorize_imagefolder.yaml"
QUICK_PRIOR = ("rgb_prior_quick", ["--trainer.max_steps=3"])  # smoke runs only: an untrained prior


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=8, help="held-out crops to colourise")
    parser.add_argument("--scale", type=float, default=2.0, help="guidance scale s")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument(
        "--sweep", type=float, nargs="*", default=[0.5, 8.0], help="other scales (STSP, max NFE)"
    )
    parser.add_argument("--skip-cli", action="store_true", help="do not repeat one setting through the CLI")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: a 3-step prior, 4 images, NFE 4 and 6"
    )
    args = parser.parse_args()
    if args.quick:
        args.num_images, args.nfe, args.grid_images, args.sweep = 4, [4, 6], 4, [8.0]
    return args


def colorizer(
    prior: torch.nn.Module, method: str, options: dict, nfe: int, scale: float
) -> ConditionalSampling:
    """The predict module for one setting (prior already built)."""
    sampler = SamplerConfig(method=method, steps=nfe, options=options, **GRID)
    module = ConditionalSampling(
        task="colorization", prior=prior, sampler=sampler, scale=scale, output_dir=None
    )
    module.setup("predict")
    return module


def evaluate(out: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Luma consistency (RMS, [-1, 1] scale) and PSNR / SSIM to the ground truth."""
    out = out.clamp(-1, 1)
    luma = Colorization()
    metrics = build_restoration_metrics(("psnr", "ssim"), data_range=2.0)(out, truth)
    return {
        "luma_rmse": float((luma.operator(out) - luma.operator(truth)).pow(2).mean().sqrt()),
        "psnr": float(metrics["psnr"]),
        "ssim": float(metrics["ssim"]),
    }


def run_cli(images: torch.Tensor, checkpoint: Path, nfe: int, scale: float) -> torch.Tensor:
    """STSP colourisation of ``images`` through ``diffusion-lab predict`` on a folder of PNGs; the results."""
    from torchvision.utils import save_image

    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "inputs", Path(tmp) / "out"
        folder.mkdir()
        for i, image in enumerate(images):
            save_image((image + 1) / 2, folder / f"{i:03d}.png")
        sampler = f'{{method: stsp, steps: {nfe}, schedule: karras, schedule_kwargs: {GRID["schedule_kwargs"]}, ' \
                  "options: {scheme: paper}}"  # fmt: skip
        args = [sys.executable, "-m", "diffusion_lab.cli", "predict", "--config", str(CLI_CONFIG),
                f"--model.init_args.prior_config={PRIOR_CONFIG}", f"--model.init_args.prior_checkpoint={checkpoint}",
                f"--model.init_args.sampler={sampler}", f"--model.init_args.scale={scale}",
                f"--model.init_args.output_dir={out}", f"--data.init_args.root={folder}",
                f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.enable_progress_bar=false"]  # fmt: skip
        subprocess.run(args, check=True, cwd=REPO, capture_output=True)
        with np.load(out / "results.npz") as saved:
            return torch.from_numpy(saved["results"])


def main() -> None:
    args = _options()
    torch.set_num_threads(1)
    module = rgb_prior(*QUICK_PRIOR) if args.quick else rgb_prior()
    prior = prior_denoiser(module)
    truth = heldout_crops(args.num_images)
    gray = Colorization().bind(truth).degraded()
    labels, index = torch.full((len(truth),), -1), torch.arange(len(truth))

    rows, results, pictures = [], {}, {}
    for name, (method, options) in [("unguided ddim", ("ddim", {}))] + list(SAMPLERS.items()):
        scale = 0.0 if name.startswith("unguided") else args.scale
        for nfe in args.nfe if scale else [max(args.nfe)]:
            module = colorizer(prior, method, options, nfe, scale)
            start = time.perf_counter()
            out, _ = module.restore(truth, labels, index)
            seconds = time.perf_counter() - start
            row = {"sampler": name, "nfe": nfe, **evaluate(out, truth), "seconds": seconds}
            results.setdefault(name, []).append(row)
            rows.append(row)
            pictures[(name, nfe)] = out.clamp(-1, 1)
            print(f"  {name:14s} NFE {nfe:3d}: {row}", flush=True)
    sweep = []
    for scale in sorted({*args.sweep, args.scale}):
        if scale == args.scale:
            row = results["stsp"][-1]
        else:
            module = colorizer(prior, *SAMPLERS["stsp"], max(args.nfe), scale)
            start = time.perf_counter()
            out, _ = module.restore(truth, labels, index)
            row = {"sampler": "stsp", "nfe": max(args.nfe), **evaluate(out, truth),
                   "seconds": time.perf_counter() - start}  # fmt: skip
            print(f"  stsp scale {scale}: {row}", flush=True)
        sweep.append({"scale": scale, **row})
    gray_row = {"sampler": "grayscale input", "nfe": 0, **evaluate(gray, truth), "seconds": 0.0}
    rows.insert(0, gray_row)

    cli = None
    if not args.skip_cli:
        nfe = min(args.nfe)
        start = time.perf_counter()
        name, overrides = QUICK_PRIOR if args.quick else ("rgb_prior", [])
        via_cli = run_cli(truth, train_cached(name, [PRIOR_CONFIG], overrides), nfe, args.scale)
        cli = {
            "nfe": nfe,
            "seconds_including_startup": time.perf_counter() - start,
            "max_abs_difference_to_in_process": float(
                (via_cli.clamp(-1, 1) - pictures[("stsp", nfe)]).abs().max()
            ),
            **evaluate(via_cli, truth),
        }
        print(f"  CLI run: {cli}", flush=True)

    lo, hi = min(args.nfe), max(args.nfe)
    k = min(args.grid_images, len(truth))
    columns = [truth[:k], gray[:k]] + [pictures[(s, n)][:k] for n in (lo, hi) for s in SAMPLERS]
    from diffusion_lab.metrics.sample_grid import save_image_grid

    grid = torch.stack(columns, 1).flatten(0, 1)
    save_image_grid(grid, RESULTS_DIR / "split_colorization.grid.png", len(columns), 3)
    _plot(results)
    samples = sorted((CACHE / ("rgb_prior_quick" if args.quick else "rgb_prior")).rglob("samples.png"))
    if samples:  # the prior's own unguided samples (SampleGrid at the end of its training run)
        shutil.copy(samples[-1], RESULTS_DIR / "split_colorization.prior_samples.png")

    best = {s: max(results[s], key=lambda r: r["psnr"]) for s in SAMPLERS}
    headline = {
        "scale": args.scale,
        "num_images": len(truth),
        "grayscale_input": gray_row,
        "results": results,
        "cli_check": cli,
        "scale_sweep": sweep,
        "best_psnr": {s: {"nfe": r["nfe"], "psnr": r["psnr"]} for s, r in best.items()},
    }
    table = markdown_table(
        ["sampler", "NFE", "luma RMSE", "PSNR (dB)", "SSIM", "seconds"],
        [[r["sampler"], r["nfe"], r["luma_rmse"], r["psnr"], r["ssim"], r["seconds"]] for r in rows],
    )
    sweep_table = markdown_table(
        ["scale s", "luma RMSE", "PSNR (dB)", "SSIM"],
        [[r["scale"], r["luma_rmse"], r["psnr"], r["ssim"]] for r in sweep],
    )
    names = " | ".join(f"{s.upper()} NFE {n}" for n in (lo, hi) for s in SAMPLERS)
    cli_text = "not run (`--skip-cli`)."
    if cli is not None:
        cli_text = (
            f"STSP at NFE {cli['nfe']} through `diffusion-lab predict --config "
            "configs/split/colorize_imagefolder.yaml` (prior config and checkpoint, sampler and input folder given "
            f"on the command line): PSNR {cli['psnr']:.2f} dB, luma RMSE {cli['luma_rmse']:.4f}; largest "
            f"difference to the in-process result {cli['max_abs_difference_to_in_process']:.2e} "
            f"({cli['seconds_including_startup']:.0f} s with start-up)."
        )
    quick = " **Quick smoke run: untrained prior.**" if args.quick else ""
    markdown = f"""# Colourisation with splitting samplers (scikit-image crops){quick}

`python -m benchmarks split_colorization` (docs/split_colorization.md). Prior:
`configs/diffusion/skimage_rgb.yaml` (unconditional EDM UNet, 1.1M parameters, 400 CPU steps at batch 16 on
32x32 crops of scikit-image's colour photographs; a modest prior). Inputs: the luma
`y = 0.299 R + 0.587 G + 0.114 B` of {len(truth)} held-out 32x32 crops (from the strip of each photograph that
training never sees). Guidance `L = 1/2 ||luma(D(x)) - y||^2`, scale s = {args.scale}, Karras grid on
[0.002, 80], the same initial noise for every sampler. Luma RMSE on the [-1, 1] scale; PSNR / SSIM
(torchmetrics, over the batch) to the true colours. Unguided: scale 0 (a free sample of the prior, for scale).

{table}

Guidance scale (STSP, NFE {max(args.nfe)}):

{sweep_table}

Grid (`split_colorization.grid.png`, rows: crops; upscaled 3x): ground truth | grayscale input | {names}.

![grid](split_colorization.grid.png)

![curves](split_colorization.png)

CLI check: {cli_text}

Unguided samples of the prior (Heun, 18 steps; written at the end of its training run), for what it has learnt:

![prior samples](split_colorization.prior_samples.png)
"""
    path = write_results("split_colorization", markdown, headline)
    print(path.read_text())


def _plot(results: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rs in results.items():
        if name.startswith("unguided"):
            continue
        nfe = [r["nfe"] for r in rs]
        axes[0].plot(nfe, [r["luma_rmse"] for r in rs], "o-", label=name)
        axes[1].plot(nfe, [r["psnr"] for r in rs], "o-", label=name)
        axes[2].plot([r["seconds"] for r in rs], [r["psnr"] for r in rs], "o-", label=name)
    axes[0].set(xlabel="NFE", ylabel="luma RMSE ([-1, 1] scale)", xscale="log", yscale="log")
    axes[1].set(xlabel="NFE", ylabel="PSNR to true colours (dB)", xscale="log")
    axes[2].set(xlabel="wall time (s)", ylabel="PSNR (dB)", xscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "split_colorization.png", dpi=110)


if __name__ == "__main__":
    main()
