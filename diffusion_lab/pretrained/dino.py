"""DINO ViT (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") via timm,
from a local weights file, with access to each block's attention keys, queries, values and tokens.

DiffuseIT (Kwon & Ye 2023, sec. 3.2) uses DINO ViT-B/8 at 224x224: its structure loss compares the
self-similarity of the **keys** of the last block (qkv projection, all heads concatenated, (1 + 784) x 768
with [CLS] at token 0), its style losses the **[CLS] token** of the last block's output before the final
LayerNorm. :meth:`DinoViT.forward` returns exactly those for any chosen blocks::

    feats = dino(images, blocks=(-1,))         # images in [-1, 1], any size (resized to 224)
    keys = feats.keys[-1]                       # (B, 1 + N, D)
    cls = feats.cls(-1)                          # (B, D)

Weights: the official DINO release (``dino_vitbase8_pretrain.pth`` ...; full training checkpoints with a
``teacher`` entry are accepted too) or timm's ``model.safetensors`` of ``timm/vit_base_patch8_224.dino``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.pretrained.safe_load import load_state_dict_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm architecture -> file name of the official DINO release (dl.fbaipublicfiles.com/dino/<stem>/<file>).
DINO_RELEASE_FILES = {
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain.pth",
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain.pth",
}


def where_to_get(arch: str) -> str:
    """Where the weights of a DINO architecture are published."""
    release = DINO_RELEASE_FILES.get(arch)
    official = f"https://dl.fbaipublicfiles.com/dino/{release[:-4]}/{release} or " if release else ""
    return f"{official}https://huggingface.co/timm/{arch} (file model.safetensors)"


@dataclass
class ViTFeatures:
    """Per-block features, keyed by the block indices as requested (negative indices allowed).

    ``queries`` / ``keys`` / ``values``: (B, T, D) slices of the block's qkv projection, all heads
    concatenated (head-major), T = prefix tokens + patches with [CLS] at 0. ``tokens``: the block's output
    (B, T, D), before the final LayerNorm.
    """

    queries: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    tokens: dict[int, Tensor] = field(default_factory=dict)

    def cls(self, block: int) -> Tensor:
        """[CLS] token (B, D) of a block's output."""
        return self.tokens[block][:, 0]


class _StopForward(Exception):
    """Raised by a hook once the deepest requested block has run: later blocks are not computed."""


class DinoViT(nn.Module):
    """A timm ``VisionTransformer`` with DINO's input normalisation and per-block feature hooks.

    Args:
        vit: the timm model (``num_classes=0``).
        mean, std: input normalisation (ImageNet's for DINO).
    """

    def __init__(
        self, vit: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.vit = vit.eval()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.img_size)  # type: ignore[return-value]

    def preprocess(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> resized to the model's input size and ImageNet-normalised.

        Bilinear resizing without antialiasing keeps the map smooth for guidance gradients.
        """
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(
        self, images: Tensor, blocks: Sequence[int] = (-1,), *, preprocess: bool = True
    ) -> ViTFeatures:
        """Run the ViT up to the deepest requested block and collect its q/k/v and output tokens."""
        if not blocks:
            raise ValueError("blocks must name at least one block index")
        for b in blocks:
            if not -self.depth <= b < self.depth:
                raise ValueError(f"block index {b} out of range for a ViT with {self.depth} blocks")
        x = self.preprocess(images) if preprocess else images
        feats, dim = ViTFeatures(), self.vit.embed_dim
        deepest = max(b % self.depth for b in blocks)
        handles = []

        def on_qkv(block: int):
            def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:  # out: (B, T, 3 D)
                feats.queries[block], feats.keys[block], feats.values[block] = out.split(dim, dim=-1)

            return hook

        def on_block(block: int):
            def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:
                feats.tokens[block] = out

            return hook

        try:
            for b in blocks:
                module = self.vit.blocks[b]
                handles.append(module.attn.qkv.register_forward_hook(on_qkv(b)))
                handles.append(module.register_forward_hook(on_block(b)))
            # registered last, so it runs after the deepest block's own hooks
            handles.append(self.vit.blocks[deepest].register_forward_hook(_raise_stop))
            self.vit.forward_features(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return feats


def _raise_stop(*_: object) -> None:
    raise _StopForward


def _strip_prefixes(state: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Map DINO release / training-checkpoint names onto timm's: drop ``module.`` / ``backbone.``
    prefixes and the projection head (``head.*``) a backbone without classifier does not have."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if key.startswith("head.") and key not in model_keys:
            continue
        out[key] = value
    return out


def load_dino(
    path: str | os.PathLike,
    arch: str = "vit_base_patch8_224.dino",
    *,
    device: torch.device | str = "cpu",
    **model_kwargs,
) -> DinoViT:
    """Build timm's ``arch`` without weights (``pretrained=False``), load a local DINO weights file strictly.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size``, or tiny test sizes).
    """
    state = load_state_dict_file(path, what=f"DINO {arch}", where_to_get=where_to_get(arch))
    import timm  # imported after the file check: a missing file fails fast

    vit = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    model_keys = set(vit.state_dict())
    state = _strip_prefixes(state, model_keys)
    missing, unexpected = sorted(model_keys - set(state)), sorted(set(state) - model_keys)
    if missing or unexpected:
        raise ValueError(
            f"'{path}' does not match timm {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            f"Is it a DINO checkpoint of this architecture ({where_to_get(arch)})?"
        )
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatch: another size of the same family
        raise ValueError(f"'{path}' has tensors of other shapes than timm {arch}: {err}") from err
    return DinoViT(vit).to(device)


__all__ = ["DINO_RELEASE_FILES", "DinoViT", "ViTFeatures", "load_dino", "where_to_get"]
