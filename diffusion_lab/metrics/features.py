"""Feature extractors for FID / IS / KID / precision-recall, chosen by name in YAML.

Every extractor is an ``nn.Module`` with one input convention: **float images (B, C, H, W) in [-1, 1]**
(what every DataModule yields and every ``generate`` returns), C = 1 or 3. It returns
``(features (B, num_features) float32, logits (B, num_logits) or None)`` in a single forward pass, so one pass
feeds FID, KID and precision/recall (features) and IS and class accuracy (logits).

* ``inception``: the standard FID InceptionV3 (torch-fidelity's, as in torchmetrics) from a local weights
  file. Images are quantised to uint8 exactly as when saving a PNG (``round((x + 1) * 127.5)``), grey images
  are repeated to RGB, and the network resizes to 299 x 299 itself. Features: pool3 (2048-d);
  logits: ``logits_unbiased`` (1008 classes), the IS convention of torch-fidelity/torchmetrics.
* ``feature_net``: a :class:`~diffusion_lab.metrics.feature_net.FeatureNet` trained on the data set
  (default: the shipped digits net). Features: its feature layer; logits: its class logits.
* ``timm``: any timm model by name with local weights (e.g. a DINOv2 ViT for FD-DINOv2). Images are resized
  to the model's input size (bicubic, antialiased) and normalised with its mean/std. Features: the pre-logits
  (pooled / CLS) embedding; logits when the model has a classifier head (``num_classes > 0``).

Each extractor has a ``key`` naming it and a hash of its weights, used to key cached reference statistics.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.metrics.feature_net import DIGITS_FEATURE_NET, load_feature_net, shipped_asset
from diffusion_lab.pretrained.inception import FIDInceptionV3, load_fid_inception
from diffusion_lab.pretrained.safe_load import load_state_dict_file

__all__ = [
    "FeatureExtractor",
    "FeatureNetExtractor",
    "InceptionExtractor",
    "PassThroughExtractor",
    "TimmExtractor",
    "build_feature_extractor",
    "file_digest",
    "to_uint8",
]

ExtractorName = Literal["inception", "feature_net", "timm"]


def file_digest(path: str | os.PathLike, length: int = 8) -> str:
    """First ``length`` hex digits of the file's SHA-256 (keys caches to the exact weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 in [0, 255], rounding as an 8-bit PNG export does."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(
            f"feature extractors take float images (B, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)} "
            f"{images.dtype}"
        )


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [-1, 1]) -> (features, logits or None)``; always in eval mode."""

    key: str
    num_features: int
    num_logits: int  # 0 when the extractor has no classifier

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode (batch-norm statistics and dropout are part of the frozen metric)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError


class PassThroughExtractor(FeatureExtractor):
    """The inputs *are* the features (B, num_features): lets the metrics run on precomputed features."""

    def __init__(self, num_features: int, key: str = "identity") -> None:
        super().__init__()
        self.num_features, self.num_logits, self.key = num_features, 0, key

    def forward(self, features: Tensor) -> tuple[Tensor, None]:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (B, {self.num_features}), got {tuple(features.shape)}")
        return features, None


class InceptionExtractor(FeatureExtractor):
    """Standard FID InceptionV3: pool3 features (2048) and unbiased logits (1008) in one pass."""

    def __init__(self, network: FIDInceptionV3, key: str = "inception") -> None:
        super().__init__()
        if list(network.features_list) != ["2048", "logits_unbiased"]:
            raise ValueError(
                f"InceptionExtractor needs features ['2048', 'logits_unbiased'], got {network.features_list}"
            )
        self.network = network
        self.key, self.num_features, self.num_logits = key, 2048, 1008

    @classmethod
    def from_file(cls, weights_path: str | os.PathLike | None) -> InceptionExtractor:
        network = load_fid_inception(weights_path, features_list=("2048", "logits_unbiased"))
        return cls(network, key=f"inception-{file_digest(weights_path)}")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _check_images(images)
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features, logits = self.network(x)
        return features.float(), logits.float()


class FeatureNetExtractor(FeatureExtractor):
    """A project-trained :class:`FeatureNet`: feature layer and class logits."""

    def __init__(self, network: nn.Module, key: str = "feature_net") -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.key, self.num_features, self.num_logits = key, network.feature_dim, network.num_classes

    @classmethod
    def from_file(cls, weights_path: str | os.PathLike | None = None) -> FeatureNetExtractor:
        path = Path(shipped_asset(DIGITS_FEATURE_NET) if weights_path is None else weights_path)
        network = load_feature_net(path)
        return cls(network, key=f"feature_net-{path.stem}-{file_digest(path)}")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _check_images(images)
        return self.network.features_and_logits(images.float())


class TimmExtractor(FeatureExtractor):
    """Any timm model: pre-logits embedding as features, classifier logits when it has a head."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        self.model = model.eval().requires_grad_(False)
        config = resolve_data_config({}, model=model)
        self.input_size = tuple(config["input_size"][1:])
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.key, self.num_features = key, model.num_features
        self.num_logits = getattr(model, "num_classes", 0) or 0

    @classmethod
    def from_file(
        cls, model_name: str, weights_path: str | os.PathLike | None, num_classes: int = 0
    ) -> TimmExtractor:
        import timm

        if weights_path is None:
            raise ValueError(f"timm feature extractor '{model_name}' needs `feature_extractor_weights_path`")
        state_dict = load_state_dict_file(
            weights_path,
            what=f"timm model '{model_name}'",
            where_to_get=(
                f"on a machine with internet access run timm.create_model('{model_name}', pretrained=True) and "
                f"save its state_dict with safetensors.torch.save_file"
            ),
        )
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        result = model.load_state_dict(state_dict, strict=False)
        # a file with a classifier head also serves a features-only model: only head tensors may be left over
        head = model.pretrained_cfg.get("classifier", "head")
        heads = (head,) if isinstance(head, str) else tuple(head)
        unexpected = [k for k in result.unexpected_keys if not (num_classes == 0 and k.startswith(heads))]
        if result.missing_keys or unexpected:
            raise ValueError(
                f"weights file '{weights_path}' does not fit timm model '{model_name}' "
                f"(num_classes={num_classes}): missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
            )
        return cls(model, key=f"timm-{model_name}-{file_digest(weights_path)}")

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        _check_images(images)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        trunk = self.model.forward_features(x)
        features = self.model.forward_head(trunk, pre_logits=True)
        logits = self.model.forward_head(trunk) if self.num_logits else None
        return features.float(), None if logits is None else logits.float()


def build_feature_extractor(
    name: ExtractorName = "feature_net",
    weights_path: str | os.PathLike | None = None,
    timm_model: str | None = None,
    timm_num_classes: int = 0,
) -> FeatureExtractor:
    """The feature extractor named in YAML (``feature_extractor`` / ``feature_extractor_weights_path``).

    Args:
        name: ``inception`` | ``feature_net`` | ``timm``.
        weights_path: local weights file; required for ``inception`` and ``timm``; for ``feature_net`` the
            default is the digits net shipped in ``diffusion_lab/assets``.
        timm_model: timm model name (``timm`` only), e.g. ``vit_small_patch14_dinov2``.
        timm_num_classes: classifier outputs of the timm model (0: features only, no IS / accuracy).
    """
    if name == "inception":
        return InceptionExtractor.from_file(weights_path)
    if name == "feature_net":
        return FeatureNetExtractor.from_file(weights_path)
    if name == "timm":
        if not timm_model:
            raise ValueError("feature_extractor 'timm' needs `timm_model` (a timm model name)")
        return TimmExtractor.from_file(timm_model, weights_path, timm_num_classes)
    raise ValueError(f"unknown feature_extractor {name!r}; expected 'inception', 'feature_net' or 'timm'")
