"""Cost of the sample-quality metrics on CPU: feature-extraction throughput and one validation evaluation
relative to one training epoch of the quickstart (digits, class-conditional EDM UNet).

    OMP_NUM_THREADS=1 python -m benchmarks metrics

Measured side by side in one run:

* images/s of the feature extractors: the shipped digits feature net (8x8) and the FID InceptionV3
  (torch-fidelity architecture, random weights: the real file cannot be downloaded here and the compute does
  not depend on the values) on 32x32 RGB inputs, which it resizes to 299x299;
* one validation evaluation of the ``SampleQuality`` callback as configured in ``configs/metrics/digits_fid.yaml``
  (its ``num_samples``, sampler and KID subset size, read from the YAML), split into the metric pipeline (load the
  cached reference statistics, feature net, FID + KID + IS + precision/recall + class accuracy: the cost this
  code adds) and the generation of the samples (the sampler's cost, set by num_samples x NFE in YAML; measured
  on 50 samples of the quickstart model, NFE counted, scaled linearly);
* FID alone at Inception's 2048-d (3000 reference features, square root cached as in validation);
* the exact fast FID / KID of ``distances.py`` against torchmetrics' own ``compute`` on the same features
  (FID at 512-d: torchmetrics at 2048-d takes minutes on one core; KID with 100 subsets of 1000);
* one quickstart training epoch (``configs/quickstart.yaml``, second epoch of two, no validation).

``fid_cost_per_epoch`` = metric pipeline seconds / training-epoch seconds (goal <= 0.10);
``evaluation_cost_per_epoch_amortised`` = (generation + pipeline) / epoch / ``check_val_every_n_epoch``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks._common import RESULTS_DIR, machine_info, markdown_table, pyplot, timeit, write_results
from diffusion_lab.metrics.distances import frechet_distance, kernel_inception_distance
from diffusion_lab.metrics.factory import QualityConfig, build_fid, build_kid, quality_from_features
from diffusion_lab.metrics.features import InceptionExtractor, PassThroughExtractor, build_feature_extractor
from diffusion_lab.metrics.quality_vs_nfe import find_denoiser
from diffusion_lab.metrics.reference_stats import ReferenceStats, compute_reference_stats, reference_loader
from diffusion_lab.pretrained.inception import FIDInceptionV3

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "metrics" / "digits_fid.yaml"


def _throughput(fn, batch: int, repeats: int) -> float:
    return batch / timeit(fn, repeats=repeats, warmup=1)


def _quickstart():
    sys.path.insert(0, str(REPO / "tools"))
    from evaluate import build_from_config  # tools/evaluate.py: model + data from the training YAML

    return build_from_config(str(REPO / "configs" / "quickstart.yaml"), None, "cpu")


def _epoch_seconds(model, datamodule) -> float:
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    model.train()  # build_from_config returns it in eval mode, for sampling
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.seconds[-1]


def _callback_settings() -> tuple[dict, int]:
    """SampleQuality init_args of configs/metrics/digits_fid.yaml and its validation interval (epochs)."""
    config = yaml.safe_load(CONFIG.read_text())
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".SampleQuality")]
    return callback["init_args"], int(config["trainer"]["check_val_every_n_epoch"])


def _generation_seconds(model, sampler: dict, num_samples: int, measured: int = 50) -> tuple[float, int]:
    """(seconds to generate ``num_samples`` class-conditional samples, measured NFE per sample) from ``measured``."""
    denoiser = find_denoiser(model)
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        start = time.perf_counter()
        model.generate(
            measured,
            labels=torch.arange(measured) % 10,
            generator=torch.Generator().manual_seed(0),
            sampler=sampler,
        )
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return seconds * num_samples / measured, len(calls)


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, value) of one call, after seeding the global generator (KID draws its subsets from it)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def _features(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2000 real and 1000 fake correlated Gaussian features (the fake ones scaled and shifted)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    real = torch.randn(2000, dim, generator=g) @ mix
    return real, torch.randn(1000, dim, generator=g) @ mix * 1.1 + 0.1


def _exact_forms_vs_torchmetrics(fid_dim: int = 512, kid_dim: int = 64) -> list[list]:
    """Seconds and relative value difference of torchmetrics' FID / KID compute vs ``distances.py``."""
    real, fake = _features(fid_dim, 0)
    fid = build_fid(PassThroughExtractor(fid_dim))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    slow_fid = _timed(fid.compute)
    moments = [(x.double().mean(0), torch.cov(x.double().T)) for x in (real, fake)]
    fast_fid = _timed(frechet_distance, *moments[0], *moments[1])

    real, fake = _features(kid_dim, 1)
    kid = build_kid(PassThroughExtractor(kid_dim), subsets=100, subset_size=1000)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    slow_kid = _timed(kid.compute)
    fast_kid = _timed(kernel_inception_distance, real, fake, subsets=100, subset_size=1000)

    rows = []
    for what, (slow_s, slow_v), (fast_s, fast_v) in (
        (f"FID, {fid_dim}-d, 2000 real vs 1000 fake", slow_fid, fast_fid),
        (f"KID, {kid_dim}-d, 2000 real vs 1000 fake, 100 subsets of 1000", slow_kid, fast_kid),
    ):
        slow_v, fast_v = (float(v[0] if isinstance(v, tuple) else v) for v in (slow_v, fast_v))
        rows.append([what, slow_s, fast_s, slow_s / fast_s, abs(slow_v - fast_v) / abs(slow_v)])
    return rows


def main() -> None:
    torch.manual_seed(0)
    feature_net = build_feature_extractor("feature_net")
    digits = torch.rand(500, 1, 8, 8) * 2 - 1
    feature_net_ips = _throughput(lambda: feature_net(digits), 500, repeats=5)
    inception = InceptionExtractor(FIDInceptionV3(None, ("2048", "logits_unbiased")))
    rgb = torch.rand(16, 3, 32, 32) * 2 - 1
    inception_ips = _throughput(lambda: inception(rgb), 16, repeats=2)

    settings, val_every = _callback_settings()
    num_samples = int(settings["num_samples"])
    model, datamodule = _quickstart()
    reference = compute_reference_stats(feature_net, reference_loader(datamodule, "train"), progress=False)
    fake = torch.cat(
        [datamodule.train_set[i % len(datamodule.train_set)][0][None] for i in range(num_samples)]
    )
    fake = (fake + 0.1 * torch.randn_like(fake)).clamp(-1, 1)
    labels = torch.arange(num_samples) % 10
    quality = QualityConfig(kid_subset_size=int(settings.get("kid_subset_size", 1000)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.safetensors"
        reference.save(path)

        def metric_pipeline() -> dict:
            stats = ReferenceStats.load(path)
            features, logits = feature_net(fake)
            return quality_from_features(
                stats, features, logits, labels=labels, predicted=logits.argmax(1), config=quality
            )

        pipeline_seconds = timeit(metric_pipeline, repeats=3)
    features, logits = feature_net(fake)
    metrics_only = timeit(
        lambda: quality_from_features(reference, features, logits, config=quality), repeats=3
    )
    wide = ReferenceStats.from_features(torch.rand(3000, 2048))
    fid_2048 = timeit(
        lambda: quality_from_features(
            wide, torch.rand(num_samples, 2048), config=QualityConfig(kid=False, precision_recall=False)
        ),
        repeats=2,
    )

    exact_rows = _exact_forms_vs_torchmetrics()

    epoch = _epoch_seconds(model, datamodule)
    model.eval()
    generation, nfe = _generation_seconds(model, settings["sampler"], num_samples)
    evaluation = pipeline_seconds + generation
    sampler = f"{settings['sampler']['method']}, {settings['sampler']['steps']} steps = {nfe} NFE"

    rows = [
        ["digits feature net (8x8 grey)", f"{feature_net_ips:,.0f}", f"{1000 / feature_net_ips:.3f}"],
        ["FID InceptionV3 (32x32 RGB -> 299)", f"{inception_ips:,.1f}", f"{1000 / inception_ips:.1f}"],
    ]
    cost_rows = [
        ["one quickstart training epoch", epoch, 1.0],
        [
            "metric pipeline: load stats + feature net + all metrics",
            pipeline_seconds,
            pipeline_seconds / epoch,
        ],
        ["  of which metrics from features (FID, KID x100, IS, P/R)", metrics_only, metrics_only / epoch],
        [f"generation of {num_samples} samples ({sampler}, CFG)", generation, generation / epoch],
        ["whole evaluation (generation + metric pipeline)", evaluation, evaluation / epoch],
        [
            f"Inception features of {num_samples} samples (instead of feature net)",
            num_samples / inception_ips,
            num_samples / inception_ips / epoch,
        ],
        ["FID compute alone at 2048-d (Inception size), reference root cached", fid_2048, fid_2048 / epoch],
    ]
    markdown = "\n\n".join(
        [
            "# Sample-quality metrics: cost on CPU",
            "Command: `OMP_NUM_THREADS=1 python -m benchmarks metrics` (see the module docstring of "
            "`benchmarks/metrics.py`).",
            "## Feature extraction throughput",
            markdown_table(["extractor", "images/s", "s per 1000 images"], rows),
            "## One validation evaluation vs one quickstart training epoch",
            f"The evaluation is the `SampleQuality` callback as configured in `configs/metrics/digits_fid.yaml` "
            f"({num_samples} samples, {sampler}, feature net, FID + KID + IS + precision/recall + class "
            f"accuracy), timed in parts on the quickstart model.",
            markdown_table(["part", "seconds", "x one epoch"], cost_rows),
            f"**fid_cost_per_epoch = {pipeline_seconds / epoch:.3f}** (metric pipeline / epoch; goal <= 0.10). "
            f"Generating the samples is the sampler's cost and dominates: the whole evaluation costs "
            f"{evaluation / epoch:.2f} epochs; validating every {val_every} epochs as the config does, that is "
            f"**{evaluation / epoch / val_every:.3f} of an epoch per epoch** (`evaluation_cost_per_epoch_amortised`). "
            f"The generation cost scales with `num_samples` x NFE, both set in YAML.",
            "## Exact fast forms (`distances.py`) vs torchmetrics' compute, same features",
            "FID: one symmetric `eigh` of `A S_g A` (`A = S_r^(1/2)`, here computed too, not cached) instead of "
            "`eigvals(S_r S_g)`; KID: all subset sums from one kernel evaluation instead of three kernel matrices "
            "per subset. Same subsets (same seed), so the values agree to round-off.",
            markdown_table(
                ["computation", "torchmetrics s", "distances.py s", "speed-up", "relative difference"],
                exact_rows,
            ),
            "Inception weights are random here (the compute does not depend on them); the machine was shared "
            "with other jobs, so absolute times are noisy while the ratios within this run hold.",
            "![cost](metrics.png)",
        ]
    )
    headline = {
        "fid_cost_per_epoch": pipeline_seconds / epoch,
        "evaluation_cost_per_epoch": evaluation / epoch,
        "evaluation_cost_per_epoch_amortised": evaluation / epoch / val_every,
        "metric_pipeline_seconds": pipeline_seconds,
        "metrics_from_features_seconds": metrics_only,
        "epoch_seconds": epoch,
        "feature_net_images_per_s": feature_net_ips,
        "inception_images_per_s": inception_ips,
        "fid_2048_compute_seconds": fid_2048,
        "generation_seconds": generation,
        "generation_nfe": nfe,
        "num_samples": num_samples,
        "fid_512_speedup_vs_torchmetrics": exact_rows[0][3],
        "kid_speedup_vs_torchmetrics": exact_rows[1][3],
        "check_val_every_n_epoch": val_every,
        "machine": machine_info(),
    }
    write_results("metrics", markdown, headline)
    _plot(cost_rows)


def _plot(cost_rows: list[list]) -> None:
    plt = pyplot()

    labels = [row[0].strip().split(" (")[0].split(":")[0] for row in cost_rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(labels[::-1], [row[1] for row in cost_rows][::-1], color="tab:blue")
    ax.axvline(cost_rows[0][1] * 0.1, color="tab:red", linestyle="--", label="10% of an epoch")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log scale)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "metrics.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
