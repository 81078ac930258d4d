"""SampleQuality callback: numbers equal an independent computation on the same samples, single process and
under 2-process CPU DDP (gloo); seeding and scheduling behave as documented.

Run as a script (``python tests/metrics/test_sample_quality.py OUT_DIR``) it is the DDP worker of the DDP test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from diffusion_lab.data.digits import Digits, load_digits_tensors
from diffusion_lab.metrics.factory import build_fid
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.quality_vs_nfe import sweep_samplers, write_sweep_table
from diffusion_lab.metrics.reference_stats import ReferenceStats
from diffusion_lab.metrics.sample_quality import FAST_DEV_RUN_SAMPLES, SampleQuality, generate_features

REPO = Path(__file__).resolve().parents[2]
CALLBACK_ARGS = dict(num_samples=200, batch_size=64, kid_subsets=10, kid_subset_size=50, seed=3)


class FakeGenerator(pl.LightningModule):
    """``generate`` returns digits of the requested class plus seeded Gaussian noise of std ``noise / steps``;
    ``denoiser`` is called ``steps`` times per batch, like a first-order sampler's network."""

    def __init__(self, noise: float = 0.3, num_classes: int = 10) -> None:
        super().__init__()
        images, labels = load_digits_tensors()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=10)
        self.register_buffer("images", images[order])
        self.register_buffer("counts", counts)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts)
        self.num_classes, self.noise = num_classes, noise
        self.denoiser = nn.Identity()
        self.weight = nn.Parameter(torch.zeros(()))
        self.samples_generated = 0

    def generate(self, num_samples, labels=None, generator=None, sampler=None):
        steps = int((sampler or {}).get("steps", 1))
        self.samples_generated += num_samples
        for _ in range(steps):
            self.denoiser(self.weight)
        u = torch.rand(num_samples, generator=generator, device=self.device)
        if labels is None:
            index = (u * len(self.images)).long()
        else:
            index = self.starts[labels] + (u * self.counts[labels]).long()
        picked = self.images[index]
        noise = torch.randn(picked.shape, generator=generator, device=self.device)
        return picked + (self.noise / steps) * noise

    def training_step(self, batch, batch_idx):
        return (self.weight - 1.0).square()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_with_callback(
    root: Path,
    devices: int = 1,
    strategy: str = "auto",
    max_epochs: int = 1,
    extra: dict | None = None,
    fast_dev_run: bool = False,
    **kwargs,
):
    """Fit the fake model with a SampleQuality callback (and a second one with ``extra`` arguments)."""
    callback = SampleQuality(cache_dir=str(root / "cache"), **{**CALLBACK_ARGS, **kwargs})
    callbacks = [callback]
    if extra is not None:
        callbacks.append(SampleQuality(cache_dir=str(root / "cache"), **{**CALLBACK_ARGS, **extra}))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
        fast_dev_run=fast_dev_run,
    )
    trainer.fit(FakeGenerator(), datamodule=Digits(batch_size=64))
    return trainer, callbacks


def expected_samples(num_samples: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented seeding: global batch b uses generator seed + b and labels index % 10."""
    model, images, labels = FakeGenerator(), [], []
    for b in range(math.ceil(num_samples / batch_size)):
        index = torch.arange(b * batch_size, min(num_samples, (b + 1) * batch_size))
        generator = torch.Generator().manual_seed(seed + b)
        images.append(model.generate(len(index), labels=index % 10, generator=generator).clamp(-1, 1))
        labels.append(index % 10)
    return torch.cat(images), torch.cat(labels)


# a second callback whose 50 samples fit in one batch, so that under DDP rank 1 draws none
SMALL = dict(num_samples=50, name="_small")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return fit_with_callback(tmp_path_factory.mktemp("single"), extra=SMALL)


def test_callback_fid_and_accuracy_equal_direct_computation(single_process):
    trainer, (callback, _) = single_process
    images, labels = expected_samples(200, 64, seed=3)
    dm = Digits()
    dm.setup("fit")
    extractor = build_feature_extractor("feature_net")
    fid = build_fid(extractor)
    fid.update(dm.train_set.images, real=True)
    fid.update(images, real=False)
    assert callback.last_results["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    accuracy = float((extractor(images)[1].argmax(1) == labels).double().mean())
    assert callback.last_results["class_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert 0.5 < accuracy <= 1.0  # the fake draws digits of the requested class
    logged = trainer.callback_metrics
    assert float(logged["val/fid"]) == pytest.approx(callback.last_results["fid"], rel=1e-6)
    for key in ("kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "class_accuracy"):
        assert f"val/{key}" in logged and f"val/{key}_small" in logged


def test_reference_statistics_are_cached_on_disk(single_process):
    trainer, _ = single_process
    files = list(Path(trainer.default_root_dir, "cache").glob("digits-train-8px-feature_net-*.safetensors"))
    assert len(files) == 1


def test_evaluation_schedule_skips_sanity_check_and_counts_validation_epochs(tmp_path):
    trainer, (callback,) = fit_with_callback(tmp_path, max_epochs=1, every_n_val_epochs=2, num_samples=20)
    assert callback.val_epochs_seen == 1 and callback.last_results == {}
    assert "val/fid" not in trainer.callback_metrics


def test_fast_dev_run_evaluates_end_to_end_on_few_samples(tmp_path):
    trainer, (callback,) = fit_with_callback(tmp_path, fast_dev_run=True, num_samples=200)
    assert trainer.lightning_module.samples_generated == FAST_DEV_RUN_SAMPLES < 200
    assert set(callback.last_results) >= {"fid", "kid_mean", "is_mean", "precision", "class_accuracy"}


def test_ranks_split_the_batches_and_together_reproduce_one_process():
    model, extractor = FakeGenerator(), build_feature_extractor("feature_net")
    kwargs = dict(num_samples=150, batch_size=32, seed=5)
    single = generate_features(model, extractor, **kwargs)
    parts = [generate_features(model, extractor, rank=r, world_size=3, **kwargs) for r in range(3)]
    assert sorted(len(p["index"]) for p in parts) == [32, 54, 64]
    merged = {k: torch.cat([p[k] for p in parts]) for k in single}
    order = torch.argsort(merged["index"])
    for key in single:
        assert torch.equal(merged[key][order], single[key]), key


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match=r"unknown sample-quality metrics \['lpips'\]"):
        SampleQuality(metrics=["fid", "lpips"])
    with pytest.raises(ValueError, match="num_samples >= 2"):
        SampleQuality(num_samples=1)


def test_quality_vs_nfe_sweep_measures_nfe_and_writes_table_and_plot(tmp_path):
    extractor = build_feature_extractor("feature_net")
    dm = Digits()
    dm.setup("fit")
    reference = ReferenceStats.from_features(extractor(dm.train_set.images)[0], key=extractor.key)
    samplers = [{"method": "euler"}, {"method": "heun"}]
    rows = sweep_samplers(
        FakeGenerator(noise=2.0),
        extractor,
        reference,
        samplers,
        [1, 8],
        num_samples=120,
        batch_size=50,
        classifier=extractor.network,
        progress=False,
    )
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("euler", 1, 1),
        ("euler", 8, 8),
        ("heun", 1, 1),
        ("heun", 8, 8),
    ]
    # the fake's noise shrinks as 1 / steps, so more steps must mean a lower FID
    assert rows[1]["fid"] < 0.5 * rows[0]["fid"]
    md = write_sweep_table(rows, tmp_path)
    table = md.read_text()
    assert "| sampler | steps | nfe | fid |" in table and table.count("| euler |") == 2
    assert (tmp_path / "quality_vs_nfe.png").stat().st_size > 1000
    assert json.loads((tmp_path / "quality_vs_nfe.json").read_text())[3]["nfe"] == 8


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_give_the_single_process_numbers(single_process, tmp_path):
    _, callbacks = single_process
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=300,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for i, callback in enumerate(callbacks):  # uneven split (128 / 72 samples), then one rank with no samples
        results = [rank[i] for rank in ranks]
        for result in results:
            result.pop("seconds")
        assert results[0] == results[1]  # every rank computes the same numbers
        assert set(results[0]) == set(callback.last_results) - {"seconds"}
        for key, value in results[0].items():
            assert value == pytest.approx(callback.last_results[key], rel=1e-6, abs=1e-9), key


if __name__ == "__main__":  # the DDP worker: 2 CPU processes (gloo), results of each rank to OUT/rank{r}.json
    out = Path(sys.argv[1])
    trainer, callbacks = fit_with_callback(out, devices=2, strategy="ddp", extra=SMALL)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps([c.last_results for c in callbacks]))
