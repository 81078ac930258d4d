"""torchmetrics FID / IS / KID on a chosen feature extractor, and all sample-quality numbers from features.

Two ways to use the metrics:

* image level, for scripts and notebooks: ``fid = build_fid("feature_net")``, then
  ``fid.update(real_images, real=True)``, ``fid.update(fake_images, real=False)``, ``fid.compute()``; images
  are floats in [-1, 1] (the extractor's convention, see ``features.py``; torchmetrics' own
  ``normalize`` flag does not apply to custom extractors and is left unset).
* feature level, for the callback and ``tools/evaluate.py``: features are extracted once per batch and
  :func:`quality_from_features` computes FID, KID, IS, precision/recall and class accuracy from them against
  cached :class:`~diffusion_lab.metrics.reference_stats.ReferenceStats`. IS is torchmetrics' (fed through a
  pass-through "feature network"); FID and KID use the exact but much cheaper forms of ``distances.py``
  (one symmetric eigendecomposition with the reference's square root cached; all KID subsets from one kernel
  evaluation), whose values equal torchmetrics' (tested to 1e-6).

FID (Heusel et al. 2017): ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.
IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` groups, mean and std.
KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``, averaged
over ``subsets`` random subsets of ``subset_size``; mean and std.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lab.metrics.distances import frechet_distance, kernel_inception_distance
from diffusion_lab.metrics.features import FeatureExtractor, PassThroughExtractor, build_feature_extractor
from diffusion_lab.metrics.precision_recall import knn_radii, manifold_coverage
from diffusion_lab.metrics.reference_stats import ReferenceStats

__all__ = [
    "FeatureHead",
    "QualityConfig",
    "build_fid",
    "build_inception_score",
    "build_kid",
    "load_reference_into_fid",
    "quality_from_features",
]


class FeatureHead(nn.Module):
    """Adapts a :class:`FeatureExtractor` to torchmetrics' ``feature=`` argument: returns one of its outputs."""

    def __init__(self, extractor: FeatureExtractor, output: str = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        if output == "logits" and not extractor.num_logits:
            raise ValueError(f"feature extractor '{extractor.key}' has no classifier logits (needed for IS)")
        self.extractor, self.output = extractor, output
        self.num_features = extractor.num_features if output == "features" else extractor.num_logits

    def forward(self, images: Tensor) -> Tensor:
        features, logits = self.extractor(images)
        return features if self.output == "features" else logits


def _extractor(extractor: FeatureExtractor | str, weights_path: str | os.PathLike | None) -> FeatureExtractor:
    return build_feature_extractor(extractor, weights_path) if isinstance(extractor, str) else extractor


def build_fid(
    extractor: FeatureExtractor | str = "feature_net",
    weights_path: str | os.PathLike | None = None,
    **kwargs,
) -> FrechetInceptionDistance:
    """torchmetrics FID on ``extractor`` (an instance or a name for :func:`build_feature_extractor`)."""
    return FrechetInceptionDistance(
        feature=FeatureHead(_extractor(extractor, weights_path), "features"), **kwargs
    )


def build_kid(
    extractor: FeatureExtractor | str = "feature_net",
    weights_path: str | os.PathLike | None = None,
    **kwargs,
) -> KernelInceptionDistance:
    """torchmetrics KID on ``extractor``; ``kwargs`` go to KernelInceptionDistance (subsets, subset_size, ...)."""
    return _quietly(
        KernelInceptionDistance, feature=FeatureHead(_extractor(extractor, weights_path)), **kwargs
    )


def build_inception_score(
    extractor: FeatureExtractor | str = "feature_net",
    weights_path: str | os.PathLike | None = None,
    **kwargs,
) -> InceptionScore:
    """torchmetrics IS on the classifier logits of ``extractor`` (InceptionV3's or the feature net's)."""
    return _quietly(
        InceptionScore, feature=FeatureHead(_extractor(extractor, weights_path), "logits"), **kwargs
    )


def _quietly(metric_class: type, **kwargs):
    """Construct a torchmetrics metric without its "will save all extracted features" memory warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        return metric_class(**kwargs)


def load_reference_into_fid(fid: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set FID's real-side states from cached statistics: ``sum x = n mu``, ``sum x x^T = (n-1) S + n mu mu^T``.

    torchmetrics then recovers exactly ``mu`` and ``S`` in ``compute``. Pair with ``reset_real_features=False``
    so that ``reset()`` keeps them.
    """
    n = stats.num_samples
    mean, cov = stats.mean.to(fid.real_features_sum), stats.cov.to(fid.real_features_cov_sum)
    if mean.shape != fid.real_features_sum.shape:
        raise ValueError(
            f"reference statistics have {mean.shape[0]} features, the FID expects {fid.real_features_sum.shape[0]}"
        )
    fid.real_features_sum = n * mean
    fid.real_features_cov_sum = (n - 1) * cov + n * torch.outer(mean, mean)
    fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=mean.device)


@dataclass
class QualityConfig:
    """Which numbers :func:`quality_from_features` computes, and their settings."""

    fid: bool = True
    kid: bool = True
    inception_score: bool = True
    precision_recall: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # reduced to the number of available samples when larger
    is_splits: int = 10
    pr_k: int = 3
    seed: int = 0  # seeds the random subsets / splits of KID and IS


def quality_from_features(
    reference: ReferenceStats,
    features: Tensor,
    logits: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    predicted: Tensor | None = None,
    config: QualityConfig | None = None,
) -> dict[str, float]:
    """Sample-quality numbers of generated ``features`` (N, D) against ``reference``.

    Args:
        reference: real-data statistics in the same feature space.
        features: generated samples' features (N, D).
        logits: their classifier logits (N, K) for IS (skipped when None).
        labels, predicted: requested class of each conditional sample and the class a classifier assigns; when
            both are given ``class_accuracy`` = mean(labels == predicted).

    Returns: ``fid``, ``kid_mean``, ``kid_std``, ``is_mean``, ``is_std``, ``precision``, ``recall``,
    ``class_accuracy`` (those that apply). Deterministic: KID/IS subsets are drawn under ``config.seed``
    without touching the global random state.
    """
    config = config or QualityConfig()
    features = features.detach().float().cpu()
    if features.ndim != 2 or features.shape[1] != reference.mean.shape[0]:
        raise ValueError(f"features must be (N, {reference.mean.shape[0]}), got {tuple(features.shape)}")
    out: dict[str, float] = {}
    if config.fid:
        x = features.double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        fid = frechet_distance(reference.mean, reference.cov, mean, cov, sqrt_cov1=reference.sqrt_cov())
        out["fid"] = float(fid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.kid:
            subset_size = min(config.kid_subset_size, reference.features.shape[0], features.shape[0])
            kid_mean, kid_std = kernel_inception_distance(
                reference.features, features, subsets=config.kid_subsets, subset_size=subset_size
            )
            out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
        if config.inception_score and logits is not None:
            inception_score = _quietly(
                InceptionScore,
                feature=FeatureHead(PassThroughExtractor(logits.shape[1])),
                splits=config.is_splits,
                sync_on_compute=False,
            )
            inception_score.update(logits.detach().float().cpu())
            is_mean, is_std = inception_score.compute()
            out["is_mean"], out["is_std"] = float(is_mean), float(is_std)
    if config.precision_recall:
        real, k = reference.features, config.pr_k
        out["precision"] = float(manifold_coverage(real, reference.knn_radii(k), features))
        out["recall"] = float(manifold_coverage(features, knn_radii(features, k), real))
    if labels is not None and predicted is not None:
        out["class_accuracy"] = float((labels.cpu() == predicted.cpu()).double().mean())
    return out
