"""Splitting samplers (LTSP, STSP; Wizadwongsa & Suwajanakorn 2023) against the exact guided ODE of the
class-conditional mixture: the exact classifier is the closed-form posterior ``p(c | x, sigma)`` of the mixture
components, the reference is a fine RK4 solution of ``dx/dsigma = f + g`` (g = -s sigma grad log p(c|x))."""

from __future__ import annotations

import math

import pytest
import torch
from reference_ode import rk4_integrate

from diffusion_lab.diffusion.analytic import GaussianMixture, toy_mixture_2d
from diffusion_lab.diffusion.conditions import (
    LUMA_WEIGHTS,
    Colorization,
    Inpainting,
    SuperResolution,
    box_mask,
)
from diffusion_lab.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance, LossGuidance
from diffusion_lab.diffusion.samplers import (
    SAMPLERS,
    karras_sigmas,
    sample,
    sample_ltsp,
    sample_plms,
    sample_stsp,
)

F64 = torch.float64
SIGMA_MAX, SIGMA_MIN = 5.0, 0.1


class Counting:
    """A callable that counts its calls (denoiser or classifier)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def exact_guidance(model, scale):
    return ClassifierGuidance(model, lambda x, sigma: model.class_log_posterior(x, sigma), scale)


def guided_problem(std, scale, points=32, rk4_steps=400):
    """Mixture, guidance, start points at SIGMA_MAX, labels, and the guided-ODE solution at SIGMA_MIN by RK4
    on a log-spaced grid (halving its step changes it by < 1e-8)."""
    model = toy_mixture_2d(std=std)
    guide = exact_guidance(model, scale)
    x = torch.randn(points, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * SIGMA_MAX
    cond = {"labels": torch.arange(points) % model.num_classes}

    def derivative(y, s):
        return (y - guide(y, torch.full((points,), s, dtype=F64), **cond)) / s

    levels = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), rk4_steps + 1, dtype=F64).exp().tolist()
    y = rk4_integrate(derivative, x, levels)
    return guide, x, cond, y


@pytest.fixture(scope="module")
def smooth_problem():
    """Overlapping components, moderate guidance: the asymptotic regime where orders show."""
    return guided_problem(std=0.4, scale=2.0)


@pytest.fixture(scope="module")
def sharp_problem():
    """Well separated components, strong guidance: g switches quickly near class boundaries (the paper's
    setting where high-order solvers on f + g fail at few steps)."""
    return guided_problem(std=0.15, scale=4.0)


def mean_error(name, options, steps, problem):
    """Mean distance of the sampler's state at SIGMA_MIN (seen by the callback) to the reference."""
    guide, x, cond, reference = problem
    states = {}

    def keep(info):
        states[info["i"]] = info["x"]

    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX, 7.0)
    SAMPLERS[name](guide, x, sigmas, callback=keep, cond=cond, **options)
    return float((states[steps - 1] - reference).norm(dim=1).mean())


# ---------------------------------------------------------------------------------------------------
# g = 0: exactly PLMS
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "options"),
    [(sample_ltsp, {}), (sample_stsp, {"scheme": "paper"}), (sample_stsp, {"scheme": "second_order"})],
)
def test_without_guidance_splitting_is_plms_exactly(mixture, fn, options):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 20
    sigmas = karras_sigmas(12, 0.01, 20.0)
    plms = sample_plms(mixture, x, sigmas, warmup="ab")
    assert torch.equal(fn(mixture, x, sigmas, **options), plms)  # a plain denoiser: g = None
    labels = torch.arange(16) % 3
    zero_scale = exact_guidance(mixture, 0.0)  # a Guidance whose term is exactly 0; its base is unconditional
    assert torch.equal(fn(zero_scale, x, sigmas, cond={"labels": labels}, **options), plms)


def test_registry_and_guidance_factory_reach_the_splitting_samplers(mixture):
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * 10
    sigmas, cond = karras_sigmas(8, 0.05, 10.0), {"labels": torch.arange(6) % 3}
    guide = exact_guidance(mixture, 2.0)
    direct = sample_stsp(guide, x, sigmas, cond=cond, scheme="second_order")
    via = sample(
        mixture,
        x,
        sigmas,
        method="stsp",
        guidance=lambda d: exact_guidance(mixture, 2.0) if d is mixture else None,
        cond=cond,
        scheme="second_order",
    )
    torch.testing.assert_close(via, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown option"):
        sample(mixture, x, sigmas, method="ltsp", scheme="paper")


# ---------------------------------------------------------------------------------------------------
# Cost: one D_base per step; one (LTSP) or two (STSP) guidance evaluations per step
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "per_step"), [("ltsp", {}, 1), ("stsp", {}, 2)])
def test_evaluation_counts(mixture, name, options, per_step):
    base = Counting(mixture)
    classifier = Counting(lambda x, sigma: mixture.class_log_posterior(x, sigma))
    guide = ClassifierGuidance(base, classifier, 2.0)
    steps = 10
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * 10
    SAMPLERS[name](guide, x, karras_sigmas(steps, 0.05, 10.0), cond={"labels": torch.arange(4) % 3})
    assert base.calls == steps
    # STSP skips the closing half step into sigma = 0, where g vanishes
    assert classifier.calls == steps * per_step - (per_step - 1)


# ---------------------------------------------------------------------------------------------------
# Accuracy against the exact guided ODE
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [8, 10])
@pytest.mark.parametrize("scheme", ["paper", "second_order"])
def test_stsp_beats_ddim_and_naive_plms_at_equal_nfe(sharp_problem, steps, scheme):
    """Same number of denoiser evaluations (one per step for all four); strong, sharply varying guidance."""
    stsp = mean_error("stsp", {"scheme": scheme}, steps, sharp_problem)
    ddim = mean_error("ddim", {}, steps, sharp_problem)
    plms = mean_error("plms", {"warmup": "ab"}, steps, sharp_problem)
    assert stsp < 0.8 * ddim, (stsp, ddim)
    assert stsp < 0.8 * plms, (stsp, plms)


def _slope(name, options, problem, n=16):
    """Observed order over n -> 4n steps: log2(err(n) / err(4n)) / 2."""
    coarse, fine = mean_error(name, options, n, problem), mean_error(name, options, 4 * n, problem)
    return math.log2(coarse / fine) / 2, coarse, fine


def test_strang_error_falls_faster_than_lie_trotter(smooth_problem):
    """LTSP is first order; Strang with exact sub-flows is second order. The second-order scheme shows it
    (slope 2); the paper's scheme (multistep eps sampled at the half-stepped point, Euler half steps) stays
    first order asymptotically but is more accurate than LTSP and falls faster over this range."""
    lt, lt_coarse, lt_fine = _slope("ltsp", {}, smooth_problem)
    second, *_ = _slope("stsp", {"scheme": "second_order"}, smooth_problem)
    paper, paper_coarse, paper_fine = _slope("stsp", {"scheme": "paper"}, smooth_problem)
    assert 0.85 <= lt <= 1.2, lt
    assert 1.8 <= second <= 2.3, second
    assert paper > lt + 0.05, (paper, lt)
    assert paper_coarse < lt_coarse and paper_fine < lt_fine


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_options_name_the_value(mixture):
    x, sigmas = torch.zeros(2, 2), karras_sigmas(4)
    with pytest.raises(ValueError, match="integer in 1..4, got 5"):
        sample_stsp(mixture, x, sigmas, order=5)
    with pytest.raises(ValueError, match="scheme must be one of paper, second_order, got 'midpoint'"):
        sample_stsp(mixture, x, sigmas, scheme="midpoint")


def test_cfg_guidance_splits_into_conditional_base_and_term(mixture):
    """CFG also splits (base D_c, g = -w (D_c - D_u)/sigma): the callback's x_guided is x + h/2 g."""
    guide = ClassifierFreeGuidance(mixture, w=1.5, null_label=mixture.null_label)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * 10
    sigmas, labels = karras_sigmas(6, 0.05, 10.0), torch.arange(5) % 3
    seen = []
    sample_stsp(guide, x, sigmas, cond={"labels": labels}, callback=seen.append)
    first = seen[0]
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    d_c, d_u = mixture(x, sigmas[0].expand(5), labels), mixture(x, sigmas[0].expand(5))
    torch.testing.assert_close(first["x_guided"], x + (s1 - s0) / 2 * (-1.5 * (d_c - d_u) / s0))


# ---------------------------------------------------------------------------------------------------
# Conditional tasks: data-consistency guidance on x0_hat
# ---------------------------------------------------------------------------------------------------
SHAPE = (3, 4, 4)


def _adjoint(condition, residual):
    """A^T r written out by hand for each operator."""
    if isinstance(condition, Colorization):
        return residual * torch.tensor(LUMA_WEIGHTS, dtype=F64).reshape(1, 3, 1, 1)
    if isinstance(condition, Inpainting):
        return residual * condition.mask.to(residual)
    f = condition.factor
    return torch.nn.functional.interpolate(residual, scale_factor=f, mode="nearest") / f**2


@pytest.fixture
def gaussian_images():
    """Data N(m, v I) on 3x4x4 images: D(x) = m + a (x - m), a = v / (v + sigma^2)."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(1, math.prod(SHAPE), generator=g, dtype=F64)
    v = 0.3
    return GaussianMixture(m, v * torch.eye(m.shape[1], dtype=F64)[None]), m.reshape(1, *SHAPE), v


@pytest.mark.parametrize(
    "condition", [Colorization(), Inpainting(box=(0.25, 0.0, 0.5, 0.75)), SuperResolution(2)], ids=str
)
def test_condition_term_vanishes_when_satisfied_and_is_the_closed_form_otherwise(gaussian_images, condition):
    model, m, v = gaussian_images
    g = torch.Generator().manual_seed(8)
    reference = torch.randn(5, *SHAPE, generator=g, dtype=F64)
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.5, 4.0], dtype=F64)
    a = (v / (v + sigma**2)).reshape(-1, 1, 1, 1)
    guide = LossGuidance(model, condition.bind(reference), scale=2.0)
    # x whose denoised estimate is exactly the reference: the condition holds, the guidance term is 0
    x_ok = m + (reference - m) / a
    torch.testing.assert_close(model(x_ok, sigma), reference)
    assert guide.ode_term(x_ok, sigma).abs().max() < 1e-10
    # any other x0_hat with the same measurement (a change in the null space of A) also gives 0
    other = reference + torch.randn(5, *SHAPE, generator=g, dtype=F64)
    other = other - _adjoint_projection(condition, other - reference)
    torch.testing.assert_close(condition.operator(other), condition.measurement)
    assert guide.ode_term(m + (other - m) / a, sigma).abs().max() < 1e-10
    # elsewhere: g = s sigma J_D^T A^T (A D - y) with J_D = a I
    x = torch.randn(5, *SHAPE, generator=g, dtype=F64) * 2
    d = model(x, sigma)
    expected = (
        2.0
        * sigma.reshape(-1, 1, 1, 1)
        * a
        * _adjoint(condition, condition.operator(d) - condition.measurement)
    )
    torch.testing.assert_close(guide.ode_term(x, sigma), expected)
    # and a small guided step lowers the loss of the denoised estimate
    assert (condition(guide(x, sigma)) < condition(d)).all()


def _adjoint_projection(condition, delta):
    """The part of ``delta`` that A sees: A^+ A delta (A has orthogonal rows up to scale for all three)."""
    residual = condition.operator(delta)
    if isinstance(condition, Colorization):
        return _adjoint(condition, residual) / sum(w * w for w in LUMA_WEIGHTS)
    if isinstance(condition, Inpainting):
        return residual
    return _adjoint(condition, residual) * condition.factor**2


def test_conditions_reject_bad_input():
    with pytest.raises(ValueError, match="3 channels"):
        Colorization().bind(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="not divisible by the factor 3"):
        SuperResolution(3).bind(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="factor must be an integer >= 2, got 1"):
        SuperResolution(1)
    with pytest.raises(ValueError, match="fractions in"):
        box_mask((4, 4), (0.5, 0.5, 2.0, 0.1))
    with pytest.raises(RuntimeError, match="call .bind"):
        Inpainting()(torch.zeros(1, 3, 4, 4))
