"""DiscreteEpsDenoiser against hand computations on the discrete DDPM grid, and the exact mixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.discrete import DiscreteEpsDenoiser
from diffusion_lab.diffusion.schedules import DiscreteVP, sigma_from_timestep

SCHEDULE = DiscreteVP(num_steps=1000)


class TinyNet(nn.Module):
    """A random conv net with a smooth timestep input: out = conv(x) * (1 + sin(t/300)) + cos(t/500)."""

    def __init__(self, channels: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1).double()
        self.timesteps = []

    def forward(self, x, t, y=None):
        self.timesteps.append(t)
        t = t.to(x.dtype).reshape(-1, 1, 1, 1)
        out = self.conv(x) * (1 + torch.sin(t / 300)) + torch.cos(t / 500)
        return out if y is None else out + y.to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.fixture
def inputs(gen):
    k = torch.tensor([0, 3, 250, 999])
    return torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64), k


def test_eps_denoiser_at_discrete_sigmas_matches_hand_computation(inputs):
    x, k = inputs
    net = TinyNet()
    abar = SCHEDULE.alphas_cumprod[k].reshape(-1, 1, 1, 1)
    sigma_k = torch.sqrt((1 - abar) / abar)
    x_vp = torch.sqrt(abar) * x  # = x / sqrt(1 + sigma_k^2)
    with torch.no_grad():
        expected = x - sigma_k * net(x_vp, k.double())
        out = DiscreteEpsDenoiser(net, SCHEDULE.alphas_cumprod)(x, sigma_k.flatten())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(net.timesteps[-1], k.float())


def test_v_and_x0_predictions_and_learned_sigma(inputs):
    x, k = inputs
    abar = SCHEDULE.alphas_cumprod[k].reshape(-1, 1, 1, 1)
    sigma_k = torch.sqrt((1 - abar) / abar).flatten()
    x_vp = torch.sqrt(abar) * x
    with torch.no_grad():
        net = TinyNet()
        v = net(x_vp, k.double())
        # v-prediction (Salimans & Ho 2022): x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        out = DiscreteEpsDenoiser(net, SCHEDULE.alphas_cumprod, prediction="v")(x, sigma_k)
        torch.testing.assert_close(out, torch.sqrt(abar) * x_vp - torch.sqrt(1 - abar) * v)
        out = DiscreteEpsDenoiser(net, SCHEDULE.alphas_cumprod, prediction="x0", clip_denoised=True)(
            x, sigma_k
        )
        torch.testing.assert_close(out, v.clamp(-1, 1))
        wide = TinyNet(out_channels=4)  # learn_sigma: first C channels are eps
        eps = wide(x_vp, k.double())[:, :2]
        out = DiscreteEpsDenoiser(wide, SCHEDULE.alphas_cumprod, learned_sigma=True)(x, sigma_k)
        torch.testing.assert_close(out, x - sigma_k.reshape(-1, 1, 1, 1) * eps)


def test_timesteps_interpolate_monotonically_and_round():
    wrapper = DiscreteEpsDenoiser(TinyNet(), SCHEDULE.alphas_cumprod)
    sigmas = torch.logspace(-2.5, 2.5, 400, dtype=torch.float64)
    t = wrapper.timestep(sigmas)
    assert (t.diff() >= 0).all() and t[0] == 0 and t[-1] == 999
    inside = (sigmas > SCHEDULE.sigmas[0]) & (sigmas < SCHEDULE.sigmas[-1])
    assert (t[inside].diff() > 0).all()
    frac = torch.tensor([10.25, 400.5, 998.9], dtype=torch.float64)
    torch.testing.assert_close(wrapper.timestep(sigma_from_timestep(frac, SCHEDULE.log_sigmas)), frac)
    wrapper.round_timesteps = True
    assert wrapper.timestep(sigma_from_timestep(frac, SCHEDULE.log_sigmas)).tolist() == [10.0, 400.0, 999.0]


def test_fractional_timesteps_agree_with_vp_t_denoiser(inputs):
    """Same model through Denoiser(eps, vp_t, DiscreteVP, time_scale=N): identical at any sigma."""
    x, _ = inputs
    net = TinyNet()
    sigma = torch.tensor([0.013, 0.5, 3.7, 120.0], dtype=torch.float64)
    with torch.no_grad():
        a = DiscreteEpsDenoiser(net, SCHEDULE.alphas_cumprod)(x, sigma)
        b = Denoiser(net, "eps", noise_conditioning="vp_t", schedule=SCHEDULE, time_scale=1000)(x, sigma)
    torch.testing.assert_close(a, b)


def test_wraps_an_exact_eps_model_exactly(mixture, gen):
    """An eps-model built from the mixture at the model's own timestep gives back the mixture denoiser."""
    log_sigmas = SCHEDULE.log_sigmas

    def eps_model(x_vp, t, labels=None):
        sigma = sigma_from_timestep(t.double(), log_sigmas)
        x = x_vp * torch.sqrt(1 + sigma[:, None] ** 2)
        return (x - mixture(x, sigma, labels)) / sigma[:, None]

    x = 2 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.1, 0.33, 1.0, 9.0, 100.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    wrapper = DiscreteEpsDenoiser(eps_model, SCHEDULE.alphas_cumprod)
    torch.testing.assert_close(wrapper(x, sigma, labels=labels), mixture(x, sigma, labels))


def test_respaced_sigmas_and_model_outputs(gen):
    wrapper = DiscreteEpsDenoiser(TinyNet(), SCHEDULE.alphas_cumprod)
    sigmas = wrapper.respaced_sigmas(25)
    assert len(sigmas) == 26 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert all(bool((s == wrapper.sigmas).any()) for s in sigmas[:-1])
    assert sigmas[0] == wrapper.sigma_max and sigmas[-2] == wrapper.sigma_min

    class Diffusers(nn.Module):  # returns an object with .sample, takes renamed conditioning
        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": x * 0 + encoder_hidden_states.reshape(-1, 1)})()

    wrapper = DiscreteEpsDenoiser(
        Diffusers(), SCHEDULE.alphas_cumprod, cond_rename={"text": "encoder_hidden_states"}
    )
    x = torch.zeros(2, 3, dtype=torch.float64)
    out = wrapper(x, 1.0, text=torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out, -torch.tensor([[1.0], [2.0]], dtype=torch.float64).expand(2, 3))


def test_bad_configuration_raises(inputs):
    x, _ = inputs
    with pytest.raises(ValueError, match="prediction"):
        DiscreteEpsDenoiser(TinyNet(), SCHEDULE.alphas_cumprod, prediction="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 output channels"):
        DiscreteEpsDenoiser(TinyNet(), SCHEDULE.alphas_cumprod, learned_sigma=True)(x, 1.0)
