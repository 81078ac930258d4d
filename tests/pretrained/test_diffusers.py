"""diffusers UNet / VAE folders via the registry: DDIM against diffusers' own scheduler, latent sampling."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusion_lab.diffusion.samplers.ancestral import sample_ddim  # noqa: E402
from diffusion_lab.pretrained import load  # noqa: E402
from diffusion_lab.pretrained.safe_load import CorruptWeightsError, MissingWeightsError  # noqa: E402

SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny latent-diffusion pipeline: unet/ (4 latent channels), vae/ (16 px <-> 8 px), scheduler/."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipeline")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=16, layers_per_block=1,
    )  # fmt: skip
    with torch.no_grad():  # perturb the initialisation so the output depends on every layer
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    diffusers.DDIMScheduler(**SCHEDULER, prediction_type="epsilon").save_pretrained(root / "scheduler")
    return root


def test_ddim_through_the_registry_matches_diffusers_ddim_scheduler(pipeline, no_network):
    denoiser = load("diffusers/unet", pipeline)
    unet = denoiser.model
    steps = 5
    scheduler = diffusers.DDIMScheduler(
        **SCHEDULER, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", clip_sample=False
    )
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    ts = scheduler.timesteps.tolist()  # [800, 600, 400, 200, 0]
    sigmas = torch.tensor([math.sqrt((1 - abar[t]) / abar[t]) for t in ts] + [0.0])
    torch.testing.assert_close(sigmas, denoiser.respaced_sigmas(steps, "leading").float(), rtol=1e-4, atol=0)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        ours = sample_ddim(denoiser, noise * sigmas[0], sigmas, callback=lambda d: seen.append(d["x"]))
        x = noise * sigmas[0] * abar[ts[0]].sqrt().float()  # VP start: x_vp = sqrt(abar) x_ve
        for i, t in enumerate(ts):
            torch.testing.assert_close(seen[i] * abar[t].sqrt().float(), x, rtol=1e-4, atol=1e-4)
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)  # final alpha = 1: the last VP step is x0


def test_latent_diffusion_end_to_end_with_the_vae_scale_factor(pipeline, no_network):
    denoiser = load("diffusers/unet", pipeline / "unet")  # model folder; scheduler found beside it
    codec = load("diffusers/vae", pipeline)
    assert codec.scaling_factor == pytest.approx(0.18215)
    sigmas = denoiser.respaced_sigmas(4)
    with torch.no_grad():
        latents = sample_ddim(denoiser, torch.randn(2, 4, 8, 8) * sigmas[0], sigmas)
        images = codec.decode(latents)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        z = codec.encode(x)
        torch.testing.assert_close(z, 0.18215 * codec.vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(codec.decode(z), codec.vae.decode(z / 0.18215).sample)


def test_conditional_unet_and_v_prediction_follow_the_conversion_formulas(tmp_path, no_network):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=8,
        attention_head_dim=8,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "unet")
    text_emb = torch.randn(2, 3, 16)
    x = torch.randn(2, 4, 8, 8)
    t = 500
    for prediction in ("epsilon", "v_prediction"):
        denoiser = load("diffusers/unet", tmp_path / "unet", scheduler_config={"prediction_type": prediction})
        abar = denoiser.schedule.alphas_cumprod[t].item()  # DDPM linear 1e-4..0.02 by default
        sigma = math.sqrt((1 - abar) / abar)
        with torch.no_grad():
            x0 = denoiser(x, torch.full((2,), sigma), text_emb=text_emb)
            out = denoiser.model(
                x * math.sqrt(abar), torch.full((2,), float(t)), encoder_hidden_states=text_emb
            ).sample
        if prediction == "epsilon":  # x0 = x - sigma eps
            expected = x - sigma * out
        else:  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v  (Salimans & Ho 2022)
            expected = math.sqrt(abar) * (x * math.sqrt(abar)) - math.sqrt(1 - abar) * out
        torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-4)


def test_missing_corrupt_and_pickle_only_folders(pipeline, tmp_path):
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nothing")):
        load("diffusers/unet", tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((pipeline / "vae" / "config.json").read_text())
    weights = (pipeline / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        load("diffusers/vae", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, broken / "diffusion_pytorch_model.bin")
    with pytest.raises(CorruptWeightsError, match="convert_checkpoint"):
        load("diffusers/vae", broken)
