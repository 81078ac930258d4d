"""Few-shot embedding networks: Conv-4, ResNet-12 and any timm backbone (the AMDIM encoder is in
``encoders_amdim.py`` and re-exported here).

Every embedding network maps images (B, C, H, W) to embeddings (B, out_dim) and exposes ``out_dim``, so
heads (SimCLR projection, supervised classifier) are sized without a dummy forward. Inputs are in the
data range of ``diffusion_lab.data`` ([-1, 1]); no further normalisation happens inside.

* Conv-4 (Vinyals et al. 2016; Snell et al. 2017, "Prototypical Networks", Sec. 3.2): four blocks of
  3x3 conv (``hidden`` channels) - batch norm - ReLU - 2x2 max pool.
* ResNet-12 (Oreshkin et al. 2018, "TADAM"; Lee et al. 2019, "MetaOptNet"): four residual blocks of three
  3x3 conv - BN - LeakyReLU(0.1) layers with a 1x1 conv - BN shortcut, each followed by 2x2 max pool;
  widths (64, 160, 320, 640) in the standard network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lab.nets.encoders_amdim import AmdimEncoder


class Conv4(nn.Module):
    """Conv-4 embedding (Snell et al. 2017): 4 x [conv3x3 - BN - ReLU - maxpool2], then pool or flatten.

    Args:
        in_channels: image channels.
        hidden: channels of every block (64 in the paper).
        depth: number of blocks (4 in the paper).
        pool: ``avg`` (global average pool, ``out_dim = hidden``: any input size) or ``flatten`` (the
            original: ``out_dim = hidden * (resolution // 2**depth)**2``, e.g. 1600 at 84x84).
        resolution: input size, needed only for ``pool="flatten"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden: int = 64,
        depth: int = 4,
        pool: Literal["avg", "flatten"] = "avg",
        resolution: int = 84,
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"need depth >= 1 and hidden >= 1, got depth={depth}, hidden={hidden}")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        final = resolution // 2**depth
        if pool == "flatten" and final < 1:
            raise ValueError(f"resolution {resolution} is too small for {depth} pooling blocks")
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.out_dim = hidden if pool == "avg" else hidden * final * final

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (B, hidden, H / 2^depth, W / 2^depth)
        return h.mean(dim=(2, 3)) if self.pool == "avg" else h.flatten(1)


class _ResNet12Block(nn.Module):
    """Three conv3x3-BN layers with LeakyReLU(0.1), a conv1x1-BN shortcut, then LeakyReLU and maxpool2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.1)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            act,
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            act,
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 embedding (Oreshkin et al. 2018; Lee et al. 2019): 4 residual blocks, global average pool.

    Args:
        in_channels: image channels.
        widths: channels of the four blocks ((64, 160, 320, 640) in the standard network).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640)) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        blocks, prev = [], in_channels
        for width in widths:
            blocks.append(_ResNet12Block(prev, width))
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x).mean(dim=(2, 3))


class TimmEncoder(nn.Module):
    """Any timm backbone by name as an embedding network (pooled features, classifier removed).

    Args:
        name: a ``timm.list_models()`` name, e.g. ``resnet18`` or ``vit_small_patch16_224``.
        in_channels: image channels.
        weights: optional local file of backbone weights (safetensors or a torch.save state dict); nothing
            is downloaded. The classifier entries of a full timm checkpoint are ignored.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size`` for ViTs).
    """

    def __init__(
        self,
        name: str = "resnet18",
        in_channels: int = 3,
        weights: str | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for valid names")
        self.backbone = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_channels, **(model_kwargs or {})
        )
        self.out_dim = int(self.backbone.num_features)
        if weights is not None:
            self.load_backbone_weights(weights, name)

    def load_backbone_weights(self, path: str | Path, name: str) -> None:
        from diffusion_lab.pretrained.safe_load import load_state_dict_file

        state = load_state_dict_file(
            path,
            what=f"timm backbone '{name}'",
            where_to_get=f"the timm/Hugging Face model card of '{name}' (download it on a connected machine)",
        )
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        head_keys = {k for k in unexpected if k.split(".")[0] in ("fc", "head", "classifier", "last_linear")}
        if missing or set(unexpected) - head_keys:
            raise ValueError(
                f"weights '{path}' do not fit timm '{name}': missing {missing[:5]}, "
                f"unexpected {sorted(set(unexpected) - head_keys)[:5]}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def embedding_dim(network: nn.Module) -> int:
    """``out_dim`` of an embedding network, with a clear error for modules that do not declare it."""
    out_dim = getattr(network, "out_dim", None)
    if not isinstance(out_dim, int):
        raise TypeError(
            f"{type(network).__name__} has no integer attribute `out_dim`; few-shot embedding networks "
            f"must declare their embedding size (see diffusion_lab.nets.encoders)"
        )
    return out_dim


@torch.no_grad()
def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


__all__ = ["AmdimEncoder", "Conv4", "ResNet12", "TimmEncoder", "count_parameters", "embedding_dim"]
