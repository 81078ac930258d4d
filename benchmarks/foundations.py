"""Foundations zoo: DDPM, iDDPM, NCSN, score SDE (VE/VP/sub-VP), VDM and EDM on one FID / IS / NLL vs NFE table.

Every formulation is one YAML in ``configs/zoo/`` (same UNet, optimiser and budget; only schedule,
parametrisation, loss and sampler differ). For each one this script

1. takes the trained checkpoint ``benchmarks/.cache/zoo_<name>/last.ckpt`` (trained through the CLI with
   ``--train``; otherwise the formulation is skipped and listed as missing),
2. runs ``tools/evaluate.py`` with the formulation's natural samplers at the NFE budgets (``--nfe``; the step
   count that gives each budget depends on the sampler, the NFE column is what was counted), giving FID, IS,
   KID, precision/recall, class accuracy and wall time on the shipped digits feature net,
3. measures the VDM ELBO in bits/dim (``diffusion.likelihood.vdm_elbo``, the same estimator and noise range
   for every model, uniform dequantisation on the data's own grid) on the validation split,

and writes ``benchmarks/results/foundations{.md,.json,.png}`` (FID vs NFE, one line per formulation x sampler).

    python -m benchmarks foundations -- --train                       # all formulations (CPU: hours)
    python -m benchmarks foundations -- --formulations edm --train --max-epochs 2 --nfe 10 --num-samples 200
    # parallel: one process per formulation (--name scratch_<f>), then `--reuse` assembles the table in seconds
    # CIFAR-10 (GPU): train with configs/zoo/cifar10_*.yaml (or configs/diffusion/cifar10_{ddpm,edm}.yaml), then
    python -m benchmarks foundations -- --scale cifar10 --checkpoint-dir runs/zoo --feature-extractor inception \
        --weights pt_inception-2015-12-05-6726825d.pth --num-samples 50000 --data-root /data/cifar10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import CACHE, REPO, train_cached

CONFIGS = REPO / "configs"
FORMULATIONS = ("ddpm", "iddpm", "ncsn", "sde_ve", "sde_vp", "sde_subvp", "vdm", "vdm_learned", "edm")
GPU_CONFIGS = {
    "ddpm": CONFIGS / "diffusion" / "cifar10_ddpm.yaml",
    "edm": CONFIGS / "diffusion" / "cifar10_edm.yaml",
}

# Natural samplers of each formulation: (label, sampler overrides, NFE per step, NFE of the final denoise).
# NFE(steps) = per_step * steps + extra; the grid of each config is kept (only `steps` changes); a sampler
# other than the config's own resets the options (they belong to the config's sampler).
_ODE = ("pf-ode heun", {"method": "heun", "options": {}}, 2, -1)
NATURAL_SAMPLERS: dict[str, list[tuple[str, dict[str, Any], int, int]]] = {
    "ddpm": [
        ("ddpm ancestral", {"method": "ddpm"}, 1, 0),
        ("ddim", {"method": "euler", "options": {}}, 1, 0),
    ],
    "iddpm": [
        ("ddpm ancestral", {"method": "ddpm"}, 1, 0),
        ("ddim", {"method": "euler", "options": {}}, 1, 0),
    ],
    "ncsn": [("annealed langevin", {"method": "annealed_langevin"}, 10, 1), _ODE],
    "sde_ve": [("pc (rd + langevin)", {"method": "pc"}, 2, -1), _ODE],
    "sde_vp": [("reverse sde", {"method": "pc"}, 1, 0), _ODE],
    "sde_subvp": [("reverse sde", {"method": "pc"}, 1, 0), _ODE],
    "vdm": [("ancestral", {"method": "ddpm"}, 1, 0), _ODE],
    "vdm_learned": [("ancestral", {"method": "ddpm"}, 1, 0), _ODE],
    "edm": [("heun", {"method": "heun"}, 2, -1), ("euler", {"method": "euler", "options": {}}, 1, 0)],
}


def steps_for_nfe(nfe: int, per_step: int, extra: int) -> int:
    """Largest step count whose cost ``per_step * steps + extra`` does not exceed ``nfe`` (at least 1)."""
    return max(1, (nfe - extra) // per_step)


def _load_evaluate():
    spec = importlib.util.spec_from_file_location("tools_evaluate", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_path(name: str, scale: str) -> Path:
    if scale == "digits":
        return CONFIGS / "zoo" / f"digits_{name}.yaml"
    return GPU_CONFIGS.get(name, CONFIGS / "zoo" / f"cifar10_{name}.yaml")


def checkpoint_path(name: str, args: argparse.Namespace) -> Path | None:
    if args.checkpoint_dir is not None:
        path = Path(args.checkpoint_dir) / name / "last.ckpt"
        return path if path.is_file() else None
    # a shortened smoke run is cached under its own name so it never stands in for the full training
    cache_name = f"zoo_{name}" + (f"_epochs{args.max_epochs}" if args.max_epochs else "")
    cached = CACHE / cache_name / "last.ckpt"
    if cached.is_file():
        return cached
    if not args.train:
        return None
    overrides = [f"--trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    return train_cached(cache_name, [config_path(name, args.scale)], overrides)


@torch.no_grad()
def elbo_bits_per_dim(model: Any, datamodule: Any, args: argparse.Namespace) -> dict[str, float]:
    """VDM ELBO (bits/dim, dequantised) of the EMA denoiser on up to ``args.nll_samples`` validation images.

    One estimator for all models: ``vdm_elbo`` over the VE range [1e-3, 80] (log-SNR linear in t, uniform
    draws in log-SNR), prior N(0, 80^2 I), Gaussian decoder at sigma = 1e-3."""
    from diffusion_lab.diffusion.likelihood import dequantize, vdm_elbo
    from diffusion_lab.diffusion.schedules import VE

    gen = torch.Generator().manual_seed(args.seed)
    bpds, errs, seen = [], [], 0
    for x0, labels in datamodule.val_dataloader():
        x0 = x0[: args.nll_samples - seen].to(args.device)
        cond = {"labels": labels[: x0.shape[0]].to(args.device)} if model.num_classes else {}
        x = dequantize(x0.double(), args.num_levels, generator=gen).float()
        res = vdm_elbo(
            model.ema.averaged,
            x,
            VE(1e-3, 80.0),
            num_t_samples=args.nll_t_samples,
            generator=gen,
            num_levels=args.num_levels,
            cond=cond,
        )
        bpds.append(res.bpd.double().cpu())
        errs.append(res.diffusion_std_err.double().cpu())
        seen += x0.shape[0]
        if seen >= args.nll_samples:
            break
    bpd = torch.cat(bpds)
    d = math.prod(x0.shape[1:])
    mc_se = float(torch.cat(errs).pow(2).mean().sqrt()) / (d * math.log(2))
    return {
        "bpd": float(bpd.mean()),
        "bpd_se": math.hypot(float(bpd.std()) / math.sqrt(bpd.numel()), mc_se / math.sqrt(bpd.numel())),
    }


@torch.no_grad()
def own_bound_bits_per_dim(name: str, model: Any, datamodule: Any, args: argparse.Namespace) -> float | None:
    """The bound a model's own objective defines, on the undequantised validation images (discrete decoders on
    the data grid): VDM's VLB with its own (fixed or learned) schedule, VP prior N(0, I) and discrete decoder;
    iDDPM's ``L_prior + sum_k L_k`` (``HybridLoss.vlb_bits_per_dim``). None for the other formulations, whose
    losses are weighted denoising losses, not bounds (their column is the common estimator)."""
    from diffusion_lab.diffusion.likelihood import vdm_elbo
    from diffusion_lab.diffusion.schedules import VE

    if name not in ("vdm", "vdm_learned", "iddpm"):
        return None
    gen = torch.Generator().manual_seed(args.seed)
    bpds, seen = [], 0
    for x0, labels in datamodule.val_dataloader():
        x0 = x0[: args.nll_samples - seen].to(args.device)
        cond = {"labels": labels[: x0.shape[0]].to(args.device)} if model.num_classes else {}
        if name == "iddpm":
            bpd = model.loss.vlb_bits_per_dim(model.ema.averaged, x0, generator=gen, **cond)
        else:
            sampler = model.loss.sigma_sampler
            schedule = (
                model.loss.schedule
                if name == "vdm_learned"
                else VE(math.exp(sampler.log_min), math.exp(sampler.log_max))
            )
            bpd = vdm_elbo(
                model.ema.averaged, x0.double(), schedule, num_t_samples=args.nll_t_samples, generator=gen,
                prior_variance="vp", decoder="discrete", num_levels=args.num_levels, cond=cond,
            ).bpd  # fmt: skip
        bpds.append(bpd.double().cpu())
        seen += x0.shape[0]
        if seen >= args.nll_samples:
            break
    return float(torch.cat(bpds).mean())


def evaluate_formulation(name: str, ckpt: Path, evaluate: Any, args: argparse.Namespace) -> list[dict]:
    config = str(config_path(name, args.scale))
    overrides = [f"--data.init_args.root={args.data_root}"] if args.data_root else []
    rows = []
    for index, (label, sampler, per_step, extra) in enumerate(NATURAL_SAMPLERS[name]):
        budgets = [
            n for n in args.nfe if index == 0 or args.secondary_max_nfe is None or n <= args.secondary_max_nfe
        ]
        steps = sorted({steps_for_nfe(n, per_step, extra) for n in budgets})
        out = Path(args.work_dir) / name / label.replace(" ", "_").replace("(", "").replace(")", "")
        argv = [
            "--config", config, "--checkpoint", str(ckpt), "--samplers", json.dumps([sampler]),
            "--steps", *map(str, steps), "--num-samples", str(args.num_samples),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device,
            "--feature-extractor", args.feature_extractor, "--out", str(out), *overrides,
        ]  # fmt: skip
        if args.weights:
            argv += ["--weights", args.weights]
        stamp = {"argv": argv, "checkpoint": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]}
        stamp_file = out / "stamp.json"
        reusable = args.reuse and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
        if not reusable:
            evaluate.main(argv)
            stamp_file.write_text(json.dumps(stamp))
        for row in json.loads((out / "quality_vs_nfe.json").read_text()):
            rows.append(
                {"formulation": name, "sampler": label, **{k: v for k, v in row.items() if k != "sampler"}}
            )
    return rows


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(dict.fromkeys(r["formulation"] for r in rows))
    colours = plt.get_cmap("tab10")
    for key in dict.fromkeys((r["formulation"], r["sampler"]) for r in rows):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if (r["formulation"], r["sampler"]) == key)
        native = [label for label, *_ in NATURAL_SAMPLERS.get(key[0], [])][:1] == [key[1]]
        ax.plot(
            *zip(*pts),
            color=colours(names.index(key[0]) % 10),
            linestyle="-" if native else "--",
            marker="o" if native else "s",
            markersize=4,
            label=f"{key[0]}: {key[1]}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser calls per sample)")
    ax.set_ylabel("FID (digits feature net)")
    ax.set_title("solid: each formulation's native sampler; dashed: its second sampler", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formulations", nargs="+", default=list(FORMULATIONS), choices=FORMULATIONS)
    parser.add_argument("--scale", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 35, 50, 100, 1000])
    parser.add_argument("--train", action="store_true", help="train missing digits checkpoints via the CLI")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' training length")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="<dir>/<formulation>/last.ckpt instead of the cache"
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--secondary-max-nfe",
        type=int,
        default=None,
        help="largest NFE for each formulation's second sampler (the first, native one gets every --nfe)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--nll-samples", type=int, default=179)
    parser.add_argument("--nll-t-samples", type=int, default=16)
    parser.add_argument(
        "--num-levels", type=int, default=None, help="data grid levels (digits 17, CIFAR 256)"
    )
    parser.add_argument(
        "--feature-extractor", default="feature_net", choices=["feature_net", "inception", "timm"]
    )
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", default=str(CACHE / "foundations_eval"))
    parser.add_argument("--name", default="foundations", help="results file name under benchmarks/results/")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a formulation's evaluation from --work-dir when its checkpoint and settings are unchanged "
        "(evaluate formulations in parallel processes, then assemble the table with --reuse)",
    )
    args = parser.parse_args()
    if args.num_levels is None:
        args.num_levels = 17 if args.scale == "digits" else 256

    evaluate = _load_evaluate()
    rows, nll, missing, train_note = [], {}, [], ""
    for name in args.formulations:
        start = time.perf_counter()
        ckpt = checkpoint_path(name, args)
        if ckpt is None:
            missing.append(name)
            continue
        if args.max_epochs:
            train_note = f" (training cut to {args.max_epochs} epochs: smoke run, not comparable numbers)"
        rows += evaluate_formulation(name, ckpt, evaluate, args)
        model, datamodule = evaluate.build_from_config(
            str(config_path(name, args.scale)), str(ckpt), args.device,
            [f"--data.init_args.root={args.data_root}"] if args.data_root else [],
        )  # fmt: skip
        nll[name] = elbo_bits_per_dim(model, datamodule, args)
        nll[name]["own_bound_bpd"] = own_bound_bits_per_dim(name, model, datamodule, args)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s, ELBO {nll[name]['bpd']:.3f} bits/dim")

    table = [
        [
            r["formulation"], r["sampler"], r["steps"], r["nfe"], r.get("fid"), r.get("is_mean"),
            r.get("class_accuracy"), nll[r["formulation"]]["bpd"], _or_dash(nll[r["formulation"]]["own_bound_bpd"]),
            r["seconds"],
        ]
        for r in rows
    ]  # fmt: skip
    md = [
        "# Foundations zoo: FID / IS / class accuracy / ELBO vs NFE",
        "",
        f"Scale: {args.scale}{train_note}; {args.num_samples} samples per row"
        + (
            f" (each formulation's second sampler only up to NFE {args.secondary_max_nfe})"
            if args.secondary_max_nfe
            else ""
        )
        + ", feature extractor "
        f"`{args.feature_extractor}`; ELBO on {args.nll_samples} validation images "
        f"(VDM estimator over sigma in [1e-3, 80], {args.nll_t_samples} stratified draws, dequantised to "
        f"{args.num_levels} levels: one estimator for every model, so models trained on a narrower sigma range pay "
        f"for the rest); 'own bound' is the bound the model's own objective defines (VDM: its schedule's VLB with "
        f"discrete decoder and N(0, I) prior; iDDPM: L_prior + sum L_k), on the same images. Reproduce: "
        f"`python -m benchmarks foundations -- --train`"
        + (
            f" (here: `--num-samples {args.num_samples} --secondary-max-nfe {args.secondary_max_nfe}`)."
            if args.secondary_max_nfe
            else "."
        ),
        "",
        markdown_table(
            [
                "formulation",
                "sampler",
                "steps",
                "NFE",
                "FID",
                "IS",
                "class acc.",
                "ELBO bits/dim",
                "own bound bits/dim",
                "seconds",
            ],  # fmt: skip
            table,
        ),
    ]
    if missing:
        md += ["", f"Not measured (no checkpoint; run with `--train`): {', '.join(missing)}."]
    headline = {
        "scale": args.scale,
        "rows": rows,
        "elbo_bpd": nll,
        "missing": missing,
        "smoke": bool(train_note),
    }
    path = write_results(args.name, "\n".join(md), headline)
    if rows:
        plot(rows, RESULTS_DIR / f"{args.name}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
