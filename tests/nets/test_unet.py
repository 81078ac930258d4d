"""UNet: conditioning paths, zero init, brute-force attention, hooks, input validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.denoiser import Denoiser, preconditioning
from diffusion_lab.nets.unet import AttentionBlock, UNet


def tiny_unet(**overrides) -> UNet:
    """8x8 single-channel UNet (resolutions 8, 4) with random (not zero) output layers."""
    kwargs = dict(
        in_channels=1,
        resolution=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        num_heads=2,
        zero_init=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return UNet(**kwargs).eval()


@pytest.mark.parametrize(
    "config, shape",
    [
        (dict(), (3, 1, 8, 8)),
        (dict(out_channels=2), (3, 2, 8, 8)),
        (
            dict(in_channels=3, resolution=16, channel_mult=(1, 1, 2), attention_resolutions=(8, 4)),
            (3, 3, 16, 16),
        ),
        (dict(scale_shift=True, resample_with_conv=False, mid_attention=False, skip_scale=1.0), (3, 1, 8, 8)),
        (dict(noise_embedding="fourier", noise_embedding_scale=16.0, num_res_blocks=2), (3, 1, 8, 8)),
    ],
)
def test_output_shape_and_batch_independence(config, shape):
    """Every config maps (B, C_in, R, R) -> (B, C_out, R, R), and sample i's output depends only on
    sample i (GroupNorm normalises per sample): the batched call equals three single-sample calls."""
    net = tiny_unet(**config)
    x = torch.randn(shape[0], net.in_channels, shape[2], shape[3])
    c_noise = torch.tensor([-1.0, 0.2, 1.1])
    with torch.no_grad():
        out = net(x, c_noise)
        singles = torch.cat([net(x[i : i + 1], c_noise[i : i + 1]) for i in range(3)])
    assert out.shape == shape
    torch.testing.assert_close(out, singles, atol=1e-5, rtol=1e-5)


def test_block_count_and_hooks_see_documented_widths_and_resolutions():
    """One hook per residual block in forward order: down len(mult) * n, two middle, up len(mult) * (n+1)."""
    net = tiny_unet(channel_mult=(1, 2, 2), resolution=16, num_res_blocks=2, attention_resolutions=(8,))
    assert len(net.block_hooks) == 3 * 2 + 2 + 3 * 3
    seen: list[tuple[int, int]] = []

    class Record(nn.Module):
        def forward(self, h):
            seen.append((h.shape[1], h.shape[2]))
            return h

    for i in range(len(net.block_hooks)):
        net.block_hooks[i] = Record()
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    widths = [8, 8, 16, 16, 16, 16] + [16, 16] + [16, 16, 16, 16, 16, 16, 8, 8, 8]
    resolutions = [16, 16, 8, 8, 4, 4] + [4, 4] + [4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert seen == list(zip(widths, resolutions))
    assert net.block_channels == widths


def test_a_hook_module_changes_the_output():
    net = tiny_unet()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        before = net(x, c)

        class AddOne(nn.Module):
            def forward(self, h):
                return h + 1

        net.block_hooks[1] = AddOne()
        after = net(x, c)
    assert (before - after).abs().max() > 1e-3


def test_class_conditioning_and_null_label():
    """Different labels give different outputs; labels=None is exactly the null label num_classes."""
    net = tiny_unet(num_classes=4)
    x = torch.randn(4, 1, 8, 8)
    c = torch.full((4,), 0.3)
    with torch.no_grad():
        by_label = net(x, c, labels=torch.tensor([0, 1, 2, 3]))
        same_label = net(x, c, labels=torch.tensor([0, 0, 0, 0]))
        null = net(x, c, labels=torch.full((4,), 4))
        none = net(x, c, labels=None)
    torch.testing.assert_close(by_label[0], same_label[0], atol=0, rtol=0)
    assert all((by_label[i] - same_label[i]).abs().max() > 1e-4 for i in range(1, 4))
    torch.testing.assert_close(null, none, atol=0, rtol=0)
    assert (null - same_label).abs().max() > 1e-4


def test_label_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        tiny_unet(num_classes=4)(torch.randn(2, 1, 8, 8), torch.zeros(2), labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unconditional network"):
        tiny_unet()(torch.randn(2, 1, 8, 8), torch.zeros(2), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        tiny_unet(num_classes=4)(torch.randn(2, 1, 8, 8), torch.zeros(2), labels=torch.tensor([0, 1, 2]))


def test_scalar_condition_changes_output_and_is_required():
    net = tiny_unet(scalar_conditions=["guidance_w"])
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        w0 = net(x, c, guidance_w=torch.zeros(2))
        w2 = net(x, c, guidance_w=torch.full((2,), 2.0))
        w2_scalar = net(x, c, guidance_w=torch.tensor(2.0))
    assert (w0 - w2).abs().max() > 1e-4
    torch.testing.assert_close(w2, w2_scalar, atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing conditioning input 'guidance_w'"):
        net(x, c)
    with pytest.raises(ValueError, match=r"unexpected conditioning inputs \['text_emb'\]"):
        net(x, c, guidance_w=torch.zeros(2), text_emb=torch.zeros(2))


def test_noise_level_conditions_the_output_and_scalar_broadcasts():
    net = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor([0.1, 0.1]))
        a_scalar = net(x, 0.1)
        b = net(x, torch.tensor([500.0, 500.0]))
    torch.testing.assert_close(a, a_scalar, atol=0, rtol=0)
    assert (a - b).abs().max() > 1e-4


def test_zero_init_gives_exact_zero_output_and_edm_denoiser_is_c_skip_x():
    """With zero_init the raw net outputs exactly 0, so D(x, sigma) = c_skip(sigma) x (EDM eq. 7)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=3
    )
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert net(x, sigma.log() / 4, labels=torch.tensor([0, 1, 3])).abs().max() == 0
    c_skip, _, _ = preconditioning("edm", sigma)
    torch.testing.assert_close(Denoiser(net)(x, sigma), c_skip[:, None, None, None] * x, atol=0, rtol=0)
    # The zero output conv still receives a gradient, so training can start.
    (net(x, sigma) * x).sum().backward()
    assert net.out_conv.weight.grad.abs().sum() > 0


def test_gradient_reaches_every_parameter():
    net = tiny_unet(num_classes=3, scalar_conditions=["guidance_w"], scale_shift=True).train()
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.randn(3), labels=torch.tensor([0, 1, 3]), guidance_w=torch.rand(3))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_dtypes_float64_model_and_input_casting():
    net = tiny_unet(num_classes=2)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out32_from64 = net(x, torch.zeros(2), labels)  # float32 params, float64 input -> float64 output
        out32 = net(x.float(), torch.zeros(2), labels)
        out64 = net.double()(x, torch.zeros(2, dtype=torch.float64), labels)
    assert (
        out32_from64.dtype == torch.float64 and out64.dtype == torch.float64 and out32.dtype == torch.float32
    )
    torch.testing.assert_close(out32_from64, out32.double(), atol=0, rtol=0)
    torch.testing.assert_close(out64, out32.double(), atol=1e-5, rtol=1e-4)


def test_dropout_is_active_in_train_mode_only():
    net = tiny_unet(dropout=0.5)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, c), net(x, c))
        net.train()
        assert not torch.equal(net(x, c), net(x, c))


def test_attention_block_equals_brute_force_softmax_attention():
    torch.manual_seed(1)
    channels, heads, d = 8, 2, 4
    block = AttentionBlock(channels, num_heads=heads, skip_scale=0.5, norm_groups=4, zero_init=False).double()
    nn.init.normal_(block.proj.weight)
    x = torch.randn(2, channels, 3, 5, dtype=torch.float64)
    h = block.norm(x).flatten(2)  # (B, C, N)
    w_qkv, b_qkv = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    w_p, b_p = block.proj.weight[:, :, 0, 0], block.proj.bias
    expected = torch.empty_like(x)
    for b in range(2):
        qkv = w_qkv @ h[b] + b_qkv[:, None]  # (3C, N)
        q, k, v = qkv[:channels], qkv[channels : 2 * channels], qkv[2 * channels :]
        heads_out = []
        for i in range(heads):
            qi, ki, vi = (t[i * d : (i + 1) * d] for t in (q, k, v))  # (d, N)
            weights = torch.softmax(qi.T @ ki / math.sqrt(d), dim=-1)  # (N queries, N keys)
            heads_out.append(vi @ weights.T)  # (d, N)
        attn = torch.cat(heads_out)
        expected[b] = ((x[b].flatten(1) + w_p @ attn + b_p[:, None]) * 0.5).reshape(channels, 3, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "bad_shape",
    [(2, 3, 8, 8), (2, 1, 16, 16), (2, 1, 8, 6), (1, 8, 8)],
)
def test_bad_input_shape_names_expected_shape(bad_shape):
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 8, 8\)"):
        tiny_unet()(torch.randn(*bad_shape), torch.zeros(bad_shape[0]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="downsampling factor 4"):
        UNet(in_channels=1, resolution=10, base_channels=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"attention_resolutions \[16\].*\[8, 4\]"):
        UNet(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        UNet(
            in_channels=1,
            resolution=8,
            base_channels=8,
            channel_mult=(1, 2),
            attention_resolutions=(),
            num_heads=3,
        )
    with pytest.raises(ValueError, match="unknown noise_embedding 'gauss'"):
        UNet(
            in_channels=1,
            resolution=8,
            base_channels=8,
            channel_mult=(1, 2),
            attention_resolutions=(),
            noise_embedding="gauss",
        )


def test_state_dict_round_trip_keeps_fourier_frequencies():
    a = tiny_unet(noise_embedding="fourier")
    torch.manual_seed(123)
    b = UNet(
        **{
            **dict(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1),
            "attention_resolutions": (4,),
            "num_heads": 2,
            "noise_embedding": "fourier",
        }
    )
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, c), b.eval()(x, c), atol=0, rtol=0)


def test_default_attention_is_at_half_resolution():
    """attention_resolutions=None: attention at resolution // 2 (16 at 32x32, as DDPM++) and in the middle."""
    net = UNet(in_channels=1, resolution=16, base_channels=8, channel_mult=(1, 1, 1), num_res_blocks=1)
    blocks = [b for b in [*net.down, *net.mid, *net.up] if hasattr(b, "attention")]
    has_attention = [isinstance(b.attention, AttentionBlock) for b in blocks]
    # hooks order: down 16, 8, 4 | mid (attn), mid | up 4, 4, 8, 8, 16, 16
    assert has_attention == [False, True, False, True, False, False, False, True, True, False, False]
