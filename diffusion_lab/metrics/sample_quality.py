"""``SampleQuality``: FID / KID / IS / precision-recall / class accuracy of generated samples during validation.

Every ``every_n_val_epochs`` validation epochs (and at every ``test``) the callback draws ``num_samples`` samples
with ``pl_module.generate`` using the sampler given in YAML, extracts their features once, and logs

    {prefix}fid, kid_mean, kid_std, is_mean, is_std, precision, recall, class_accuracy

(``prefix`` = ``val/`` or ``test/``, plus an optional ``name`` suffix such as ``_heun18``).

**Correct under DDP.** Sample ``i`` belongs to global batch ``b = i // batch_size``; batch ``b`` is drawn by rank
``b % world_size`` with a generator seeded by ``seed + b`` (and, for conditional models, labels ``i % num_classes``).
The features of all ranks are then gathered and sorted by sample index, and every rank computes the metrics on
the same full set, so the numbers equal a single-process run with the same seeds and agree on every rank
(``ModelCheckpoint(monitor="val/fid")`` then decides the same everywhere).

Under ``trainer.fast_dev_run`` the callback still runs end to end (that is what a dev run checks) but on at most
``FAST_DEV_RUN_SAMPLES`` samples, so a smoke test of a config costs seconds, not a full evaluation.

**Cheap.** The real data's statistics come from a cache file (see ``tools/fid_stats.py``), keyed by data set,
split, resolution and feature extractor; when it is missing, rank 0 computes it once from the DataModule.

YAML::

    trainer:
      callbacks:
        - class_path: diffusion_lab.metrics.sample_quality.SampleQuality
          init_args:
            num_samples: 1000
            every_n_val_epochs: 1
            sampler: {method: heun, steps: 18}
            feature_extractor: feature_net        # inception | feature_net | timm
            feature_extractor_weights_path: null  # required for inception / timm
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.metrics.factory import QualityConfig, quality_from_features
from diffusion_lab.metrics.feature_net import load_feature_net
from diffusion_lab.metrics.features import (
    ExtractorName,
    FeatureExtractor,
    FeatureNetExtractor,
    build_feature_extractor,
)
from diffusion_lab.metrics.reference_stats import (
    DEFAULT_CACHE_DIR,
    ReferenceStats,
    compute_reference_stats,
    datamodule_reference_path,
    reference_loader,
)

__all__ = ["FAST_DEV_RUN_SAMPLES", "METRIC_NAMES", "SampleQuality", "generate_features", "gather_by_index"]

METRIC_NAMES = ("fid", "kid", "is", "precision_recall", "class_accuracy")
FAST_DEV_RUN_SAMPLES = (
    20  # samples per evaluation under trainer.fast_dev_run (a smoke test, not a measurement)
)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def generate_features(
    pl_module: torch.nn.Module,
    extractor: FeatureExtractor,
    *,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    sampler: dict | None = None,
    classifier: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Tensor]:
    """This rank's share of ``num_samples`` samples, as features (see the module docstring for the split).

    Returns a dict of per-sample tensors: ``index`` (n,), ``features`` (n, D), ``logits`` (n, K) when the
    extractor has them, and for conditional models (``pl_module.num_classes > 0``) ``labels`` (n,), the
    requested classes ``index % num_classes``, and ``predicted`` (n,), the class ``classifier`` assigns (when
    given). Images are clamped to [-1, 1] (as they would be saved) before feature extraction.
    """
    num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
    out: dict[str, list[Tensor]] = {"index": [], "features": [], "logits": [], "labels": [], "predicted": []}
    batches = range(rank, math.ceil(num_samples / batch_size), world_size)
    for b in tqdm(batches, desc="sample quality", disable=not progress, leave=False):
        index = torch.arange(b * batch_size, min(num_samples, (b + 1) * batch_size))
        labels = (index % num_classes).to(device) if num_classes else None
        generator = torch.Generator(device=device).manual_seed(seed + b)
        images = pl_module.generate(len(index), labels=labels, generator=generator, sampler=sampler)
        images = images.to(device).float().clamp(-1.0, 1.0)  # as the images would be saved
        features, logits = extractor(images)
        out["index"].append(index.to(device))
        out["features"].append(features)
        if logits is not None:
            out["logits"].append(logits)
        if labels is not None:
            out["labels"].append(labels)
            if classifier is not None:
                # the feature net as classifier: its logits are already computed
                class_logits = (
                    logits if classifier is getattr(extractor, "network", None) else classifier(images)
                )
                out["predicted"].append(class_logits.argmax(dim=1))
    # a rank without batches still returns every key (zero rows), so that all ranks join the same gathers
    empty = {
        "index": torch.zeros(0, dtype=torch.long, device=device),
        "features": torch.zeros(0, extractor.num_features, device=device),
        "logits": torch.zeros(0, extractor.num_logits, device=device) if extractor.num_logits else None,
        "labels": torch.zeros(0, dtype=torch.long, device=device) if num_classes else None,
        "predicted": torch.zeros(0, dtype=torch.long, device=device) if num_classes and classifier else None,
    }
    return {k: torch.cat(out[k]) if out[k] else v for k, v in empty.items() if v is not None}


def gather_by_index(local: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gather every rank's per-sample tensors and order them by ``index`` (a no-op without distributed)."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    _, world_size = _world()
    if world_size > 1:
        local = {k: torch.cat(gather_all_tensors(v.contiguous())) for k, v in local.items()}
    order = torch.argsort(local["index"])
    return {k: v[order] for k, v in local.items()}


class SampleQuality(pl.Callback):
    """Log FID / KID / IS / precision-recall / class accuracy of generated samples (see the module docstring).

    Args:
        num_samples: samples per evaluation (over all ranks).
        batch_size: samples per ``generate`` call; part of the seeding, so keep it fixed to compare runs.
        every_n_val_epochs: evaluate on every k-th validation epoch (sanity checks excluded).
        sampler: sampler overrides passed to ``pl_module.generate`` (e.g. ``{method: heun, steps: 18}``).
        metrics: any of ``fid``, ``kid``, ``is``, ``precision_recall``, ``class_accuracy``.
        feature_extractor: ``inception`` | ``feature_net`` | ``timm`` (see ``features.py``).
        feature_extractor_weights_path: local weights (required for inception / timm; feature_net defaults to
            the shipped digits net).
        timm_model: timm model name for ``feature_extractor: timm``.
        timm_num_classes: classifier outputs of that timm model (0: features only, so no IS).
        classifier_weights_path: a FeatureNet file used for class accuracy; default: the feature extractor
            itself when it is a feature net (otherwise no class accuracy).
        reference_split: DataModule split whose statistics FID compares against (``train`` or ``val``).
        reference_stats_path: explicit statistics file (computed there when missing); default: a file in
            ``cache_dir`` named after data set, split, resolution and extractor.
        cache_dir: folder of cached reference statistics.
        max_reference_features: real feature vectors kept for KID and precision/recall.
        kid_subset_size, kid_subsets, pr_k: KID and precision/recall settings (``QualityConfig``).
        seed: base seed of the sample generators.
        name: suffix of the logged keys (e.g. ``_heun18`` to log several samplers side by side).
    """

    def __init__(
        self,
        num_samples: int = 1000,
        batch_size: int = 250,
        every_n_val_epochs: int = 1,
        sampler: dict[str, Any] | None = None,
        metrics: Sequence[str] = METRIC_NAMES,
        feature_extractor: ExtractorName = "feature_net",
        feature_extractor_weights_path: str | None = None,
        timm_model: str | None = None,
        timm_num_classes: int = 0,
        classifier_weights_path: str | None = None,
        reference_split: str = "train",
        reference_stats_path: str | None = None,
        cache_dir: str = str(DEFAULT_CACHE_DIR),
        max_reference_features: int = 10_000,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        pr_k: int = 3,
        seed: int = 0,
        name: str = "",
    ) -> None:
        super().__init__()
        unknown = sorted(set(metrics) - set(METRIC_NAMES))
        if unknown:
            raise ValueError(
                f"unknown sample-quality metrics {unknown}; expected a subset of {list(METRIC_NAMES)}"
            )
        if num_samples < 2 or batch_size < 1 or every_n_val_epochs < 1:
            raise ValueError(
                f"need num_samples >= 2, batch_size >= 1, every_n_val_epochs >= 1; got {num_samples}, "
                f"{batch_size}, {every_n_val_epochs}"
            )
        self.num_samples, self.batch_size, self.every_n_val_epochs = (
            num_samples,
            batch_size,
            every_n_val_epochs,
        )
        self.sampler, self.metrics, self.seed, self.name = sampler, tuple(metrics), seed, name
        self.extractor_args = (
            feature_extractor,
            feature_extractor_weights_path,
            timm_model,
            timm_num_classes,
        )
        self.classifier_weights_path = classifier_weights_path
        self.reference_split, self.reference_stats_path = reference_split, reference_stats_path
        self.cache_dir, self.max_reference_features = cache_dir, max_reference_features
        self.quality = QualityConfig(
            fid="fid" in metrics,
            kid="kid" in metrics,
            inception_score="is" in metrics,
            precision_recall="precision_recall" in metrics,
            kid_subset_size=kid_subset_size,
            kid_subsets=kid_subsets,
            pr_k=pr_k,
            seed=seed,
        )
        self.extractor: FeatureExtractor | None = None
        self.classifier: torch.nn.Module | None = None
        self.reference: ReferenceStats | None = None
        self.val_epochs_seen = 0
        self.last_results: dict[str, float] = {}

    # ----------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.extractor is None:
            self.extractor = build_feature_extractor(*self.extractor_args)
            if "class_accuracy" in self.metrics:
                if self.classifier_weights_path is not None:
                    self.classifier = load_feature_net(self.classifier_weights_path)
                elif isinstance(self.extractor, FeatureNetExtractor):
                    self.classifier = self.extractor.network
        self.extractor.to(pl_module.device)
        if self.classifier is not None:
            self.classifier.to(pl_module.device)

    def _reference_path(self, datamodule: Any) -> Path:
        if self.reference_stats_path is not None:
            return Path(self.reference_stats_path)
        return datamodule_reference_path(datamodule, self.reference_split, self.extractor.key, self.cache_dir)

    def reference_stats(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ReferenceStats:
        """Load (rank 0 computes and caches them first when missing) the real data's statistics, once."""
        if self.reference is None:
            datamodule = trainer.datamodule
            if datamodule is None and self.reference_stats_path is None:
                raise ValueError(
                    "SampleQuality needs a DataModule or `reference_stats_path` for the real statistics"
                )
            path = self._reference_path(datamodule)
            if trainer.is_global_zero and not path.is_file():
                loader = reference_loader(datamodule, self.reference_split)
                stats = compute_reference_stats(
                    self.extractor, loader, max_features=self.max_reference_features, device=pl_module.device
                )
                stats.save(path)
            trainer.strategy.barrier("sample_quality_reference_stats")
            self.reference = ReferenceStats.load(path)
            if self.reference.key and self.reference.key != self.extractor.key:
                raise ValueError(
                    f"reference statistics '{path}' belong to extractor '{self.reference.key}', "
                    f"not '{self.extractor.key}'"
                )
        return self.reference

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate, extract, gather, compute; every rank returns the same numbers."""
        start = time.perf_counter()
        reference = self.reference_stats(trainer, pl_module)
        rank, world_size = _world()
        module_classes = int(getattr(pl_module, "num_classes", 0) or 0)
        classifier_classes = getattr(self.classifier, "num_classes", module_classes)
        if self.classifier is not None and module_classes and classifier_classes != module_classes:
            raise ValueError(
                f"class accuracy: the classifier has {classifier_classes} classes but the model "
                f"{module_classes}; set `classifier_weights_path` to a feature net of this data set"
            )
        num_samples = (
            min(self.num_samples, FAST_DEV_RUN_SAMPLES) if trainer.fast_dev_run else self.num_samples
        )
        local = generate_features(
            pl_module,
            self.extractor,
            num_samples=num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            sampler=self.sampler,
            classifier=self.classifier,
            device=pl_module.device,
            rank=rank,
            world_size=world_size,
            progress=trainer.is_global_zero,
        )
        data = gather_by_index(local)
        results = quality_from_features(
            reference,
            data["features"],
            data.get("logits"),
            labels=data.get("labels"),
            predicted=data.get("predicted"),
            config=self.quality,
        )
        results["seconds"] = time.perf_counter() - start
        self.last_results = results
        return results

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            results = self.evaluate(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        logged = {f"{prefix}{key}{self.name}": value for key, value in results.items() if key != "seconds"}
        logged[f"{prefix}sample_quality_seconds{self.name}"] = results["seconds"]
        pl_module.log_dict(logged, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_epochs_seen += 1
        if self.val_epochs_seen % self.every_n_val_epochs == 0:
            self._run(trainer, pl_module, "val/")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test/")

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several SampleQuality callbacks (e.g. one per sampler) can coexist."""
        return self._generate_state_key(
            name=self.name, sampler=repr(self.sampler), num_samples=self.num_samples, seed=self.seed
        )

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs_seen": self.val_epochs_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_epochs_seen = int(state_dict.get("val_epochs_seen", 0))
