"""A small classifier whose penultimate layer is the feature space of FID / KID / precision-recall on small data.

InceptionV3 features of 8x8 digits upsampled to 299 x 299 say little about digits; a classifier trained on the
data set itself is the usual substitute for small or non-natural image sets (the MNIST "FID" of many papers uses
a LeNet the same way). The network is a plain CNN: stages of two 3x3 convolutions (SiLU) halving the resolution
down to 4 x 4, then ``flatten -> Linear -> features (B, feature_dim)``; the logits are
``Linear(SiLU(features))``. Features are taken *before* the non-linearity so that no coordinate is clamped at
zero and the feature covariance stays full-rank, and they are standardised with constants fixed after training
(:func:`calibrate_features`): ``(f - mean_train) / s`` with ``s^2`` the training features' variance averaged
over coordinates. Then ``x.y / D`` is of order one, the regime KID's polynomial kernel ``(x.y / D + 1)^3`` was
designed for (Inception pool features have it too); FID is only rescaled by ``1 / s^2``.

Weights are stored as safetensors with the architecture in the file's metadata, so a file alone rebuilds its
network (:func:`load_feature_net`). The digits net shipped in ``diffusion_lab/assets/`` is reproduced by
``python tools/train_feature_net.py`` (see ``digits_feature_net.json`` beside it for command and accuracy).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusion_lab.pretrained.safe_load import load_state_dict_file

__all__ = [
    "DIGITS_FEATURE_NET",
    "FeatureNet",
    "calibrate_features",
    "evaluate_accuracy",
    "load_feature_net",
    "save_feature_net",
    "shipped_asset",
    "train_feature_net",
]

DIGITS_FEATURE_NET = "digits_feature_net.safetensors"
_ARCH_KEYS = ("in_channels", "resolution", "num_classes", "width", "feature_dim")


def shipped_asset(name: str) -> Path:
    """Path of a file shipped in the package's ``diffusion_lab/assets/`` folder."""
    return Path(str(resources.files("diffusion_lab") / "assets" / name))


class FeatureNet(nn.Module):
    """CNN classifier ``x (B, C, R, R) in [-1, 1] -> logits (B, num_classes)`` with a feature layer.

    Args:
        in_channels: image channels C.
        resolution: image size R, a power of two times 4 (4, 8, 16, 32, ...).
        num_classes: output classes.
        width: channels of the first stage; each further stage doubles them (capped at ``4 * width``).
        feature_dim: width of the feature layer used by FID / KID / precision-recall.
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 8,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
        if min(in_channels, num_classes, width, feature_dim) < 1:
            raise ValueError("in_channels, num_classes, width and feature_dim must all be >= 1")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.width, self.feature_dim = width, feature_dim
        layers: list[nn.Module] = []
        channels, size, out = in_channels, resolution, width
        while True:
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.SiLU(),
            ]
            channels = out
            if size == 4:
                break
            layers.append(nn.AvgPool2d(2))
            size //= 2
            out = min(2 * out, 4 * width)
        self.trunk = nn.Sequential(*layers)
        self.to_features = nn.Linear(channels * 4 * 4, feature_dim)
        self.classifier = nn.Sequential(nn.SiLU(), nn.Dropout(0.1), nn.Linear(feature_dim, num_classes))
        self.register_buffer("feature_shift", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def config(self) -> dict[str, int]:
        """The constructor arguments (stored in the weights file's metadata)."""
        return {k: getattr(self, k) for k in _ARCH_KEYS}

    def _check(self, x: Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"FeatureNet expects images (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(standardised features (B, feature_dim), logits (B, num_classes)) in one pass."""
        self._check(x)
        features = self.to_features(self.trunk(x).flatten(1))
        return (features - self.feature_shift) / self.feature_scale, self.classifier(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


def save_feature_net(model: FeatureNet, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write ``model`` as safetensors; the architecture (and ``info``, JSON-encoded) go into the metadata."""
    from safetensors.torch import save_file

    metadata = {k: str(v) for k, v in model.config().items()}
    metadata["info"] = json.dumps(info or {}, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def load_feature_net(path: str | os.PathLike | None = None) -> FeatureNet:
    """Rebuild a :class:`FeatureNet` from a safetensors file written by :func:`save_feature_net` (eval mode).

    ``None`` loads the digits net shipped with the package.
    """
    path = Path(shipped_asset(DIGITS_FEATURE_NET) if path is None else path)
    state_dict = load_state_dict_file(
        path,
        what="feature net",
        where_to_get="train it with `python tools/train_feature_net.py --out PATH` (see docs/metrics.md)",
    )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any failure to read a header means the wrong kind of file
        raise ValueError(
            f"feature net file '{path}' is not a safetensors file written by save_feature_net"
        ) from err
    missing = [k for k in _ARCH_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"feature net file '{path}' lacks architecture metadata {missing}; re-save it")
    model = FeatureNet(**{k: int(metadata[k]) for k in _ARCH_KEYS})
    model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False)


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background -1 padding), a cheap augmentation."""
    if max_shift == 0:
        return x
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    size = x.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    return torch.stack(
        [padded[i, :, a : a + size, b : b + size] for i, (a, b) in enumerate(offsets.tolist())]
    )


def train_feature_net(
    model: FeatureNet,
    loader: DataLoader,
    *,
    epochs: int = 30,
    lr: float = 2e-3,
    max_shift: int = 1,
    seed: int = 0,
) -> FeatureNet:
    """Train with AdamW and cross-entropy, cosine learning-rate decay, random shifts; returns the eval-mode model."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    model.train()
    for _ in tqdm(range(epochs), desc="feature net", unit="epoch"):
        for x, y in loader:
            loss = F.cross_entropy(model(_random_shift(x, max_shift, generator)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def calibrate_features(model: FeatureNet, loader: DataLoader) -> FeatureNet:
    """Fix the feature standardisation from the data of ``loader``: shift = mean, scale^2 = mean variance."""
    model.eval()
    model.feature_shift.zero_()
    model.feature_scale.fill_(1.0)
    features = torch.cat([model.features_and_logits(x)[0] for x, _ in loader]).double()
    model.feature_shift.copy_(features.mean(0))
    model.feature_scale.fill_(float(features.var(0).mean().sqrt()))
    return model


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` over every (x, y) batch of ``loader``."""
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("evaluate_accuracy got an empty loader")
    return correct / total
