"""Noise schedules against their defining formulas, their inverses and their SDEs."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.schedules import (
    EDM,
    VE,
    DiscreteVP,
    NoiseSchedule,
    SubVP,
    VPCosine,
    VPLinear,
    make_betas,
    respaced_timesteps,
    sigma_from_timestep,
    timestep_from_sigma,
)

ALL = [VPLinear(), SubVP(), VPCosine(), VE(), EDM(), DiscreteVP(), DiscreteVP(kind="cosine")]
VP = [VPLinear(), VPCosine(), DiscreteVP(), DiscreteVP(kind="cosine"), DiscreteVP(kind="scaled_linear")]


def _times(schedule: NoiseSchedule, n: int = 101) -> torch.Tensor:
    return torch.linspace(schedule.t_min, schedule.t_max, n, dtype=torch.float64)


@pytest.mark.parametrize("schedule", VP, ids=repr)
def test_vp_schedules_preserve_variance(schedule):
    t = _times(schedule)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_ve_view_and_log_snr_definitions(schedule):
    t = _times(schedule)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(schedule.sigma_ve(t), sigma / alpha)
    torch.testing.assert_close(schedule.log_snr(t), torch.log(alpha**2 / sigma**2))
    assert (schedule.sigma_ve(t).diff() > 0).all(), "noise must increase with t"


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_inverses_round_trip(schedule):
    t = _times(schedule)
    if isinstance(schedule, VPCosine):  # the clipped ends of the log-SNR are not invertible
        t = t[(schedule.log_snr(t) > -19.9) & (schedule.log_snr(t) < 19.9)]
    torch.testing.assert_close(schedule.t_from_sigma(schedule.sigma_ve(t)), t, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(t)), t, atol=1e-9, rtol=1e-9)
    sigmas = torch.logspace(
        math.log10(schedule.sigma_min), math.log10(schedule.sigma_max), 50, dtype=torch.float64
    )
    torch.testing.assert_close(schedule.sigma_ve(schedule.t_from_sigma(sigmas)), sigmas, rtol=1e-7, atol=0)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_sde_coefficients_match_generic_definitions(schedule):
    """Closed forms vs f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 by autograd."""
    t = _times(schedule, 37)[1:-1]
    with torch.enable_grad():
        tt = t.clone().requires_grad_(True)
        log_alpha = torch.log(schedule.alpha(tt))
        f = torch.autograd.grad(log_alpha.sum(), tt)[0] if log_alpha.requires_grad else torch.zeros_like(t)
        (dsigma2,) = torch.autograd.grad((schedule.sigma(tt) ** 2).sum(), tt)
    torch.testing.assert_close(schedule.sde_drift_coef(t), f)
    torch.testing.assert_close(schedule.sde_diffusion_sq(t), dsigma2 - 2 * f * schedule.sigma(t) ** 2)


def test_paper_sde_coefficients():
    """Score SDE eqs. 9-12: VP f = -beta/2, g^2 = beta; sub-VP g^2 = beta (1 - e^{-2B}); VE d sigma^2/dt."""
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    beta = 0.1 + t * (20 - 0.1)
    big_b = 0.1 * t + 0.5 * (20 - 0.1) * t**2
    torch.testing.assert_close(VPLinear().sde_drift_coef(t), -beta / 2)
    torch.testing.assert_close(VPLinear().sde_diffusion_sq(t), beta)
    torch.testing.assert_close(SubVP().sde_diffusion_sq(t), beta * (1 - torch.exp(-2 * big_b)))
    ve = VE(0.01, 50)
    torch.testing.assert_close(ve.sde_diffusion_sq(t), 2 * ve.sigma(t) ** 2 * math.log(5000))
    torch.testing.assert_close(EDM().sde_diffusion_sq(t), 2 * t)


def _rk4_variance(f, g2, t_end: float, n: int = 2000) -> torch.Tensor:
    """Integrate the marginal variance ODE dV/dt = 2 f(t) V + g(t)^2 from V(0) = 0 with RK4 (floats)."""
    v, h = 0.0, t_end / n
    for i in range(n):
        t = i * h
        k1 = 2 * f(t) * v + g2(t)
        k2 = 2 * f(t + h / 2) * (v + h / 2 * k1) + g2(t + h / 2)
        k3 = 2 * f(t + h / 2) * (v + h / 2 * k2) + g2(t + h / 2)
        k4 = 2 * f(t + h) * (v + h * k3) + g2(t + h)
        v = v + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("t_end", [0.05, 0.3, 1.0])
def test_sub_vp_marginal_variance_solves_its_sde(t_end):
    """Score SDE eq. 29: the sub-VP variance (1 - e^{-B})^2 solves dV/dt = -beta V + beta (1 - e^{-2B})."""

    def beta(t):
        return 0.1 + t * 19.9

    def big_b(t):
        return 0.1 * t + 0.5 * 19.9 * t**2

    v = _rk4_variance(lambda t: -beta(t) / 2, lambda t: beta(t) * (1 - math.exp(-2 * big_b(t))), t_end)
    sub_vp = SubVP()
    torch.testing.assert_close(
        sub_vp.marginal_variance(torch.tensor(t_end, dtype=torch.float64)), v, rtol=1e-8, atol=0
    )
    # and it lies below the VP variance of the same beta(t)
    assert v < VPLinear().sigma(torch.tensor(t_end, dtype=torch.float64)) ** 2
    # the VP variance solves the VP variance ODE
    v_vp = _rk4_variance(lambda t: -beta(t) / 2, beta, t_end)
    torch.testing.assert_close(
        VPLinear().sigma(torch.tensor(t_end, dtype=torch.float64)) ** 2, v_vp, rtol=1e-8, atol=0
    )


def test_discrete_alphas_cumprod_and_betas():
    schedule = DiscreteVP(beta_start=1e-4, beta_end=0.02, num_steps=1000)
    abar, prod = [], 1.0
    for i in range(1000):
        prod *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
        abar.append(prod)
    torch.testing.assert_close(
        schedule.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        schedule.sigmas, torch.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    )
    rebuilt = DiscreteVP.from_alphas_cumprod(schedule.alphas_cumprod)
    torch.testing.assert_close(rebuilt.betas, schedule.betas, rtol=1e-9, atol=1e-15)


def test_cosine_betas_follow_improved_ddpm_eq17():
    n, s = 50, 0.008

    def abar(i):
        return math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2

    expected = [min(1 - abar(i + 1) / abar(i), 0.999) for i in range(n)]
    torch.testing.assert_close(make_betas("cosine", n), torch.tensor(expected, dtype=torch.float64))
    # the continuous cosine schedule passes through the unclipped discrete alphas_cumprod
    k = torch.arange(n - 1, dtype=torch.float64)  # the last step is clipped at 0.999
    cont = VPCosine(s=s).alpha((k + 1) / n) ** 2
    torch.testing.assert_close(
        DiscreteVP(kind="cosine", num_steps=n).alphas_cumprod[:-1], cont, rtol=1e-9, atol=0
    )


def test_continuous_vp_agrees_with_discrete_ddpm_at_native_steps():
    """beta_min = N beta_1, beta_max = N beta_N: log abar_i ~ -B((i + 1)/N), up to O(beta^2) and O(1/N)."""
    discrete = DiscreteVP(beta_start=1e-4, beta_end=0.02, num_steps=1000)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    log_abar_cont = torch.log(VPLinear(0.1, 20.0).alpha(t) ** 2)
    diff = discrete.alphas_cumprod.log() - log_abar_cont
    assert diff[:100].abs().max() < 5e-3, diff[:100].abs().max()
    assert (diff[100:].abs() / log_abar_cont[100:].abs()).max() < 0.01


def test_discrete_timestep_interpolation():
    schedule = DiscreteVP(num_steps=100)
    k = torch.arange(100, dtype=torch.float64)
    torch.testing.assert_close(timestep_from_sigma(schedule.sigmas, schedule.log_sigmas), k)
    mid = torch.exp((schedule.log_sigmas[:-1] + schedule.log_sigmas[1:]) / 2)  # geometric midpoints
    torch.testing.assert_close(schedule.timestep_from_sigma(mid), k[:-1] + 0.5)
    frac = torch.rand(500, dtype=torch.float64) * 99
    torch.testing.assert_close(
        timestep_from_sigma(sigma_from_timestep(frac, schedule.log_sigmas), schedule.log_sigmas), frac
    )
    # clamped outside the table
    ends = schedule.timestep_from_sigma(torch.tensor([1e-6, 1e6], dtype=torch.float64))
    assert ends.tolist() == [0.0, 99.0]
    # the continuous view puts step k at t = k / N
    torch.testing.assert_close(schedule.sigma_ve(k / 100), schedule.sigmas)
    torch.testing.assert_close(schedule.t_from_sigma(schedule.sigmas), k / 100)


def test_respacing():
    steps = respaced_timesteps(1000, 10)
    assert steps[0] == 999 and steps[-1] == 0 and (steps.diff() < 0).all()
    assert respaced_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert respaced_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    schedule = DiscreteVP()
    sigmas = schedule.respaced_sigmas(10)
    assert sigmas[-1] == 0 and len(sigmas) == 11 and (sigmas.diff() < 0).all()
    torch.testing.assert_close(sigmas[:-1], schedule.sigmas[steps])


def test_vp_t_noise_conditioning_feeds_training_timestep():
    """Denoiser(noise_conditioning='vp_t', schedule=DiscreteVP(N), time_scale=N) sees step k at sigma_k."""
    schedule = DiscreteVP(num_steps=1000)
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, c_noise):
            seen.append(c_noise)
            return torch.zeros_like(x)

    denoiser = Denoiser(Net(), "eps", noise_conditioning="vp_t", schedule=schedule, time_scale=1000)
    k = torch.tensor([0, 17, 500, 999])
    denoiser(torch.zeros(4, 2, dtype=torch.float64), schedule.sigmas[k])
    torch.testing.assert_close(seen[0], k.double())
    cont = VPLinear()
    denoiser = Denoiser(Net(), "eps", noise_conditioning="vp_t", schedule=cont, time_scale=1.0)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    denoiser(torch.zeros(3, 2, dtype=torch.float64), cont.sigma_ve(t))
    torch.testing.assert_close(seen[1], t)


def test_special_values():
    assert VE(0.01, 50).sigma_min == pytest.approx(0.01) and VE(0.01, 50).sigma_max == pytest.approx(50)
    assert EDM().sigma_min == 0.002 and EDM().sigma_max == 80
    torch.testing.assert_close(
        VPLinear().sigma_ve(torch.tensor(1.0, dtype=torch.float64)),
        torch.tensor(math.sqrt(math.expm1(10.05)), dtype=torch.float64),
    )
    cosine = VPCosine(logsnr_min=-20, logsnr_max=20)
    assert cosine.sigma_max == pytest.approx(math.exp(10)) and cosine.sigma_min == pytest.approx(
        math.exp(-10)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: VPLinear(beta_min=-1.0),
        lambda: VE(sigma_min=1.0, sigma_max=0.5),
        lambda: EDM(sigma_min=0.0),
        lambda: VPCosine(logsnr_min=5, logsnr_max=1),
        lambda: DiscreteVP(betas=torch.tensor([0.1, 1.5])),
        lambda: DiscreteVP(kind="quadratic"),
        lambda: DiscreteVP.from_alphas_cumprod(torch.tensor([0.5, 0.9])),
        lambda: respaced_timesteps(10, 11),
        lambda: respaced_timesteps(10, 5, "uniform"),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()
