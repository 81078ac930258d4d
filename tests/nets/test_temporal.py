"""DSNO temporal layers: exact equivalence with a brute-force circular convolution, and the wrapper's reduction to
the frame-by-frame backbone (and to one DDIM step) when the temporal weights are zero."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.nets.temporal import (
    TemporalBlock,
    TemporalSpectralConv,
    TrajectoryOperator,
    cosine_time,
)
from diffusion_lab.nets.unet import UNet


def _kernel_by_formula(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """kappa_n = (1/M) sum over the full Hermitian spectrum of the kept modes, written out term by term:
    Re(W_0) + 2 Re(W_k e^{2 pi i k n / M}) for 0 < k < M/2 + Re(W_{M/2}) (-1)^n at the Nyquist mode."""
    w = torch.complex(weight[..., 0].double(), weight[..., 1].double())  # (C_in, C_out, K)
    kept = min(w.shape[-1], frames // 2 + 1)
    kernel = torch.zeros(*w.shape[:2], frames, dtype=torch.float64)
    for n in range(frames):
        for k in range(kept):
            phase = torch.tensor(2 * math.pi * k * n / frames)
            term = (w[..., k] * torch.exp(1j * phase)).real
            nyquist = frames % 2 == 0 and k == frames // 2
            kernel[..., n] += term if (k == 0 or nyquist) else 2 * term
    return kernel / frames


def _circular_conv(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, m, o, ...] = sum_{m', c} h[b, m', c, ...] kappa[c, o, (m - m') mod M], by loops."""
    b, frames, _, *spatial = h.shape
    y = torch.zeros(b, frames, kernel.shape[1], *spatial, dtype=torch.float64)
    for m in range(frames):
        for mp in range(frames):
            k = kernel[:, :, (m - mp) % frames]  # (C_in, C_out)
            y[:, m] += torch.einsum("bc...,co->bo...", h[:, mp].double(), k)
    return y


@pytest.mark.parametrize("frames,modes", [(4, 2), (5, 2), (6, 4), (7, 3), (3, 5)])
def test_spectral_conv_is_circular_convolution_with_inverse_fft_kernel(frames, modes):
    torch.manual_seed(frames * 10 + modes)
    conv = TemporalSpectralConv(3, 2, modes=modes, init_scale=1.0)
    with torch.no_grad():
        conv.weight.normal_()
    h = torch.randn(2, frames, 3, 2, 3)
    expected = _circular_conv(h, _kernel_by_formula(conv.weight.detach(), frames))
    torch.testing.assert_close(conv(h).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        conv.kernel(frames).double(), _kernel_by_formula(conv.weight.detach(), frames), rtol=1e-5, atol=1e-6
    )


def test_spectral_conv_discards_modes_above_the_kept_ones():
    """A time signal made only of frequency K (and its aliases) is mapped to exactly zero."""
    frames, modes = 8, 2
    conv = TemporalSpectralConv(2, 2, modes=modes, init_scale=1.0)
    t = torch.arange(frames, dtype=torch.float32)
    h = torch.cos(2 * math.pi * modes * t / frames)[None, :, None].expand(1, frames, 2).contiguous()
    assert conv(h).abs().max() < 1e-5
    assert conv(torch.ones(1, frames, 2)).abs().max() > 1e-3  # the DC mode is kept


def test_temporal_block_is_residual_leaky_relu_of_the_convolution():
    torch.manual_seed(0)
    block = TemporalBlock(4, modes=2, init_scale=1.0)
    block.num_frames = 3
    h = torch.randn(2 * 3, 4, 5)  # (B*M, C, S), frame-major
    frames = h.reshape(2, 3, 4, 5)
    expected = frames.double() + F.leaky_relu(_circular_conv(frames, block.spectral.kernel(3).double()), 0.01)
    torch.testing.assert_close(block(h).double(), expected.reshape(h.shape), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        block.spectral.weight.zero_()
    assert torch.equal(block(h), h)
    block.num_frames = 4
    with pytest.raises(ValueError, match="num_frames=4"):
        block(h)


def _unet(**kw):
    args = dict(
        in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.0, norm_groups=2, zero_init=False, num_classes=3,
        scalar_conditions=["frame_time"],
    )  # fmt: skip
    return UNet(**{**args, **kw})


def _perturb_frame_embedding(denoiser):
    with torch.no_grad():  # make frames differ through their own time embedding
        for name, p in denoiser.named_parameters():
            if "scalar_projections" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("backbone", ["unet", "mlp"])
def test_zero_weights_reduce_to_frame_by_frame_backbone_and_a_ddim_step(backbone):
    torch.manual_seed(1)
    if backbone == "unet":
        denoiser = Denoiser(_unet(), sigma_data=0.6)
        x = torch.randn(2, 1, 8, 8) * 80
        cond = {"labels": torch.tensor([0, 2])}
    else:
        denoiser = Denoiser(MLP(dim=2, hidden=16, depth=2, scalar_conditions=["frame_time"]))
        x = torch.randn(3, 2) * 80
        cond = {}
    _perturb_frame_embedding(denoiser)
    plain = copy.deepcopy(denoiser)
    operator = TrajectoryOperator(denoiser, modes=2, init_scale=0.0)
    sigmas = torch.tensor([20.0, 2.0, 0.3, 0.0])
    out = operator(x, 80.0, sigmas, **cond)
    assert out.shape == (x.shape[0], 4, *x.shape[1:])
    for m, s in enumerate(sigmas):
        y = plain(x, torch.full((x.shape[0],), 80.0), **cond, frame_time=cosine_time(s).expand(x.shape[0]))
        torch.testing.assert_close(out[:, m], y + (s / 80.0) * (x - y), rtol=1e-5, atol=1e-4)
    # Nonzero temporal weights mix the frames: frame 0 then depends on frame 3's time, and not before.
    moved = operator(x, 80.0, torch.tensor([20.0, 2.0, 0.3, 0.1]), **cond)
    torch.testing.assert_close(moved[:, 0], out[:, 0])
    with torch.no_grad():
        for block in operator.temporal_blocks:
            block.spectral.weight.normal_(0, 0.5)
    mixed_a = operator(x, 80.0, sigmas, **cond)
    mixed_b = operator(x, 80.0, torch.tensor([20.0, 2.0, 0.3, 0.1]), **cond)
    assert (mixed_a[:, 0] - mixed_b[:, 0]).abs().max() > 1e-4


def test_unet_gets_blocks_where_the_paper_puts_them():
    net = _unet(num_res_blocks=2)
    TrajectoryOperator(Denoiser(net), modes=2)
    kinds = [type(h).__name__ for h in net.block_hooks]
    num_down = 2 * 2  # two levels x two residual blocks
    assert kinds[num_down + 1] == "Identity"  # second middle block: no temporal layer
    assert kinds.count("TemporalBlock") == len(kinds) - 1
    with pytest.raises(ValueError, match="already taken"):
        TrajectoryOperator(Denoiser(net))


def test_operator_rejects_bad_levels_and_backbones():
    operator = TrajectoryOperator(Denoiser(MLP(dim=2, hidden=8, depth=1, scalar_conditions=["frame_time"])))
    with pytest.raises(ValueError, match="sigma_start=1.0"):
        operator(torch.randn(2, 2), 1.0, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="supported backbones"):
        TrajectoryOperator(Denoiser(torch.nn.Linear(2, 2)))


def test_deepcopy_keeps_mlp_hooks_on_the_copied_layers():
    """EMA copies the operator with deepcopy; the copy's MLP hooks must use the copy's temporal layers."""
    torch.manual_seed(2)
    operator = TrajectoryOperator(Denoiser(MLP(dim=2, hidden=8, depth=2, scalar_conditions=["frame_time"])))
    clone = copy.deepcopy(operator)
    x, sigmas = torch.randn(4, 2) * 80, torch.tensor([5.0, 0.0])
    with torch.no_grad():
        for block in clone.temporal_blocks:
            block.spectral.weight.zero_()
    assert not torch.allclose(operator(x, 80.0, sigmas), clone(x, 80.0, sigmas))
    with torch.no_grad():
        for a, b in zip(operator.temporal_blocks, clone.temporal_blocks):
            b.spectral.weight.copy_(a.spectral.weight)
    torch.testing.assert_close(operator(x, 80.0, sigmas), clone(x, 80.0, sigmas))
