"""ADM: the UNet and noisy classifier of Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image
Synthesis", compatible with the public openai/guided-diffusion checkpoints.

``ADMUNet`` predicts ``eps`` (and, with ``learn_sigma``, the interpolation ``v`` of the learned variance,
Nichol & Dhariwal 2021 eq. 15, in 3 extra channels) from ``(x_t, t)`` with ``x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps`` and integer (or fractional) training timesteps ``t`` in ``[0, 999]``.
``ADMClassifier`` is the encoder half with an attention-pool head: ``logits = f(x_t, t)``, the
``p(y | x_t)`` of classifier guidance (ADM sec. 4, Algorithm 1).

Parameter names and shapes equal the public checkpoints' (``load_state_dict(strict=True)`` works); the
named :data:`PRESETS` carry the flags published with each checkpoint and :func:`from_preset` builds them.
Build large presets on ``device="meta"`` to inspect names and shapes without allocating memory.
Wrapping as a VE-view ``Denoiser`` lives in :mod:`diffusion_lab.pretrained.guided_diffusion`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.nets.adm_blocks import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    EmbedSequential,
    GroupNorm32,
    ResBlock,
    Upsample,
    _zero,
)
from diffusion_lab.nets.embeddings import sinusoidal_embedding

NUM_IMAGENET_CLASSES = 1000

# Channel multipliers guided-diffusion uses for each image size when none is given.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# The flags published with each public checkpoint (guided-diffusion README), in its own vocabulary.
_DIFFUSION_256 = dict(
    attention_resolutions="32,16,8", diffusion_steps=1000, image_size=256, learn_sigma=True,
    noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_fp16=True, use_scale_shift_norm=True,
)  # fmt: skip
_CLASSIFIER = dict(
    classifier_use_fp16=True, classifier_width=128, classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention",
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "64x64_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
        learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
        resblock_updown=True, use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "128x128_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=128,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_heads=4, num_res_blocks=2,
        resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "256x256_diffusion": dict(_DIFFUSION_256, class_cond=True),
    "256x256_diffusion_uncond": dict(_DIFFUSION_256, class_cond=False),
    "64x64_classifier": dict(_CLASSIFIER, image_size=64, classifier_depth=4),
    "128x128_classifier": dict(_CLASSIFIER, image_size=128, classifier_depth=2),
    "256x256_classifier": dict(_CLASSIFIER, image_size=256, classifier_depth=2),
}  # fmt: skip

# guided-diffusion's defaults for flags a checkpoint's published flags leave out.
_UNET_FLAG_DEFAULTS: dict[str, Any] = dict(
    num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
)  # fmt: skip
_CLASSIFIER_FLAG_DEFAULTS: dict[str, Any] = dict(
    classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)  # fmt: skip


def _convert_to_fp16(module: nn.Module) -> None:
    """Cast conv weights to float16, as guided-diffusion does; norms and the embedding projections stay
    float32 (GroupNorm32 upcasts its input, ResBlock casts the projected embedding to the features' dtype)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            m.half()


class _ADMTorso(nn.Module):
    """Time embedding, encoder path and middle block shared by :class:`ADMUNet` and :class:`ADMClassifier`.

    Args follow guided-diffusion's ``UNetModel``: ``attention_resolutions`` are downsampling rates (1, 2, 4,
    ...) at which attention is used; ``num_head_channels`` (if not -1) overrides ``num_heads``. Sets
    ``time_embed``, ``input_blocks``, ``middle_block`` on the module (the checkpoint's top-level names) and
    returns the block factories for the decoder.
    """

    def _build_torso(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
        use_checkpoint: bool,
    ) -> tuple[Callable[..., ResBlock], Callable[..., AttentionBlock]]:
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch_in: int, ch_out: int | None = None, **updown: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, use_checkpoint=use_checkpoint, **updown
            )

        def attn(ch: int, heads: int = num_heads) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order, use_checkpoint)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(res(ch), attn(ch), res(ch))
        self.bottleneck_channels, self.downsampling = ch, ds
        return res, attn

    def embed(self, timesteps: Tensor | float, x: Tensor) -> Tensor:
        """(B,) possibly fractional timesteps -> (B, 4 model_channels) embedding."""
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(-1)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"got {t.shape[0]} timesteps for a batch of {x.shape[0]}")
        return self.time_embed(
            sinusoidal_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        )

    @property
    def torso_dtype(self) -> torch.dtype:
        """dtype the encoder / decoder run in: float16 after :meth:`convert_to_fp16`, else the weights'."""
        return self.input_blocks[0][0].weight.dtype

    def encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder path and middle block; returns the bottleneck and the skip activations."""
        h, skips = x.to(self.torso_dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips


class ADMUNet(_ADMTorso):
    """Guided-diffusion UNet (ADM): ``model(x_t, timesteps, y=None) -> (B, out_channels, H, W)``.

    Args mirror guided-diffusion's ``UNetModel``; ``out_channels`` is 6 for ``learn_sigma`` checkpoints
    (eps in the first 3 channels), ``num_classes`` is set for class-conditional ones (labels ``y``).
    ``use_fp16`` casts the torso's convolutions to float16 (the published sampling setting; GPU only).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 3,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (2, 4),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes = num_classes
        res, attn = self._build_torso(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, use_checkpoint,
        )  # fmt: skip
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, 4 * model_channels)
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        skips, ch, ds = list(self.skip_channels), self.bottleneck_channels, self.downsampling
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Run the encoder, middle and decoder blocks in float16 (embeddings and output head stay float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            _convert_to_fp16(part)

    def forward(self, x: Tensor, timesteps: Tensor | float, y: Tensor | None = None) -> Tensor:
        """(B, C, H, W) noisy VP input, (B,) timesteps in [0, T-1], (B,) labels y -> (B, C_out, H, W)."""
        if (y is None) != (self.num_classes is None):
            need = (
                "needs class labels y" if self.num_classes is not None else "is unconditional: pass no labels"
            )
            raise ValueError(f"ADMUNet {need} (num_classes={self.num_classes})")
        emb = self.embed(timesteps, x)
        if y is not None:
            emb = emb + self.label_emb(y)
        h, skips = self.encode(x, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class ADMClassifier(_ADMTorso):
    """Guided-diffusion noisy classifier (``EncoderUNetModel``, ``pool="attention"`` or ``"adaptive"``):
    ``classifier(x_t, timesteps) -> (B, num_classes)`` logits of ``p(y | x_t)``."""

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = NUM_IMAGENET_CLASSES,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 16, 32),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
        pool: str = "attention",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self._build_torso(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, use_checkpoint,
        )  # fmt: skip
        ch, ds = self.bottleneck_channels, self.downsampling
        if pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (guided-diffusion uses 64)")
            head: nn.Module = AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), head)
        elif pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                _zero(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        else:
            raise ValueError(f"unsupported classifier pool {pool!r}; expected 'attention' or 'adaptive'")
        self.image_size, self.num_classes = image_size, out_channels
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Run the encoder and middle blocks in float16 (the head stays float32)."""
        for part in (self.input_blocks, self.middle_block):
            _convert_to_fp16(part)

    def forward(self, x: Tensor, timesteps: Tensor | float) -> Tensor:
        """(B, C, H, W) noisy VP input, (B,) timesteps -> (B, num_classes) logits."""
        h, _ = self.encode(x, self.embed(timesteps, x))
        return self.out(h.to(x.dtype))


def _parse_resolutions(spec: str | Sequence[int], image_size: int) -> tuple[int, ...]:
    """guided-diffusion's ``"32,16,8"`` (feature-map sizes) -> downsampling rates ``image_size // res``."""
    sizes = [int(s) for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    return tuple(image_size // s for s in sizes)


def _channel_mult(spec: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    if spec in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult")
        return DEFAULT_CHANNEL_MULT[image_size]
    return tuple(float(c) for c in spec.split(",")) if isinstance(spec, str) else tuple(spec)


def unet_from_flags(flags: Mapping[str, Any]) -> ADMUNet:
    """Build an :class:`ADMUNet` from guided-diffusion's flag vocabulary (``num_channels``, ``class_cond``,
    ``learn_sigma``, ``attention_resolutions="32,16,8"``, ...); missing flags take its defaults."""
    unknown = set(flags) - set(_UNET_FLAG_DEFAULTS) - {"image_size"}
    if unknown:
        raise ValueError(f"unknown ADM UNet flags {sorted(unknown)}; known: {sorted(_UNET_FLAG_DEFAULTS)}")
    f = {**_UNET_FLAG_DEFAULTS, **flags}
    size = int(f["image_size"])
    return ADMUNet(
        image_size=size,
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_parse_resolutions(f["attention_resolutions"], size),
        dropout=f["dropout"],
        channel_mult=_channel_mult(f["channel_mult"], size),
        num_classes=NUM_IMAGENET_CLASSES if f["class_cond"] else None,
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
        use_checkpoint=f["use_checkpoint"],
    )


def classifier_from_flags(flags: Mapping[str, Any]) -> ADMClassifier:
    """Build an :class:`ADMClassifier` from guided-diffusion's ``classifier_*`` flags."""
    unknown = set(flags) - set(_CLASSIFIER_FLAG_DEFAULTS) - {"image_size"}
    if unknown:
        raise ValueError(
            f"unknown ADM classifier flags {sorted(unknown)}; known: {sorted(_CLASSIFIER_FLAG_DEFAULTS)}"
        )
    f = {**_CLASSIFIER_FLAG_DEFAULTS, **flags}
    size = int(f["image_size"])
    return ADMClassifier(
        image_size=size,
        model_channels=f["classifier_width"],
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=_parse_resolutions(f["classifier_attention_resolutions"], size),
        channel_mult=_channel_mult("", size),
        use_fp16=f["classifier_use_fp16"],
        num_head_channels=64,
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


def is_classifier_preset(name: str) -> bool:
    return name in PRESETS and "classifier_width" in PRESETS[name]


def from_preset(
    name: str, *, device: torch.device | str | None = None, **overrides: Any
) -> ADMUNet | ADMClassifier:
    """Build the network of a public guided-diffusion checkpoint by name (keys of :data:`PRESETS`).

    ``overrides`` replace published flags (e.g. ``use_fp16=False`` on a CPU). ``device="meta"`` builds
    parameters without storage (for inspecting names and shapes of the 256x256 models).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown ADM preset {name!r}; available: {sorted(PRESETS)}")
    flags = {**PRESETS[name], **overrides}
    with torch.device(device) if device is not None else nullcontext():
        return classifier_from_flags(flags) if is_classifier_preset(name) else unet_from_flags(flags)


__all__ = [
    "ADMClassifier",
    "ADMUNet",
    "DEFAULT_CHANNEL_MULT",
    "PRESETS",
    "classifier_from_flags",
    "from_preset",
    "is_classifier_preset",
    "unet_from_flags",
]
