"""ADM (guided-diffusion) UNet and classifier: checkpoint layout, strict reload, DDIM via the wrapper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.samplers.ancestral import sample_ddim
from diffusion_lab.nets.adm import PRESETS, ADMClassifier, ADMUNet, from_preset
from diffusion_lab.nets.adm_blocks import qkv_attention
from diffusion_lab.pretrained.guided_diffusion import (
    NoisyClassifierVE,
    adm_alphas_cumprod,
    adm_denoiser,
    load_adm_network,
    load_guided_diffusion,
)
from diffusion_lab.pretrained.safe_load import MissingWeightsError

MANIFEST = json.loads((Path(__file__).parents[1] / "data" / "adm_manifest.json").read_text())

# Each preset's architecture at a reduced width (every flag kept), and an input size that runs in a blink.
# UNets are fully convolutional, so a smaller image exercises the same modules; the classifier's attention
# pool has a fixed spatial size, so it keeps its native resolution at a small width.
SMALL = {
    "64x64_diffusion": (dict(num_channels=32, num_head_channels=32), 8),
    "128x128_diffusion": (dict(num_channels=32), 16),
    "256x256_diffusion": (dict(num_channels=32), 32),
    "256x256_diffusion_uncond": (dict(num_channels=32), 32),
    "64x64_classifier": (dict(classifier_width=64), 64),
    "128x128_classifier": (dict(classifier_width=64), 128),
    "256x256_classifier": (dict(classifier_width=32), 256),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter (including the zero-initialised output convs) with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def run(model: torch.nn.Module, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=gen)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        if isinstance(model, ADMUNet) and model.num_classes is not None:
            return model(x, t, y=torch.tensor([1, 999]))
        return model(x, t)


def test_manifest_covers_every_preset_with_the_published_flags():
    assert set(MANIFEST) == set(PRESETS)
    for name, entry in MANIFEST.items():
        assert PRESETS[name] == entry["flags"], name


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_preset_has_exactly_the_public_parameter_names_and_shapes(name):
    model = from_preset(name, device="meta")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = MANIFEST[name]["params"]
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_random_state_dict_saved_and_reloaded_strictly_gives_identical_outputs(name, tmp_path):
    overrides, size = SMALL[name]
    fp16 = "classifier_use_fp16" if "classifier" in name else "use_fp16"
    model = randomize_(from_preset(name, **overrides, **{fp16: False}), seed=1)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    reloaded = load_adm_network(name, path, **overrides)  # the same loader real checkpoints go through
    out, out_reloaded = run(model, size), run(reloaded, size)
    assert out.abs().max() > 0
    assert torch.equal(out, out_reloaded)


def test_attention_orders_match_an_explicit_per_head_computation():
    """legacy: channels (head, [q|k|v], d); new: ([q|k|v], head, d); out = softmax(q^T k / sqrt(d)) v."""
    b, heads, d, length = 2, 3, 4, 5
    qkv = torch.randn(b, 3 * heads * d, length, dtype=torch.float64)
    for legacy in (True, False):
        out = qkv_attention(qkv, heads, legacy_order=legacy)
        for h in range(heads):
            if legacy:
                base = h * 3 * d
                q, k, v = (qkv[:, base + i * d : base + (i + 1) * d] for i in range(3))
            else:
                q, k, v = (qkv[:, i * heads * d + h * d : i * heads * d + (h + 1) * d] for i in range(3))
            weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
            expected = torch.einsum("bts,bcs->bct", weights, v)
            torch.testing.assert_close(out[:, h * d : (h + 1) * d], expected)


def tiny_unet(num_classes: int | None = 10) -> ADMUNet:
    return ADMUNet(
        image_size=8, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
        channel_mult=(1, 2), num_classes=num_classes, num_head_channels=32, use_scale_shift_norm=True,
        resblock_updown=True,
    )  # fmt: skip


def test_ddim_through_the_denoiser_wrapper_matches_eps_form_ddim():
    """DDIM (Song et al. 2021a, eq. 12, eta = 0) written independently in VP coordinates on eps."""
    model = randomize_(tiny_unet(), seed=3).double()
    denoiser = adm_denoiser(model, "linear")
    steps = 8
    labels = torch.tensor([3, 7])
    # independent schedule: guided-diffusion's linear betas, timesteps round(linspace(0, 999, steps))
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)))
    ts = [int(t) for t in np.round(np.linspace(0, 999, steps))[::-1]]
    sigmas = torch.tensor([math.sqrt((1 - abar[t]) / abar[t]) for t in ts] + [0.0], dtype=torch.float64)
    torch.testing.assert_close(sigmas, denoiser.respaced_sigmas(steps), rtol=1e-12, atol=0)

    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        out = sample_ddim(
            denoiser,
            noise * sigmas[0],
            sigmas,
            cond={"labels": labels},
            callback=lambda d: seen.append(d["x"]),
        )
        x_vp = noise * sigmas[0] * abar[ts[0]].sqrt()
        for i, t in enumerate(ts):
            # the VE iterate at sigma_t is x_vp / sqrt(abar_t)
            torch.testing.assert_close(seen[i] * abar[t].sqrt(), x_vp, rtol=1e-9, atol=1e-9)
            eps = model(x_vp, torch.full((2,), float(t), dtype=torch.float64), y=labels)[:, :3]
            x0 = (x_vp - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            if i + 1 < len(ts):
                a_prev = abar[ts[i + 1]]
                x_vp = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            else:
                x_vp = x0
    torch.testing.assert_close(out, x_vp, rtol=1e-9, atol=1e-9)


def test_noisy_classifier_in_the_ve_view_sees_the_vp_input_and_timestep():
    clf = randomize_(
        ADMClassifier(image_size=8, model_channels=32, out_channels=5, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32),
        seed=4,
    ).double()  # fmt: skip
    abar = adm_alphas_cumprod("cosine")
    adapter = NoisyClassifierVE(clf, abar)
    t = torch.tensor([17, 600])
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    logits = adapter(x, sigma)
    expected = clf(x * abar[t].sqrt().reshape(2, 1, 1, 1), t.double())
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    labels = torch.tensor([0, 4])
    logp = adapter.log_prob(x, sigma, labels)
    torch.testing.assert_close(logp, torch.log_softmax(expected, -1)[torch.arange(2), labels])
    (grad,) = torch.autograd.grad(logp.sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_schedules_are_guided_diffusions():
    linear = adm_alphas_cumprod("linear")
    np.testing.assert_allclose(linear.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)
    cosine = adm_alphas_cumprod("cosine")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)]
    np.testing.assert_allclose(cosine.numpy(), np.cumprod(1 - np.array(betas)), rtol=1e-12)


def test_unconditional_and_conditional_label_checks():
    model = tiny_unet(num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1), y=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs class labels"):
        tiny_unet()(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(KeyError, match="256x256_diffusion_uncond"):
        from_preset("256x256_diffusion_unconditional")


def test_missing_checkpoint_names_the_file_and_the_download(tmp_path):
    missing = tmp_path / "256x256_diffusion_uncond.pt"
    with pytest.raises(MissingWeightsError) as err:
        load_guided_diffusion("256x256_diffusion_uncond", missing)
    assert str(missing) in str(err.value)
    assert "openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt" in str(
        err.value
    )


def test_a_checkpoint_of_another_model_is_rejected_with_the_preset_name(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save(randomize_(tiny_unet(), 0).state_dict(), path)
    with pytest.raises(ValueError, match="64x64_diffusion"):
        load_adm_network("64x64_diffusion", path)


def test_fp16_torso_keeps_float32_io_and_matches_float32():
    """use_fp16 (guided-diffusion's sampling setting): convs in float16, norms / embeddings / head in float32."""
    model = randomize_(tiny_unet(), seed=5)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        full = model(x, t, y=y)
        model.convert_to_fp16()
        half = model(x, t, y=y)
    assert model.torso_dtype == torch.float16 and model.out[2].weight.dtype == torch.float32
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=2e-2 * full.abs().max().item())


def test_gradient_checkpointing_gives_the_same_input_gradient():
    """DiffuseIT back-propagates through the UNet; use_checkpoint trades memory for recomputation only."""
    plain = randomize_(tiny_unet(), seed=6)
    ckpt = tiny_unet()
    ckpt.load_state_dict(plain.state_dict())
    for module in ckpt.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    grads, runs = [], []
    for model in (plain, ckpt):
        calls = []
        model.input_blocks[1][0].in_layers.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi, t, y=y).square().sum(), xi)
        grads.append(g)
        runs.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1])
    assert runs == [1, 2]  # the checkpointed block was recomputed during the backward pass
