"""The sampler suite against independent truths: a contract test over every registered sampler, convergence
orders against a fine RK4 solution of the probability-flow ODE of the analytic mixture, exact sample
statistics of the mixture for the stochastic samplers, and textbook DDIM on a discrete VP model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from reference_ode import rk4_integrate
from torch.distributions import MultivariateNormal

from diffusion_lab.diffusion.analytic import GaussianMixture, toy_mixture_2d
from diffusion_lab.diffusion.discrete import DiscreteEpsDenoiser
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance
from diffusion_lab.diffusion.samplers import (
    AB_COEFFICIENTS,
    ODE_SAMPLERS,
    SAMPLERS,
    SDE_SAMPLERS,
    SamplerConfig,
    karras_sigmas,
    lms_coefficients,
    loglinear_sigmas,
    plms_step,
    respaced_sigmas,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
    sampler_options,
)

F64 = torch.float64
# Cheap settings for the contract tests (the Langevin sampler's default is 100 steps per level).
FAST_OPTIONS = {"annealed_langevin": {"n_steps_each": 3}}


def run(name: str, denoiser, x, sigmas, **kwargs):
    return SAMPLERS[name](denoiser, x, sigmas, **(FAST_OPTIONS.get(name, {}) | kwargs))


def test_registry_is_partitioned_into_ode_and_sde_samplers():
    assert sorted(ODE_SAMPLERS + SDE_SAMPLERS) == sorted(SAMPLERS)


# ---------------------------------------------------------------------------------------------------
# Contract over every sampler
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(name, dtype, mixture):
    sigmas = karras_sigmas(6, 0.05, 5.0)
    x = torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(0), dtype=dtype) * 5.0
    out = run(name, mixture, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_reproducible_under_a_seeded_generator(name, mixture):
    sigmas = karras_sigmas(6, 0.05, 5.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 5.0
    a = run(name, mixture, x, sigmas, generator=torch.Generator().manual_seed(7))
    b = run(name, mixture, x, sigmas, generator=torch.Generator().manual_seed(7))
    c = run(name, mixture, x, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    if name in SDE_SAMPLERS:  # the generator is really the source of the noise
        assert not torch.allclose(a, c)
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step_once_with_its_sigmas(name, mixture):
    sigmas = karras_sigmas(5, 0.05, 5.0)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 5.0
    seen = []
    run(name, mixture, x, sigmas, generator=torch.Generator().manual_seed(1), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(5))
    assert torch.equal(torch.stack([info["sigma"] for info in seen]), sigmas[:-1])
    assert torch.equal(torch.stack([info["sigma_next"] for info in seen]), sigmas[1:])
    assert torch.equal(seen[0]["x"], x)  # the state before the first step is the input noise
    # 'denoised' is D at the reported state (first evaluation of the step)
    assert torch.allclose(seen[0]["denoised"], mixture(x, sigmas[0].expand(3)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_point_mass_data_is_recovered_exactly(name):
    """If the data is one point p, D(x, sigma) = p for every x; every sampler must return p."""
    point = torch.tensor([0.3, -1.7], dtype=F64)

    def denoiser(x, sigma, **cond):
        return point.expand_as(x)

    sigmas = karras_sigmas(7, 0.01, 20.0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 20.0
    out = run(name, denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "ddpm"])
def test_conditioning_reaches_the_denoiser(name, mixture):
    """Sampling the class-conditional mixture with labels=c lands every sample in a component of class c."""
    sigmas = karras_sigmas(12, 0.01, 10.0)
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 10.0
    labels = torch.arange(60) % 3
    out = SAMPLERS[name](
        mixture, x, sigmas, cond={"labels": labels}, generator=torch.Generator().manual_seed(1)
    )
    predicted = mixture.class_log_posterior(out, torch.full((60,), 1e-3, dtype=F64)).argmax(1)
    assert torch.equal(predicted, labels)


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------
BAD_GRIDS = {
    "not decreasing": (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    "repeated level": (torch.tensor([2.0, 1.0, 1.0, 0.0]), "strictly decreasing"),
    "no trailing zero": (torch.tensor([2.0, 1.0]), "end with 0"),
    "negative": (torch.tensor([2.0, -1.0, 0.0]), "non-negative"),
    "not finite": (torch.tensor([math.inf, 1.0, 0.0]), "finite"),
    "two-dimensional": (torch.tensor([[2.0, 0.0]]), "1-D"),
    "too short": (torch.tensor([0.0]), "at least 2"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_sigma_grids_raise_a_clear_error(name, case, mixture):
    sigmas, message = BAD_GRIDS[case]
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](mixture, torch.zeros(2, 2), sigmas)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_conditioning_batch_mismatch_and_integer_noise_raise(name, mixture):
    sigmas = karras_sigmas(3, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"cond\['labels'\] has batch size 3 but x has batch size 4"):
        SAMPLERS[name](mixture, torch.zeros(4, 2), sigmas, cond={"labels": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="floating-point"):
        SAMPLERS[name](mixture, torch.zeros(4, 2, dtype=torch.long), sigmas)


def test_unknown_method_and_option_name_the_valid_ones(mixture):
    sigmas = karras_sigmas(3, 0.1, 1.0)
    with pytest.raises(ValueError, match="unknown sampler method 'heunn'.*euler.*heun.*dpmpp_2m"):
        sample(mixture, torch.zeros(2, 2), sigmas, method="heunn")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['etaa'\].*\['eta'\]"):
        sample(mixture, torch.zeros(2, 2), sigmas, method="ddim", etaa=0.5)
    assert sampler_options("heun") == ["s_churn", "s_tmin", "s_tmax", "s_noise"]
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_ddim(mixture, torch.zeros(2, 2), sigmas, eta=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        sample_plms(mixture, torch.zeros(2, 2), sigmas, warmup="rk")
    with pytest.raises(ValueError, match="order must be an integer in 1..6"):
        sample_lms(mixture, torch.zeros(2, 2), sigmas, order=0)


# ---------------------------------------------------------------------------------------------------
# Identities between samplers and of the multistep coefficients
# ---------------------------------------------------------------------------------------------------
def test_ddim_eta0_is_euler_and_eta1_is_ddpm_and_euler_ancestral(mixture):
    sigmas = karras_sigmas(8, 0.02, 10.0)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 10.0

    def seeded():
        return torch.Generator().manual_seed(5)

    torch.testing.assert_close(
        sample_ddim(mixture, x, sigmas), sample_euler(mixture, x, sigmas), rtol=0, atol=0
    )
    ddim1 = sample_ddim(mixture, x, sigmas, eta=1.0, generator=seeded())
    torch.testing.assert_close(
        sample_ddpm(mixture, x, sigmas, generator=seeded()), ddim1, rtol=1e-12, atol=1e-12
    )
    ancestral = sample_euler_ancestral(mixture, x, sigmas, generator=seeded())
    torch.testing.assert_close(ancestral, ddim1, rtol=1e-12, atol=1e-12)


def test_heun_churn_window_and_noise(mixture):
    sigmas = karras_sigmas(8, 0.02, 10.0)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 10.0
    plain = sample_heun(mixture, x, sigmas)
    outside = sample_heun(mixture, x, sigmas, s_churn=20.0, s_tmin=20.0, s_tmax=30.0)
    torch.testing.assert_close(outside, plain, rtol=0, atol=0)  # no level inside [s_tmin, s_tmax]
    churned = sample_heun(mixture, x, sigmas, s_churn=20.0, generator=torch.Generator().manual_seed(3))
    assert (churned - plain).abs().max() > 1e-3


def test_adams_bashforth_weights_integrate_polynomials_exactly():
    """AB_k on equal steps is exact for derivatives that are polynomials of degree < k in the step index."""
    x = torch.zeros(1, dtype=F64)
    for k, weights in enumerate(AB_COEFFICIENTS, start=1):
        assert math.isclose(sum(weights), 1.0, rel_tol=0, abs_tol=1e-15)
        for degree in range(k):
            # derivative f(u) = u^degree sampled at u = 0, -1, ..., -(k-1) (newest first); step u: 0 -> 1
            history = [torch.tensor([float(-m) ** degree], dtype=F64) for m in reversed(range(k))]
            out = plms_step(x, history, sigma=1.0, sigma_next=2.0, order=k)
            assert math.isclose(float(out), 1 / (degree + 1), abs_tol=1e-13), (k, degree)


def test_lms_coefficients_integrate_polynomials_on_an_uneven_grid():
    grid = [5.0, 3.7, 2.1, 1.6, 0.9, 0.4]
    for order in (1, 2, 3, 4):
        i = 4
        weights = lms_coefficients(grid, i, order)
        for degree in range(order):
            exact = (grid[i + 1] ** (degree + 1) - grid[i] ** (degree + 1)) / (degree + 1)
            approx = sum(w * grid[i - j] ** degree for j, w in enumerate(weights))
            assert math.isclose(approx, exact, rel_tol=1e-12, abs_tol=1e-12), (order, degree)


def test_lms_reduces_to_euler_and_on_a_uniform_grid_to_plms(mixture):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 3.0
    graded = karras_sigmas(10, 0.1, 3.0)
    torch.testing.assert_close(sample_lms(mixture, x, graded, order=1), sample_euler(mixture, x, graded))
    uniform = torch.linspace(3.0, 0.0, 11, dtype=F64)  # equal steps all the way to 0
    lms = sample_lms(mixture, x, uniform, order=4)
    torch.testing.assert_close(lms, sample_plms(mixture, x, uniform, warmup="ab"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        sample_lms(mixture, x, uniform, order=4, warmup="rk4"),
        sample_plms(mixture, x, uniform),
        rtol=1e-12,
        atol=1e-12,
    )


# ---------------------------------------------------------------------------------------------------
# Convergence orders on the analytic mixture
# ---------------------------------------------------------------------------------------------------
SIGMA_MAX, SIGMA_MIN = 2.0, 0.2


@pytest.fixture(scope="module")
def ode_problem():
    """A smooth mixture, 64 starting points and the PF-ODE solution at SIGMA_MIN by 400 RK4 steps."""
    model = toy_mixture_2d(std=0.4)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * SIGMA_MAX

    def derivative(x, sigma):
        return (x - model(x, torch.full((x.shape[0],), sigma, dtype=F64))) / sigma

    levels = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), 401, dtype=F64).exp().tolist()
    y = rk4_integrate(derivative, x, levels)
    return model, x, y


def error_at_sigma_min(name, options, steps, rho, problem):
    """Max error of the sampler's state at SIGMA_MIN (seen by the callback before the final step to 0)."""
    model, x, reference = problem
    states = {}

    def keep(info):
        states[info["i"]] = info["x"]

    SAMPLERS[name](model, x, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX, rho), callback=keep, **options)
    return float((states[steps - 1] - reference).norm(dim=1).max())


ORDER_CASES = [
    # name, options, rho, steps (n, 2n), accepted slope range: log2(err(n) / err(2n))
    ("euler", {}, 7.0, 16, (0.85, 1.25)),
    ("ddim", {}, 7.0, 16, (0.85, 1.25)),
    ("heun", {}, 7.0, 16, (1.8, 2.5)),
    ("dpmpp_2m", {}, 7.0, 16, (1.8, 2.5)),
    ("lms", {"order": 4, "warmup": "rk4"}, 7.0, 16, (3.4, 4.6)),
    ("lms", {"order": 4}, 7.0, 16, (1.9, 3.2)),  # Euler first step: order 2 eventually, small constant
    ("plms", {}, 1.0, 32, (3.4, 4.6)),  # PNDM: 4th order on a grid uniform in sigma ...
    ("plms", {}, 7.0, 32, (1.8, 2.5)),  # ... but 2nd order on a graded grid (equal-step AB weights)
]


@pytest.mark.parametrize(("name", "options", "rho", "steps", "slope_range"), ORDER_CASES)
def test_convergence_order_on_the_mixture_ode(name, options, rho, steps, slope_range, ode_problem):
    coarse = error_at_sigma_min(name, options, steps, rho, ode_problem)
    fine = error_at_sigma_min(name, options, 2 * steps, rho, ode_problem)
    slope = math.log2(coarse / fine)
    assert slope_range[0] <= slope <= slope_range[1], (
        f"{name} {options}: slope {slope:.2f} ({coarse:.2e} -> {fine:.2e})"
    )


# ---------------------------------------------------------------------------------------------------
# Stochastic samplers draw from the mixture
# ---------------------------------------------------------------------------------------------------
def mixture_z_scores(model: GaussianMixture, x: torch.Tensor) -> dict[str, float]:
    """Largest |z| of the sample mean, covariance, component weights and per-component mean and covariance
    against the exact values; standard errors from the sample itself (fourth moments for covariances)."""
    n = x.shape[0]

    def cov_z(centred, target):
        products = (centred[:, :, None] * centred[:, None, :]).reshape(len(centred), -1)
        return (
            ((products.mean(0) - target.reshape(-1)) / (products.std(0) / math.sqrt(len(centred))))
            .abs()
            .max()
        )

    mean, cov = model.mean_and_cov()
    z = {
        "mean": ((x.mean(0) - mean) / (torch.diag(cov) / n).sqrt()).abs().max(),
        "cov": cov_z(x - mean, cov),
    }
    log_joint = torch.stack(
        [
            MultivariateNormal(m, c).log_prob(x) + w.log()
            for m, c, w in zip(model.means, model.covs, model.weights)
        ],
        1,
    )
    component = log_joint.argmax(1)  # components are > 7 std apart: the nearest is the true one
    counts = torch.bincount(component, minlength=len(model.weights)).to(F64)
    w = model.weights
    z["weights"] = ((counts / n - w) / (w * (1 - w) / n).sqrt()).abs().max()
    within = []
    for k in range(len(w)):
        xs = x[component == k]
        within.append(
            ((xs.mean(0) - model.means[k]) / (torch.diag(model.covs[k]) / len(xs)).sqrt()).abs().max()
        )
        within.append(cov_z(xs - model.means[k], model.covs[k]))
    z["within"] = torch.stack(within).max()
    return {k: float(v) for k, v in z.items()}


SDE_CASES = {
    "ddpm": (karras_sigmas(100, 0.01, 20.0), {}),
    "euler_ancestral": (karras_sigmas(100, 0.01, 20.0), {}),
    "pc": (karras_sigmas(50, 0.01, 20.0), {"n_corrector_steps": 2}),
    "annealed_langevin": (loglinear_sigmas(15, 0.02, 5.0), {"step_size": 2e-4, "n_steps_each": 30}),
    "distilled_stochastic": (karras_sigmas(100, 0.01, 20.0), {}),
}


def test_every_sde_sampler_has_a_distribution_check():
    assert sorted(SDE_CASES) == sorted(SDE_SAMPLERS)


@pytest.mark.parametrize("name", sorted(SDE_CASES))
def test_stochastic_samplers_match_the_mixture_statistics(name, mixture):
    sigmas, options = SDE_CASES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=gen, dtype=F64) * sigmas[0]
    out = SAMPLERS[name](mixture, x, sigmas, generator=gen, **options)
    z = mixture_z_scores(mixture, out)
    assert max(z.values()) < 4.0, z


def test_distribution_check_detects_a_wrong_noise_level(mixture):
    """The statistic above is sharp enough to reject Euler-ancestral with 10% too little noise."""
    sigmas = karras_sigmas(100, 0.01, 20.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=gen, dtype=F64) * sigmas[0]
    out = sample_euler_ancestral(mixture, x, sigmas, s_noise=0.9, generator=gen)
    assert max(mixture_z_scores(mixture, out).values()) > 5.0


# ---------------------------------------------------------------------------------------------------
# DDIM on a discrete VP model = the textbook alpha-bar update
# ---------------------------------------------------------------------------------------------------
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)


def eps_model(x_vp, t):
    """Any smooth deterministic function of (x_t, t) serves: the test compares iterates, not quality."""
    t = torch.as_tensor(t, dtype=F64).reshape(-1, *([1] * (x_vp.ndim - 1)))
    return torch.tanh(x_vp * (1 + t / 1000)) * 0.7 + 0.1 * torch.sin(t / 97 + x_vp)


def own_ve_adapter(x, sigma, **cond):
    """D(x, sigma) = x - sigma eps(sqrt(abar_t) x, t) with t the training step whose sigma this is."""
    model_sigmas = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt()
    t = (sigma.log()[:, None] - model_sigmas.log()[None]).abs().argmin(1)
    assert torch.allclose(model_sigmas[t], sigma, rtol=1e-12)
    s = sigma[:, None]
    return x - s * eps_model(x * ALPHAS_CUMPROD[t].sqrt()[:, None], t.to(F64))


def textbook_ddim(x_t, timesteps, eta, generator):
    """Song et al. 2021a, eq. 12: x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s from eq. 16."""
    iterates = [x_t]
    for k, t in enumerate(timesteps):
        a = ALPHAS_CUMPROD[t]
        a_prev = ALPHAS_CUMPROD[timesteps[k + 1]] if k + 1 < len(timesteps) else torch.tensor(1.0, dtype=F64)
        eps = eps_model(x_t, torch.full((x_t.shape[0],), float(t), dtype=F64))
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x_t = a_prev.sqrt() * x0 + (1 - a_prev - s**2).sqrt() * eps
        if k + 1 < len(timesteps):
            x_t = x_t + s * torch.randn(x_t.shape, generator=generator, dtype=F64)
        iterates.append(x_t)
    return iterates


def discrete_denoiser(x, sigma, **cond):
    net = DiscreteEpsDenoiser(lambda x_vp, t: eps_model(x_vp, t.round()), ALPHAS_CUMPROD)
    return net(x, sigma)


@pytest.mark.parametrize(
    "adapter", [own_ve_adapter, discrete_denoiser], ids=["own_adapter", "DiscreteEpsDenoiser"]
)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_the_textbook_alpha_bar_update(adapter, eta):
    steps = 25
    timesteps = list(range(0, 1000, 1000 // steps))[::-1]  # DDIM's "uniform" skip, descending
    x_vp = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = textbook_ddim(x_vp, timesteps, eta, torch.Generator().manual_seed(9))

    model_sigmas = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt()
    sigmas = respaced_sigmas(steps, model_sigmas, "uniform")
    states = []
    out = sample_ddim(
        adapter,
        x_vp / ALPHAS_CUMPROD[timesteps[0]].sqrt(),  # the VE view of the same starting point
        sigmas,
        eta=eta,
        generator=torch.Generator().manual_seed(9),
        callback=lambda info: states.append(info["x"]),
    )
    for k, t in enumerate(timesteps):  # VE state at step k times sqrt(abar_t) is the VP iterate
        torch.testing.assert_close(states[k] * ALPHAS_CUMPROD[t].sqrt(), expected[k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, expected[-1], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Dispatcher, guidance and the YAML config
# ---------------------------------------------------------------------------------------------------
def test_dispatcher_applies_a_guidance_factory(mixture):
    sigmas = karras_sigmas(10, 0.02, 10.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 10.0
    cond = {"labels": torch.arange(8) % 3}
    factory = functools.partial(ClassifierFreeGuidance, w=0.0, null_label=mixture.null_label)
    guided = sample(mixture, x, sigmas, method="dpmpp_2m", guidance=factory, cond=cond)
    torch.testing.assert_close(guided, sample(mixture, x, sigmas, method="dpmpp_2m", cond=cond))
    stronger = sample(
        mixture, x, sigmas, method="dpmpp_2m", guidance=functools.partial(factory, w=3.0), cond=cond
    )
    assert (stronger - guided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="factory"):
        sample(mixture, x, sigmas, guidance=factory(mixture))


def test_sampler_config_from_yaml_values(mixture):
    config = SamplerConfig(
        method="ddim", steps=12, schedule="karras", schedule_kwargs={"rho": 7.0}, options={"eta": 0.0}
    )
    sigmas = config.sigmas(sigma_min=0.02, sigma_max=10.0, model_sigmas=None)  # unused defaults are dropped
    torch.testing.assert_close(sigmas, karras_sigmas(12, 0.02, 10.0))
    out = config(
        mixture,
        (5, 2),
        generator=torch.Generator().manual_seed(0),
        dtype=F64,
        progress=True,
        model_defaults={"sigma_min": 0.02, "sigma_max": 10.0},
    )
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 10.0
    torch.testing.assert_close(out, sample_euler(mixture, noise, sigmas))
    with pytest.raises(ValueError, match="unknown sampler method 'dim'"):
        SamplerConfig(method="dim")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['etta'\]"):
        SamplerConfig(method="ddim", options={"etta": 1.0})
    with pytest.raises(ValueError, match="unknown sigma schedule 'karas'"):
        SamplerConfig(schedule="karas")
    with pytest.raises(ValueError, match=r"sigma schedule 'karras' got unknown option\(s\) \['rh0'\]"):
        SamplerConfig(schedule_kwargs={"rh0": 7})
