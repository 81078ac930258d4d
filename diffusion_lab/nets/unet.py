"""DDPM++ / ADM-style UNet backbone ``F(x, c_noise, labels=None, **scalars)``.

Architecture after Ho et al. 2020 (DDPM, appendix B), Song et al. 2021 (DDPM++, "Score-Based Generative
Modeling through SDEs", appendix H) and Dhariwal & Nichol 2021 (ADM, sec. 3):

* residual blocks ``y = s * (skip(x) + conv(dropout(act(norm(conv(act(norm(x))) + e)))))`` with
  GroupNorm, SiLU and the condition vector ``e`` added per channel, or, with ``scale_shift=True``
  (ADM's "adaptive group normalisation"), ``norm(h) * (1 + scale) + shift`` with ``(scale, shift) = W e``;
* multi-head self-attention ``softmax(Q K^T / sqrt(d)) V`` at the chosen resolutions (and in the middle);
* a down path of ``num_res_blocks`` blocks per level, an up path of ``num_res_blocks + 1`` blocks per level
  that each concatenate one stored skip activation, strided-conv / nearest+conv resampling between levels;
* one condition vector from ``ConditionEmbedding`` (noise level, class label with a learned null label,
  extra scalars such as ``guidance_w``); see ``diffusion_lab.nets.embeddings``.

Documented configurations (``channel_mult`` gives each level's width as a multiple of ``base_channels``):

* CIFAR-10 32x32, DDPM++ as in EDM (Karras et al. 2022, Table 7; 54M parameters here):
  ``base_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attention_resolutions=(16,),
  dropout=0.13, num_heads=1, skip_scale=0.7071`` -- these are the constructor defaults.
* ADM-style (ImageNet 64): ``base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
  attention_resolutions=(32, 16, 8), num_heads=3 (64 channels per head), scale_shift=True, skip_scale=1``.
* 8x8 digits (CPU): ``in_channels=1, resolution=8, base_channels=32, channel_mult=(1, 2),
  num_res_blocks=2, attention_resolutions=(4,)`` -- resolutions 8 and 4.

Per-block hooks: ``block_hooks`` is an ``nn.ModuleList`` of ``nn.Identity`` with one entry per residual
block (with its attention) in forward order -- down path, the two middle blocks, up path -- and none
after the resampling layers. ``block_channels[i]`` is the width seen by hook ``i``. Replace an entry with
any module mapping (N, C, H, W) -> (N, C, H, W) to insert a layer there (DSNO's temporal spectral
convolutions do this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.nets.embeddings import ConditionEmbedding, NoiseEmbedding


def group_norm(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= max_groups, dividing ``channels``) of >= 4 channels each.

    The floor on the group size matters for narrow nets: with one channel per group the norm would
    subtract each channel's mean and erase an additive per-channel condition (as in EDM's GroupNorm).
    """
    limit = max(1, min(max_groups, channels // min_channels_per_group))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with additive or scale-shift (FiLM) conditioning (module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        scale_shift: bool = False,
        skip_scale: float = 1.0,
        norm_groups: int = 32,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.scale_shift, self.skip_scale = scale_shift, skip_scale
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:  # each block starts as (scaled) identity on its skip path (ADM's zero_module)
            _zero_(self.conv2)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm2(h + e))
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) * self.skip_scale


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions: ``x + proj(softmax(Q K^T / sqrt(d)) V)``.

    ``qkv`` is a 1x1 conv from C to 3C channels laid out as (3, num_heads, d) with ``d = C / num_heads``:
    channels ``[0, C)`` are the queries, ``[C, 2C)`` the keys, ``[2C, 3C)`` the values, each split into
    heads of ``d`` consecutive channels. Input is GroupNorm-ed first; the output is scaled by ``skip_scale``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        skip_scale: float = 1.0,
        norm_groups: int = 32,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads, self.skip_scale = num_heads, skip_scale
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        if zero_init:
            _zero_(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * self.skip_scale


class UNetBlock(nn.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention if attention is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attention(self.res(x, emb))


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM++/ADM-style UNet ``F(x, c_noise, labels=None, **scalars) -> (B, out_channels, H, W)``.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output (default: ``in_channels``).
        resolution: height = width of the input; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        base_channels: width unit; level ``i`` has ``base_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level on the down path (up path: one more).
        attention_resolutions: resolutions (e.g. ``(16,)``) whose blocks get self-attention; None (default)
            means the second level, ``resolution // 2`` (16 for 32x32 as in DDPM++), if there is one.
        dropout: dropout probability inside residual blocks.
        num_heads: attention heads.
        num_classes: number of classes (0: unconditional). The class embedding has one extra row, the
            null label ``num_classes``, which ``labels=None`` selects.
        scalar_conditions: names of extra scalar inputs (e.g. ``["guidance_w"]``), each passed to
            ``forward`` as a keyword (B,) tensor and embedded as ``W sinusoid(1000 s)``.
        scale_shift: FiLM conditioning ``norm(h)(1 + scale) + shift`` instead of adding the embedding.
        mid_attention: self-attention in the middle block.
        skip_scale: factor applied to every residual sum (DDPM++ uses 1/sqrt(2), ADM 1).
        resample_with_conv: strided conv / nearest+conv resampling (else average pool / nearest only).
        noise_embedding: ``positional`` (sinusoidal) or ``fourier`` embedding of ``c_noise``.
        noise_embedding_scale: see ``ConditionEmbedding``; 1 works for timesteps 0..999 and ln(sigma)/4.
        emb_dim: width of the condition vector (default ``4 * base_channels``).
        norm_groups: maximum GroupNorm group count.
        zero_init: zero-initialise the output conv and the last layer of every residual and attention
            branch, so the untrained network outputs exactly zero and every block starts as identity.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        resolution: int = 32,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] | None = None,
        dropout: float = 0.13,
        num_heads: int = 1,
        num_classes: int = 0,
        scalar_conditions: Sequence[str] = (),
        scale_shift: bool = False,
        mid_attention: bool = True,
        skip_scale: float = math.sqrt(0.5),
        resample_with_conv: bool = True,
        noise_embedding: NoiseEmbedding = "positional",
        noise_embedding_scale: float = 1.0,
        emb_dim: int | None = None,
        norm_groups: int = 32,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        channel_mult = list(channel_mult)
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1 or not channel_mult:
            raise ValueError(
                f"need in_channels, base_channels, num_res_blocks >= 1 and a non-empty channel_mult; got "
                f"{in_channels}, {base_channels}, {num_res_blocks}, {channel_mult}"
            )
        factor = 2 ** (len(channel_mult) - 1)
        if resolution < 1 or resolution % factor:
            raise ValueError(
                f"resolution {resolution} must be divisible by the downsampling factor {factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={channel_mult})"
            )
        level_resolutions = [resolution // 2**i for i in range(len(channel_mult))]
        if attention_resolutions is None:
            attention_resolutions = level_resolutions[1:2]
        unknown = sorted(set(attention_resolutions) - set(level_resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not among this UNet's resolutions {level_resolutions}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.scalar_conditions = list(scalar_conditions)
        emb_dim = emb_dim if emb_dim is not None else 4 * base_channels
        self.condition = ConditionEmbedding(
            emb_dim,
            base_channels,
            num_classes=num_classes,
            scalar_conditions=scalar_conditions,
            noise_embedding=noise_embedding,
            noise_embedding_scale=noise_embedding_scale,
        )

        def block(c_in: int, c_out: int, attn: bool) -> UNetBlock:
            res = ResBlock(c_in, c_out, emb_dim, dropout, scale_shift, skip_scale, norm_groups, zero_init)
            att = AttentionBlock(c_out, num_heads, skip_scale, norm_groups, zero_init) if attn else None
            self.block_channels.append(c_out)
            return UNetBlock(res, att)

        self.block_channels: list[int] = []
        ch = base_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(
                    block(ch, base_channels * mult, level_resolutions[level] in attention_resolutions)
                )
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch, resample_with_conv))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([block(ch, ch, mid_attention), block(ch, ch, False)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            out_ch = base_channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                attn = level_resolutions[level] in attention_resolutions
                self.up.append(block(ch + skip_channels.pop(), out_ch, attn))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch, resample_with_conv))
        self.out_norm = group_norm(ch, norm_groups)
        self.out_conv = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        if zero_init:
            _zero_(self.out_conv)
        self.block_hooks = nn.ModuleList(nn.Identity() for _ in self.block_channels)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNet expects input of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(in_channels={self.in_channels}, resolution={self.resolution}), got {tuple(x.shape)}"
            )

    def forward(
        self, x: Tensor, c_noise: Tensor | float, labels: Tensor | None = None, **scalars: Tensor
    ) -> Tensor:
        """x (B, C_in, R, R), c_noise () or (B,), labels (B,) long or None -> (B, C_out, R, R)."""
        self._check_input(x)
        dtype = self.input_conv.weight.dtype
        emb = self.condition(c_noise, x.shape[0], labels, scalars)
        hooks = iter(self.block_hooks)
        h = self.input_conv(x.to(dtype))
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else next(hooks)(layer(h, emb))
            skips.append(h)
        for layer in self.mid:
            h = next(hooks)(layer(h, emb))
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = next(hooks)(layer(torch.cat([h, skips.pop()], dim=1), emb))
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)


__all__ = ["AttentionBlock", "Downsample", "ResBlock", "UNet", "UNetBlock", "Upsample", "group_norm"]
