"""Stable Target Field on digits: target variance vs sigma, FID vs training step (DSM vs STF), step cost.

    OMP_NUM_THREADS=1 python -m benchmarks stf                  (~17 min on a busy 2-core machine)
    OMP_NUM_THREADS=1 python -m benchmarks stf -- --quick       (a smoke run of every part, ~1 min)
    python -m benchmarks stf -- --cifar10 ROOT                  (adds the CIFAR-10 variance curves; GPU)

1. Variance (Xu et al. 2023, Fig. 1): average trace of the conditional covariance of the x0-space training
   target given the noisy input, DSM vs STF with reference batches n in {16, 256, 1797 (= all digits)}, over a
   sigma grid (``diffusion.stf.target_covariance_trace``: exact for DSM, Monte Carlo for STF).
2. Convergence: the same small class-conditional UNet, seed, data order and budget trained with the plain EDM
   DSM loss and with ``StableTargetLoss`` (n = 1024, class-restricted references); FID of 500 samples
   (Heun, 18 steps = 35 NFE, fixed noise) against the digits training split, on the shipped digits feature net
   (``metrics.factory.build_fid``), at several steps.
3. Cost: wall time of one training step (loss + backward + Adam) of the quickstart UNet at batch 128 with STF
   n in {256, 1024, 4096} relative to DSM, the variants interleaved in every repeat; ratios of medians.

Writes benchmarks/results/stf.md, stf.json (``step_cost_ratio`` per n, FIDs, variance table) and stf.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from tqdm.auto import tqdm

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from diffusion_lab.data.digits import Digits, load_digits_tensors
from diffusion_lab.diffusion.losses import DenoisingLoss, LogNormalSigma
from diffusion_lab.diffusion.stf import target_covariance_trace
from diffusion_lab.diffusion.stf_loss import StableTargetLoss
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.lr_schedules import WarmupCosine
from diffusion_lab.methods.sampling import GuidedSamplerConfig
from diffusion_lab.metrics.factory import build_fid
from diffusion_lab.nets.unet import UNet

SIGMA_DATA = 0.6  # the quickstart's
REFERENCE_SIZES = (16, 256, 1797)
COST_SIZES = (256, 1024, 4096)
CIFAR10_REFERENCE_SIZES = (16, 256, 1024, 4096)
CIFAR10_SIGMAS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 80.0]
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
SMALL_UNET = dict(
    base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], mid_attention=False,
    dropout=0.1, norm_groups=8,
)  # fmt: skip


def _loss(kind: str, reference_size: int = 1024) -> DenoisingLoss:
    """The quickstart's EDM loss, with the DSM target or the stable target (everything else equal)."""
    common = dict(sigma_sampler=LogNormalSigma(-1.2, 1.2), weighting="edm", sigma_data=SIGMA_DATA)
    if kind == "dsm":
        return DenoisingLoss(**common)
    return StableTargetLoss(reference_size=reference_size, **common)


# ------------------------------------------------------------------------------------------ 1. variance
def variance_curves(
    sigmas: list[float],
    num_points: int,
    num_draws: int,
    images: torch.Tensor | None = None,
    sizes: tuple[int, ...] = REFERENCE_SIZES,
) -> dict[str, list[float]]:
    """DSM and STF(n) covariance traces over ``sigmas`` on ``images`` (default: all 1,797 digits)."""
    images = load_digits_tensors()[0] if images is None else images
    curves: dict[str, list[float]] = {"dsm": []} | {f"stf_{n}": [] for n in sizes}
    for i, sigma in enumerate(tqdm(sigmas, desc="variance")):
        for n in sizes:
            g = torch.Generator().manual_seed(i)  # same noisy points for every n
            dsm, stf = target_covariance_trace(
                images, sigma, n, num_points=num_points, num_draws=num_draws, generator=g
            )
            curves[f"stf_{n}"].append(stf)
        curves["dsm"].append(dsm)
    return curves


def cifar10_variance(
    root: str, sigmas: list[float], num_points: int, num_draws: int
) -> dict[str, list[float]]:
    """The same curves on the 50,000 CIFAR-10 training images (on the GPU when there is one)."""
    from diffusion_lab.data.cifar10 import CIFAR10

    data = CIFAR10(root=root, download=False, random_flip=False)
    data.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = data.train_set.images.to(device).float() / 127.5 - 1
    return variance_curves(sigmas, num_points, num_draws, images, CIFAR10_REFERENCE_SIZES)


# ------------------------------------------------------------------------------------------ 2. convergence
class FIDProbe(L.Callback):
    """FID of ``num_samples`` EMA samples (fixed noise and labels) at the given global steps."""

    def __init__(self, steps: list[int], num_samples: int, real: torch.Tensor) -> None:
        self.steps, self.num_samples = set(steps), num_samples
        self.fid = build_fid("feature_net", reset_real_features=False)
        self.fid.update(real, real=True)
        g = torch.Generator().manual_seed(2024)
        self.labels = torch.arange(num_samples) % 10
        self.noise = torch.randn(num_samples, 1, 8, 8, generator=g)
        self.history: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.history:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            samples = pl_module.generate(self.num_samples, labels=self.labels, unit_noise=self.noise)
        pl_module.train(was_training)
        self.fid.reset()
        self.fid.update(samples.clamp(-1, 1), real=False)
        self.history[step] = float(self.fid.compute())
        tqdm.write(f"  step {step}: FID {self.history[step]:.3f}")


def train_run(
    kind: str, steps: int, eval_steps: list[int], num_samples: int, seed: int
) -> tuple[dict, float]:
    """Train the small UNet with one loss; returns ({step: FID}, seconds of training + evaluation)."""
    L.seed_everything(seed, verbose=False)
    data = Digits(batch_size=128, val_fraction=0.1, seed=0)
    data.setup("fit")
    model = DiffusionModule(
        UNet(in_channels=1, resolution=8, num_classes=10, **SMALL_UNET),
        loss=_loss(kind),
        sigma_data=SIGMA_DATA,
        num_classes=10,
        label_dropout=0.1,
        ema_decay=0.995,
        sampler=GuidedSamplerConfig(
            method="heun",
            steps=18,
            schedule="karras",
            schedule_kwargs={"sigma_min": 0.002, "sigma_max": 80.0},
        ),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
        lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=100, total_steps=steps, final_lr_fraction=0.05),
    )
    model.data_shape = (1, 8, 8)
    probe = FIDProbe(eval_steps, num_samples, data.train_set.images)
    start = time.perf_counter()
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[probe], enable_progress_bar=False,
    ).fit(model, datamodule=data)  # fmt: skip
    return probe.history, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ 3. cost
def step_cost(repeats: int, steps_per_repeat: int) -> dict[str, Any]:
    """Median seconds per training step for DSM and STF(n), variants interleaved inside every repeat."""
    images, labels = load_digits_tensors()
    pool, pool_labels = images.repeat(3, 1, 1, 1), labels.repeat(3)  # 5,391 images: room for n = 4096
    torch.manual_seed(0)
    quickstart_unet = yaml.safe_load(QUICKSTART.read_text())["model"]["init_args"]["network"]["init_args"]
    network = UNet(in_channels=1, resolution=8, num_classes=10, **quickstart_unet)
    variants: dict[str, DenoisingLoss] = {"dsm": _loss("dsm")}
    for n in COST_SIZES:
        variants[f"stf_{n}"] = loss = _loss("stf", n)
        loss.set_reference_pool(pool, pool_labels, num_classes=10)
    model = DiffusionModule(network, sigma_data=SIGMA_DATA, num_classes=10)
    optimizer = torch.optim.Adam(model.denoiser.parameters(), lr=1e-4)
    x0, y = images[:128], labels[:128]

    def step(loss: DenoisingLoss) -> None:
        value = loss(model.denoiser, x0, labels=y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    sigma = torch.exp(-1.2 + 1.2 * torch.randn(128))
    x_noisy = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    target_times: dict[str, list[float]] = {k: [] for k in variants}
    for loss in variants.values():  # warm-up
        step(loss)
    for _ in tqdm(range(repeats), desc="step cost"):
        for name, loss in variants.items():
            start = time.perf_counter()
            for _ in range(steps_per_repeat):
                step(loss)
            times[name].append((time.perf_counter() - start) / steps_per_repeat)
            start = time.perf_counter()
            for _ in range(10):
                loss.target(x0, x_noisy, sigma, labels=y)
            target_times[name].append((time.perf_counter() - start) / 10)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds": median,
        "target_seconds": {k: statistics.median(v) for k, v in target_times.items()},
        "ratio": {k: median[k] / median["dsm"] for k in variants},
    }


# ------------------------------------------------------------------------------------------ report
def _variance_panel(ax: Any, sigmas: list[float], curves: dict, name: str) -> None:
    floor = 1e-4 * max(curves["dsm"])  # log axis: smaller values (down to exact zeros) are drawn at the floor
    ax.plot(sigmas, curves["dsm"], "k-o", ms=3, label="DSM")
    for n in sorted(int(k[4:]) for k in curves if k.startswith("stf_")):
        values = curves[f"stf_{n}"]
        label = f"STF n={n}" + (" (~0, at the floor)" if max(values) < floor else "")
        ax.plot(sigmas, [max(v, floor) for v in values], "-o", ms=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel="sigma", ylabel="avg tr Cov[target | y] (x0 space)")
    ax.set_ylim(bottom=floor / 2)
    ax.set_title(f"Target variance on {name} (Xu et al. 2023, Fig. 1)")
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.1))


def plot(
    sigmas: list[float],
    curves: dict,
    fid: dict[str, dict[int, float]],
    path: str,
    cifar: dict | None = None,
) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3 if cifar else 2, figsize=(16.5 if cifar else 11, 4))
    ax1, ax2 = axes[0], axes[-1]
    _variance_panel(ax1, sigmas, curves, "digits")
    if cifar:
        _variance_panel(axes[1], CIFAR10_SIGMAS, cifar, "CIFAR-10")
    for kind, style in (("dsm", "k-o"), ("stf", "C1-o")):
        steps = sorted(fid[kind])
        ax2.plot(steps, [fid[kind][s] for s in steps], style, ms=3, label=kind.upper())
    ax2.set(xlabel="training step", ylabel="FID (digits feature net)", yscale="log")
    ax2.set_title("Convergence, same seed and budget")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stf")
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets")
    parser.add_argument(
        "--cifar10", metavar="ROOT", help="also the variance curves on CIFAR-10 under ROOT (GPU recommended)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    sigmas = [0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]
    num_points, num_draws = (16, 8) if quick else (128, 64)
    steps = 60 if quick else 600
    eval_steps = [30, 60] if quick else [150, 300, 600]
    seeds = (0,) if quick else (0, 1)
    num_samples = 100 if quick else 500
    repeats, per_repeat = (2, 1) if quick else (7, 3)

    curves = variance_curves(sigmas, num_points, num_draws)
    cifar = cifar10_variance(args.cifar10, CIFAR10_SIGMAS, num_points, num_draws) if args.cifar10 else None
    fid: dict[str, dict[int, float]] = {}
    runs: dict[str, list[dict[int, float]]] = {"dsm": [], "stf": []}
    train_seconds = {"dsm": 0.0, "stf": 0.0}
    for seed in seeds:
        for kind in ("dsm", "stf"):
            tqdm.write(f"convergence run: {kind}, seed {seed}")
            history, seconds = train_run(kind, steps, eval_steps, num_samples, seed=seed)
            runs[kind].append(history)
            train_seconds[kind] += seconds / len(seeds)
    for kind, histories in runs.items():
        fid[kind] = {s: statistics.mean(h[s] for h in histories) for s in eval_steps}
    cost = step_cost(repeats, per_repeat)

    plot(sigmas, curves, fid, str(RESULTS_DIR / "stf.png"), cifar)
    var_rows = [
        [s, curves["dsm"][i], *[curves[f"stf_{n}"][i] for n in REFERENCE_SIZES],
         *[curves["dsm"][i] / max(curves[f"stf_{n}"][i], 1e-30) for n in REFERENCE_SIZES[:2]]]
        for i, s in enumerate(sigmas)
    ]  # fmt: skip
    var_header = ["sigma", "DSM", *[f"STF n={n}" for n in REFERENCE_SIZES], "DSM/STF n=16", "DSM/STF n=256"]
    fid_rows = [
        [s, *[runs["dsm"][i][s] for i in range(len(seeds))], *[runs["stf"][i][s] for i in range(len(seeds))],
         fid["stf"][s] / fid["dsm"][s]]
        for s in eval_steps
    ]  # fmt: skip
    fid_header = ["step", *[f"FID DSM seed {i}" for i in seeds], *[f"FID STF seed {i}" for i in seeds]]
    cost_rows = [
        [k, cost["seconds"][k] * 1e3, cost["ratio"][k], cost["target_seconds"][k] * 1e3]
        for k in cost["seconds"]
    ]
    options = (["--quick"] if quick else []) + (["--cifar10 ROOT"] if cifar else [])
    command = "OMP_NUM_THREADS=1 python -m benchmarks stf" + (" -- " + " ".join(options) if options else "")
    if cifar:
        rows = [[s, *[cifar[k][i] for k in cifar]] for i, s in enumerate(CIFAR10_SIGMAS)]
        header = ["sigma", "DSM", *[f"STF n={k[4:]}" for k in cifar if k != "dsm"]]
        cifar_section = f"""## 1b. Target variance vs sigma on CIFAR-10
The same estimator on the 50,000 CIFAR-10 training images in [-1, 1] (D = 3072), {num_points} noisy points,
{num_draws} draws.

{markdown_table(header, rows)}

"""
        not_run = (
            "Not run here: EDM + STF training on CIFAR-10 (`configs/stf/cifar10_edm.yaml`) needs 8 GPUs."
        )
    else:
        cifar_section = ""
        not_run = (
            "Not run here: the CIFAR-10 variance figure and EDM + STF training (`configs/stf/cifar10_edm.yaml`)"
            " need the\nCIFAR-10 files and a GPU."
        )
    markdown = f"""# Stable Target Field (Xu et al., ICLR 2023) on digits

Reproduce: `{command}` ({"CPU; CIFAR-10 curves on a GPU" if cifar else "CPU"}). ![plots](stf.png)

## 1. Target variance vs sigma (the paper's Fig. 1 on digits)
Average over {num_points} noisy points `y = x + sigma eps` of the trace of the covariance of the x0-space target
given `y`: DSM exact (posterior of the 1,797 digits), STF by Monte Carlo over {num_draws} draws of the generating
point and of the other `n - 1` references (`diffusion.stf.target_covariance_trace`). n = 1797 is the whole data
set, i.e. the ideal denoiser (zero variance). Score-space values are these / sigma^4 (same ratios).

{markdown_table(var_header, var_rows)}

{cifar_section}## 2. Convergence: FID vs training step, DSM vs STF
Small class-conditional UNet (16 channels, mult 1-2, 1 res block, no attention), EDM preconditioning and loss,
batch 128, AdamW 2e-3 with 100 warm-up steps and cosine decay over {steps} steps, EMA 0.995, label dropout 0.1,
seeds {", ".join(map(str, seeds))} for both losses (same initial weights and data order per seed); STF n = 1024
(the batch's 128 + 896 drawn from the 1,617 training digits, class-restricted).
FID: {num_samples} EMA samples (50 per class at full budget, Heun 18 steps = 35 NFE, guidance w = 0, the same noise
at every evaluation) vs the training split, on the shipped digits feature net. Budget per run: {steps} steps;
mean wall time per run DSM {train_seconds["dsm"]:.0f} s, STF {train_seconds["stf"]:.0f} s (training + FID
evaluations, on a shared machine).

{markdown_table([*fid_header, "STF/DSM (seed mean)"], fid_rows)}

## 3. Cost per training step (quickstart UNet, batch 128)
Loss + backward + Adam step; the variants are interleaved in each of {repeats} repeats of {per_repeat} steps;
medians. The pool for n = 4096 is the 1,797 digits tiled 3x (the cost does not depend on the images).

{markdown_table(["loss", "ms / step", "ratio to DSM", "ms in the target alone"], cost_rows)}

{not_run}
"""
    headline = {
        "step_cost_ratio": {str(n): cost["ratio"][f"stf_{n}"] for n in COST_SIZES},
        "step_seconds": cost["seconds"],
        "fid_seed_mean": {k: {str(s): v for s, v in h.items()} for k, h in fid.items()},
        "fid_runs": {k: [{str(s): v for s, v in h.items()} for h in hs] for k, hs in runs.items()},
        "final_fid": {k: h[max(h)] for k, h in fid.items()},
        "variance": {"sigma": sigmas, **curves},
        **({"variance_cifar10": {"sigma": CIFAR10_SIGMAS, **cifar}} if cifar else {}),
        "budget": {"steps": steps, "num_samples": num_samples, "seeds": list(seeds), "quick": quick},
    }
    print(write_results("stf", markdown, headline))


if __name__ == "__main__":
    main()
