"""Splitting samplers for classifier guidance on digits: quality vs NFE and wall time (``-m benchmarks split``).

Wizadwongsa & Suwajanakorn (ICLR 2023) report DDIM-250 quality with 32-58% less time on ImageNet 256. Here: the
trained digits teacher (``benchmarks._models.digits_teacher``; its unconditional branch, labels dropped) guided by
the noise-aware classifier of ``configs/split/digits_classifier.yaml`` (trained once, cached) towards labels
``i % 10``. Samplers (one denoiser evaluation per step): DDIM with guidance, naive PLMS on f + g (AB warm-up),
LTSP, STSP (``paper`` and ``second_order`` schemes). Per (sampler, NFE), from the same initial noise:

* ``fid``: Frechet distance of the shipped digits feature net's features to the training set's (200 samples:
  compare rows with each other, not with FIDs of other sample sizes);
* ``acc``: that independent net's accuracy on the target labels (not the guiding classifier);
* ``rmse_to_ddim250``: RMS distance to the DDIM-250 samples from the same noise (convergence to the guided ODE
  solution, the paper's criterion with LPIPS replaced by RMSE on 8x8 images);
* ``seconds``: wall time of the whole batch (denoiser + classifier gradients).

``time_ratio`` (split.json) = time of the cheapest STSP run whose FID is within ``--fid-tolerance`` of DDIM-250's
and whose accuracy is not lower by more than 1 point, divided by DDIM-250's time (None if no run qualifies).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, pyplot, write_results
from benchmarks._models import REPO, digits_teacher, train_cached
from diffusion_lab.diffusion.guidance import ClassifierGuidance
from diffusion_lab.diffusion.samplers import karras_sigmas, sample
from diffusion_lab.methods.loading import build_from_config, load_module
from diffusion_lab.metrics.distances import frechet_distance
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.reference_stats import compute_reference_stats, reference_loader

CLASSIFIER_CONFIG = REPO / "configs" / "split" / "digits_classifier.yaml"
SAMPLERS = {
    "ddim": ("ddim", {}),
    "plms (naive)": ("plms", {"warmup": "ab"}),
    "ltsp": ("ltsp", {}),
    "stsp (paper)": ("stsp", {"scheme": "paper"}),
    "stsp (second order)": ("stsp", {"scheme": "second_order"}),
}


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--scale", type=float, default=2.0, help="classifier guidance scale s")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--fid-tolerance", type=float, default=1.05, help="matching FID: <= tol * DDIM-250's")
    return parser.parse_args()


def _stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def main() -> None:
    args = _options()
    torch.manual_seed(0)
    teacher = digits_teacher()
    classifier = load_module(CLASSIFIER_CONFIG, train_cached("split_classifier", [CLASSIFIER_CONFIG]))
    classifier.requires_grad_(False)  # guidance needs gradients w.r.t. the input only
    teacher.requires_grad_(False)
    _, datamodule = build_from_config(CLASSIFIER_CONFIG)
    datamodule.setup("fit")
    feature_net = build_feature_extractor("feature_net")
    reference = compute_reference_stats(feature_net, reference_loader(datamodule, "train"), progress=False)
    ref_mean, ref_cov = reference.mean, reference.cov

    n = args.num_samples
    labels = torch.arange(n) % 10
    noise = torch.randn(n, *teacher.data_shape, generator=torch.Generator().manual_seed(0))
    guidance = partial(ClassifierGuidance, classifier=classifier, scale=args.scale)

    def run(method: str, options: dict, nfe: int) -> tuple[torch.Tensor, float]:
        sigmas = karras_sigmas(nfe, 0.002, 80.0, 7.0).float()
        start = time.perf_counter()
        with torch.no_grad():
            out = sample(
                teacher.ema.averaged, noise * sigmas[0], sigmas, method=method, guidance=guidance,
                cond={"labels": labels}, **options,
            )  # fmt: skip
        return out.clamp(-1, 1), time.perf_counter() - start

    target, ddim_seconds = run("ddim", {}, 250)
    rows, results = [], {}

    def evaluate(name: str, nfe: int, samples: torch.Tensor, seconds: float) -> None:
        features, logits = feature_net(samples)
        fid = float(frechet_distance(ref_mean, ref_cov, *_stats(features)))
        acc = float((logits.argmax(1) == labels).float().mean())
        rmse = float((samples - target).pow(2).mean().sqrt())
        results.setdefault(name, []).append(
            {"nfe": nfe, "fid": fid, "acc": acc, "rmse_to_ddim250": rmse, "seconds": seconds}
        )
        rows.append([name, nfe, fid, acc, rmse, seconds, seconds / ddim_seconds])
        print(rows[-1], flush=True)

    evaluate("ddim", 250, target, ddim_seconds)
    for name, (method, options) in SAMPLERS.items():
        for nfe in args.nfe:
            evaluate(name, nfe, *run(method, options, nfe))

    ddim250 = results["ddim"][0]
    headline: dict = {"ddim250": ddim250, "scale": args.scale, "num_samples": n, "results": results}
    for scheme in ("stsp (paper)", "stsp (second order)"):
        matching = [
            r
            for r in results[scheme]
            if r["fid"] <= args.fid_tolerance * ddim250["fid"] and r["acc"] >= ddim250["acc"] - 0.01
        ]
        best = min(matching, key=lambda r: r["seconds"]) if matching else None
        key = "time_ratio" if scheme == "stsp (paper)" else "time_ratio_second_order"
        headline[key] = None if best is None else best["seconds"] / ddim250["seconds"]
        headline[key + "_nfe"] = None if best is None else best["nfe"]

    table = markdown_table(
        ["sampler", "NFE", "FID (feature net)", "accuracy", "RMSE to DDIM-250", "seconds", "time / DDIM-250"],
        rows,
    )
    markdown = f"""# Splitting samplers for classifier guidance (digits)

`python -m benchmarks split` ({n} samples, guidance scale s = {args.scale}, Karras grid on [0.002, 80], labels
i % 10). Base: the digits teacher's unconditional branch; guide: the noise-aware classifier of
`configs/split/digits_classifier.yaml`; quality judged by the shipped digits feature net (independent of the guide).
FID on {n} samples is biased upwards: compare rows with each other.

{table}

**time_ratio** (STSP paper scheme, cheapest run with FID <= {args.fid_tolerance} x DDIM-250's and accuracy within
1 point): {headline["time_ratio"]} at NFE {headline["time_ratio_nfe"]}; second-order scheme:
{headline["time_ratio_second_order"]} at NFE {headline["time_ratio_second_order_nfe"]}. Goal <= 0.5 (paper: 0.42-0.68
on ImageNet 256).
"""
    path = write_results("split", markdown, headline)
    _plot(results)
    print(path.read_text())


def _plot(results: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rs in results.items():
        style = "*" if name == "ddim" and len(rs) == 1 else "o-"
        nfe = [r["nfe"] for r in rs]
        axes[0].plot(nfe, [r["fid"] for r in rs], style, label=name)
        axes[1].plot([r["seconds"] for r in rs], [r["fid"] for r in rs], style, label=name)
        axes[2].plot(nfe, [r["rmse_to_ddim250"] for r in rs], style, label=name)
    axes[0].set(xlabel="NFE", ylabel="FID (feature net)", xscale="log")
    axes[1].set(xlabel="wall time (s)", ylabel="FID (feature net)", xscale="log")
    axes[2].set(xlabel="NFE", ylabel="RMSE to DDIM-250", xscale="log", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "split.png", dpi=120)


if __name__ == "__main__":
    main()
