"""CLIP (Radford et al. 2021) image and text encoders via open_clip, from a local checkpoint file.

DiffuseIT's text-guided losses (Kwon & Ye 2023) compare unit-normalised CLIP embeddings of ``x0_hat`` with
text embeddings (an ensemble of RN50, RN50x4, ViT-B/32, RN50x16, ViT-B/16, or ViT-B/32 alone).
:class:`ClipEncoder` takes images in [-1, 1] at any size, resizes them to the model's input (bicubic, as
CLIP's preprocessing), applies CLIP's normalisation (OpenAI's mean/std), and returns unit vectors; text goes
through the BPE tokenizer bundled with open_clip (``bpe_simple_vocab_16e6.txt.gz``), which needs no network.

Weights: open_clip's format, e.g. ``open_clip_model.safetensors`` of ``timm/vit_base_patch32_clip_224.openai``
on the Hugging Face hub. OpenAI's original ``ViT-B-32.pt`` files are TorchScript archives and are refused by
the safe loader (they carry code).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.pretrained.safe_load import load_state_dict_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip architecture -> Hugging Face repository holding its OpenAI weights in open_clip's format.
CLIP_HF_REPOS = {
    "RN50": "timm/resnet50_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai",
    "RN50x16": "timm/resnet50x16_clip.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
}


def where_to_get(arch: str) -> str:
    repo = CLIP_HF_REPOS.get(arch)
    if repo is None:
        return f"an open_clip state dict of {arch} (open_clip's pretrained list names its source)"
    return f"https://huggingface.co/{repo} (file open_clip_model.safetensors)"


class ClipEncoder(nn.Module):
    """Unit-normalised CLIP image and text embeddings (B, E) from images in [-1, 1] and strings.

    Args:
        model: an open_clip ``CLIP`` model.
        tokenizer: callable ``list[str] -> LongTensor (B, context_length)``.
        mean, std: image normalisation (OpenAI's for the OpenAI checkpoints).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> resized (bicubic) to the model input and CLIP-normalised."""
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        return ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """BPE token ids (B, context_length) on the model's device."""
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        return tokens.to(self.mean.device)

    def encode_image(self, images: Tensor, *, preprocess: bool = True) -> Tensor:
        """Unit-norm image embeddings (B, E); differentiable in ``images``."""
        features = self.model.encode_image(self.preprocess(images) if preprocess else images)
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, texts: str | Sequence[str] | Tensor) -> Tensor:
        """Unit-norm text embeddings (B, E) of strings or token ids."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(
    path: str | os.PathLike,
    arch: str = "ViT-B-32",
    *,
    quick_gelu: bool = True,
    model_cfg: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> ClipEncoder:
    """Build open_clip's ``arch`` without weights and load a local open_clip state dict strictly.

    Args:
        quick_gelu: the OpenAI checkpoints were trained with QuickGELU (open_clip's ``*-quickgelu`` models).
        model_cfg: an explicit open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``) instead of the
            named architecture's (custom or tiny models). The tokenizer uses its ``context_length``.
    """
    state = load_state_dict_file(path, what=f"CLIP {arch}", where_to_get=where_to_get(arch))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    import open_clip  # imported after the file check: a missing file fails fast

    cfg = dict(open_clip.get_model_config(arch) or {}) if model_cfg is None else dict(model_cfg)
    if not cfg:
        raise KeyError(
            f"unknown open_clip architecture {arch!r}; pass model_cfg or one of {list(CLIP_HF_REPOS)}"
        )
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**cfg, quick_gelu=quick_gelu)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"'{path}' is not an open_clip {arch} state dict ({where_to_get(arch)}): {err}"
        ) from err
    return ClipEncoder(model, tokenizer).to(device)


__all__ = ["CLIP_HF_REPOS", "ClipEncoder", "load_clip", "where_to_get"]
