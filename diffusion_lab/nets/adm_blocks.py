"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 3).

Module and parameter names follow the public openai/guided-diffusion checkpoints so that their state dicts
load with ``strict=True``; the implementation is this project's own. Facts that matter for compatibility:

* ``GroupNorm32``: 32 groups, computed in float32 and cast back (keeps fp16 torsos stable).
* ``ResBlock``: ``in_layers = [norm, SiLU, conv3x3]``, ``emb_layers = [SiLU, linear]``,
  ``out_layers = [norm, SiLU, dropout, conv3x3 (zero-init)]``; with ``use_scale_shift_norm`` the embedding
  gives ``(scale, shift)`` and ``h = norm(h) (1 + scale) + shift`` (adaptive group norm, ADM sec. 3.1);
  up/down-sampling blocks resample between the first norm/activation and the first conv.
* Attention over the flattened pixels with a 1x1 ``qkv`` conv. The "legacy" order splits heads first and
  then (q, k, v) within each head; the "new" order splits (q, k, v) first and then heads.
* ``AttentionPool2d`` (the noisy classifier's head, after CLIP): prepend the spatial mean token, add a
  learned positional embedding, multi-head attention, read out token 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups evaluated in at least float32, output in the input dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float16 -> float32, float64 stays
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (output convs start as the identity residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedBlock(nn.Module):
    """Marker: a block whose forward takes ``(h, emb)`` instead of ``h``."""


class EmbedSequential(nn.Sequential):
    """A sequence that hands the (B, E) embedding to the children that take one (:class:`EmbedBlock`)."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, emb) if isinstance(layer, EmbedBlock) else layer(h)
        return h


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 conv or by 2x2 average pooling (key ``op`` either way)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError(
                    f"average-pool downsampling keeps channels, got {channels} -> {out_channels}"
                )
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(EmbedBlock):
    """Residual block conditioned on the timestep embedding (ADM sec. 3; BigGAN-style up/down variant).

    Shapes: ``x`` (B, C, H, W), ``emb`` (B, E) -> (B, C_out, H', W') with ``H' = 2H`` (up), ``H/2`` (down)
    or ``H``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:  # resample after norm + SiLU, before the conv (BigGAN residual up/down)
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, num_heads: int, legacy_order: bool) -> Tensor:
    """Multi-head softmax attention ``softmax(q^T k / sqrt(d)) v`` on a fused (B, 3 H d, T) projection.

    ``legacy_order``: channels are laid out (head, [q|k|v], d); otherwise ([q|k|v], head, d).
    Returns (B, H d, T).
    """
    b, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    d = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(b, num_heads, 3 * d, length).split(d, dim=2)  # each (B, H, d, T)
    else:
        q, k, v = (t.reshape(b, num_heads, d, length) for t in qkv.chunk(3, dim=1))
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(b, num_heads * d, length)  # (B, H d, T)


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """``num_head_channels`` (if not -1) fixes the width per head and overrides ``num_heads``."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Self-attention over all pixels with a residual connection: ``x + proj_out(attn(qkv(norm(x))))``."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = resolve_num_heads(channels, num_heads, num_head_channels)
        self.legacy_order = not use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, HW)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP's ResNet head, used by the ADM classifier): (B, C, S, S) -> (B, out_dim).

    Query token = spatial mean; a learned positional embedding (C, S^2 + 1) is added to all tokens;
    heads of ``head_channels`` channels in the "new" (q|k|v first) order; the output is token 0.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = resolve_num_heads(embed_dim, 1, head_channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)  # (B, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # (B, C, HW + 1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.num_heads, legacy_order=False)
        return self.c_proj(x)[:, :, 0]


__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "EmbedBlock",
    "EmbedSequential",
    "GroupNorm32",
    "ResBlock",
    "Upsample",
    "qkv_attention",
    "resolve_num_heads",
]
