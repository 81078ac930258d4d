"""DSNO's temporal convolution in Fourier space and the trajectory wrapper (Zheng et al., ICML 2023, sec. 4).

**Temporal spectral convolution.** For features ``h`` of ``M`` trajectory time points, shape (B, M, C, *S),
an rFFT along the time axis, a learned complex multiplication of the lowest ``K`` modes mixing channels
(weights ``W_k`` of shape (C_in, C_out), k < K), then an inverse rFFT (Zheng et al. 2023, eq. 9; the FNO layer
of Li et al. 2021, eq. 4, along time only)::

    y = irfft_M( [ (rfft_M h)_k W_k  for k < K ;  0 otherwise ] )

This is exactly a circular convolution along time whose kernel is ``kappa = irfft_M(W zero-padded to M//2+1
modes)``: ``y_m[o] = sum_{m', c} h_{m'}[c] kappa_{(m - m') mod M}[c, o]`` (the convolution theorem; the
imaginary parts of the DC and Nyquist weights are dropped by the inverse rFFT, on both sides). It is computed in
float32 whatever the autocast dtype, as in the paper's code. ``K`` is capped at ``M // 2 + 1``.

**Temporal block.** ``h + LeakyReLU(spectral(h))``, inserted after the blocks of an image backbone that runs the
M frames as one (B*M, C, H, W) batch, so the backbone's per-frame pass is mixed across the M time points. For
``nets.unet.UNet`` the blocks go into its ``block_hooks`` after every residual block (with its attention) of the
down path, after the middle attention block, and after every residual block of the up path -- not after the
resampling layers and not after the second middle block (METHODS.md, from the DSNO code). For ``nets.mlp.MLP``
they follow every residual block (forward hooks; the MLP has no hook slots). With zero weights a block is the
identity, so the wrapper is then the backbone applied frame by frame.

**Trajectory wrapper.** ``TrajectoryOperator`` maps the initial noise ``x_T`` (at ``sigma_start``) and M output
levels ``sigma_1 > ... > sigma_M >= 0`` to the whole trajectory (B, M, *shape) in one forward pass: the noise is
repeated over the M frames, each frame gets its own time embedding (a scalar condition of the backbone, the
cosine-schedule time ``tau(sigma) = (2/pi) atan(sigma)``), and frame m's output ``y_m`` (an x0-like prediction of
the preconditioned denoiser at ``sigma_start``) becomes the state by a DDIM step from ``x_T`` (Song et al. 2021,
eq. 12 in the VE view)::

    x_m = y_m + (sigma_m / sigma_start) (x_T - y_m)          (so x_M = y_M is the sample when sigma_M = 0)

With zero temporal weights and a zero-initialised frame embedding this is exactly one DDIM step of the wrapped
denoiser to every output level: DSNO initialised from a teacher starts as the teacher's 1-step DDIM. (The paper
feeds only the frame's time; the wrapper keeps the input's true level ``sigma_start`` in the noise embedding so that
the teacher's weights are used at the level they were trained for.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.nets.mlp import MLP
from diffusion_lab.nets.unet import UNet, UNetBlock

FRAME_CONDITION = "frame_time"


def cosine_time(sigma: Tensor) -> Tensor:
    """``tau = (2/pi) atan(sigma)`` in [0, 1): the VP-cosine time of a VE level (sigma = tan(pi tau / 2))."""
    return torch.atan(sigma) * (2 / math.pi)


class TemporalSpectralConv(nn.Module):
    """Fourier-space convolution along time keeping the lowest ``modes`` modes (module docstring).

    (B, M, C_in, *S) -> (B, M, C_out, *S). Weights are stored as real (C_in, C_out, modes, 2) tensors (real and
    imaginary parts), initialised like the FNO/DSNO code: ``scale * U[0, 1)`` with ``scale = 1 / (C_in C_out)``,
    or to zero with ``init_scale=0``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        modes: int = 2,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if in_channels < 1 or out_channels < 1 or modes < 1:
            raise ValueError(
                f"need in_channels, out_channels, modes >= 1; got {in_channels}, {out_channels}, {modes}"
            )
        self.in_channels, self.out_channels, self.modes = in_channels, out_channels, modes
        scale = 1.0 / (in_channels * out_channels) if init_scale is None else float(init_scale)
        self.weight = nn.Parameter(scale * torch.rand(in_channels, out_channels, modes, 2))

    def kept_modes(self, frames: int) -> int:
        """Modes actually used for ``frames`` time points: ``min(modes, frames // 2 + 1)``."""
        return min(self.modes, frames // 2 + 1)

    def complex_weight(self, frames: int) -> Tensor:
        """(C_in, C_out, K) complex weights of the kept modes."""
        return torch.view_as_complex(self.weight[:, :, : self.kept_modes(frames)].float().contiguous())

    def kernel(self, frames: int) -> Tensor:
        """The equivalent circular-convolution kernel ``irfft_M(W zero-padded)``, (C_in, C_out, M) float32."""
        spectrum = self.weight.new_zeros(
            self.in_channels, self.out_channels, frames // 2 + 1, dtype=torch.cfloat
        )
        k = self.kept_modes(frames)
        spectrum[..., :k] = self.complex_weight(frames)
        return torch.fft.irfft(spectrum, n=frames, dim=-1)

    def forward(self, h: Tensor) -> Tensor:
        if h.ndim < 3 or h.shape[2] != self.in_channels:
            raise ValueError(
                f"TemporalSpectralConv expects (B, M, {self.in_channels}, ...) features, got {tuple(h.shape)}"
            )
        frames = h.shape[1]
        k = self.kept_modes(frames)
        with torch.autocast(h.device.type, enabled=False):  # FFTs in float32 (bf16 FFTs are inaccurate)
            spectrum = torch.fft.rfft(h.float(), dim=1)  # (B, M//2+1, C_in, *S)
            out = spectrum.new_zeros(h.shape[0], frames // 2 + 1, self.out_channels, *h.shape[3:])
            out[:, :k] = torch.einsum("bkc...,cok->bko...", spectrum[:, :k], self.complex_weight(frames))
            y = torch.fft.irfft(out, n=frames, dim=1)
        return y.to(h.dtype)


class TemporalBlock(nn.Module):
    """``h + LeakyReLU(spectral(h))`` on a frame-major batch (B*M, C, *S) of ``num_frames`` = M time points.

    ``num_frames`` is set by ``TrajectoryOperator`` before each forward pass (the backbone's own call signature
    carries no frame count).
    """

    def __init__(
        self, channels: int, modes: int = 2, negative_slope: float = 0.01, init_scale: float | None = None
    ) -> None:
        super().__init__()
        self.spectral = TemporalSpectralConv(channels, channels, modes, init_scale)
        self.negative_slope = negative_slope
        self.num_frames = 1

    def forward(self, h: Tensor) -> Tensor:
        m = self.num_frames
        if h.shape[0] % m:
            raise ValueError(f"batch of {h.shape[0]} features is not a multiple of num_frames={m}")
        frames = h.reshape(h.shape[0] // m, m, *h.shape[1:])  # (B, M, C, *S)
        out = frames + F.leaky_relu(self.spectral(frames), self.negative_slope)
        return out.reshape(h.shape)


class _AfterBlock:
    """Forward hook ``output -> layer(output)``; a plain object so ``copy.deepcopy`` maps it to the copied layer."""

    def __init__(self, layer: TemporalBlock) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.layer(output)


def insert_temporal_blocks(
    network: nn.Module, modes: int = 2, init_scale: float | None = None
) -> nn.ModuleList | None:
    """Put ``TemporalBlock`` s after the blocks of ``network`` (module docstring), in place.

    ``UNet``: into its ``block_hooks`` (the blocks are then the UNet's parameters; returns None). ``MLP``: forward
    hooks after each residual block; returns the new blocks, which the caller must register as a submodule.
    """
    if isinstance(network, UNet):
        num_down = sum(isinstance(layer, UNetBlock) for layer in network.down)
        skip = num_down + 1  # the second middle block (the paper inserts after the middle attention only)
        for index, channels in enumerate(network.block_channels):
            if index == skip:
                continue
            if not isinstance(network.block_hooks[index], nn.Identity):
                raise ValueError(
                    f"UNet block_hooks[{index}] is already taken by {network.block_hooks[index]}"
                )
            network.block_hooks[index] = TemporalBlock(channels, modes, init_scale=init_scale)
        return None
    if isinstance(network, MLP):
        hidden = network.input.out_features
        layers = nn.ModuleList(TemporalBlock(hidden, modes, init_scale=init_scale) for _ in network.blocks)
        for block, layer in zip(network.blocks, layers):
            block.register_forward_hook(_AfterBlock(layer))
        return layers
    raise TypeError(
        f"cannot insert temporal layers into a {type(network).__name__}: supported backbones are "
        "diffusion_lab.nets.unet.UNet (block_hooks) and diffusion_lab.nets.mlp.MLP"
    )


class TrajectoryOperator(nn.Module):
    """DSNO operator: ``(x_T, sigma_start, sigmas (M,)) -> trajectory (B, M, *shape)`` in one pass (module doc).

    Args:
        denoiser: a preconditioned denoiser ``D(x, sigma, **cond)`` with a ``.network`` backbone (``UNet`` or
            ``MLP``), e.g. a copy of the teacher's ``Denoiser``. Temporal blocks are inserted into its network.
        modes: Fourier modes kept along time (the paper: 2).
        frame_condition: name of the backbone's scalar condition that receives each frame's time
            ``cosine_time(sigma_m)`` (None: frames differ only through the temporal layers and the DDIM step).
        init_scale: initial scale of the spectral weights (None: ``1 / (C_in C_out)``; 0: exact 1-step DDIM start).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        modes: int = 2,
        frame_condition: str | None = FRAME_CONDITION,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        network = getattr(denoiser, "network", None)
        if network is None:
            raise TypeError(
                f"TrajectoryOperator needs a denoiser with a .network backbone, got {type(denoiser)}"
            )
        self.denoiser = denoiser
        self.extra_temporal = insert_temporal_blocks(network, modes, init_scale)
        self.frame_condition = frame_condition
        self.modes = modes

    @property
    def temporal_blocks(self) -> list[TemporalBlock]:
        return [m for m in self.modules() if isinstance(m, TemporalBlock)]

    def forward(self, x_start: Tensor, sigma_start: Tensor | float, sigmas: Tensor, **cond: Any) -> Tensor:
        """x_start (B, *shape) at ``sigma_start``; sigmas (M,) descending, < sigma_start, >= 0 -> (B, M, *shape)."""
        sigmas = torch.as_tensor(sigmas, device=x_start.device).reshape(-1)
        sigma_start = torch.as_tensor(sigma_start, device=x_start.device, dtype=sigmas.dtype).reshape(())
        if sigmas.numel() < 1 or (sigmas < 0).any() or (sigmas >= sigma_start).any():
            raise ValueError(
                f"output levels must satisfy 0 <= sigma_m < sigma_start={float(sigma_start)}, got {sigmas.tolist()}"
            )
        b, m = x_start.shape[0], sigmas.numel()
        for block in self.temporal_blocks:
            block.num_frames = m
        frames = x_start.unsqueeze(1).expand(b, m, *x_start.shape[1:]).reshape(b * m, *x_start.shape[1:])
        frame_cond = {
            k: v.repeat_interleave(m, dim=0)
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b
            else v
            for k, v in cond.items()
        }
        if self.frame_condition is not None:
            frame_cond[self.frame_condition] = cosine_time(sigmas.float()).repeat(b)
        y = self.denoiser(frames, sigma_start.expand(b * m), **frame_cond)
        y = y.reshape(b, m, *x_start.shape[1:])
        ratio = (sigmas / sigma_start).to(y.dtype).reshape(1, m, *([1] * (x_start.ndim - 1)))
        return y + ratio * (x_start.unsqueeze(1) - y)


__all__ = [
    "FRAME_CONDITION",
    "TemporalBlock",
    "TemporalSpectralConv",
    "TrajectoryOperator",
    "cosine_time",
    "insert_temporal_blocks",
]
