"""Distillation math against exact identities: the progressive-distillation target lands one DDIM step on the
teacher's two-step result, the VP and VE forms of the target agree, grids nest, the guided teacher is
(1 + w) x_c - w x_u, the stochastic distilled sampler reduces to DDIM and keeps the schedule's marginals, and
SDEdit / inpainting on the distillation grid (the known region stays exactly the input)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.distill_editing import edit_sigmas, edit_start, inpaint, named_mask, sdedit
from diffusion_lab.diffusion.distillation import (
    KarrasTime,
    check_halving,
    ddim_step_to,
    distillation_sigmas,
    guided_teacher,
    one_step_target,
    progressive_target,
    sample_guidance_weights,
    student_step_levels,
    two_step_ddim,
    vp_one_step_target,
    weighted_error,
)
from diffusion_lab.diffusion.samplers import (
    SAMPLERS,
    SDE_SAMPLERS,
    ddim_step,
    distilled_levels,
    karras_sigmas,
    sample,
    sample_ddim,
    sample_distilled_stochastic,
)
from diffusion_lab.diffusion.schedules import VPCosine

F64 = torch.float64


def _levels(batch: int, seed: int = 0, last_zero: bool = False):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.rand(batch, generator=g, dtype=F64) * 5 - 2)  # e^-2 .. e^3
    sigma_mid = sigma * (0.2 + 0.7 * torch.rand(batch, generator=g, dtype=F64))
    sigma_next = (
        torch.zeros_like(sigma) if last_zero else sigma_mid * torch.rand(batch, generator=g, dtype=F64)
    )
    return sigma, sigma_mid, sigma_next


# ---------------------------------------------------------------------------------------------------
# The progressive-distillation target
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("last_zero", [False, True])
def test_one_ddim_step_on_the_target_lands_on_the_two_step_teacher(mixture, last_zero):
    """Identity: DDIM(x, x_tilde, sigma -> sigma'') == teacher's DDIM(DDIM(x, sigma -> sigma'), sigma' -> sigma'')."""
    sigma, sigma_mid, sigma_next = _levels(64, last_zero=last_zero)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * sigma[:, None] * 1.5
    labels = torch.arange(64) % 3
    target = progressive_target(mixture, x, sigma, sigma_mid, sigma_next, labels=labels)
    # Teacher two steps written independently with the sampler suite's scalar DDIM step, sample by sample.
    for b in range(0, 64, 7):
        s, s_mid, s_next = float(sigma[b]), float(sigma_mid[b]), float(sigma_next[b])
        xb, lb = x[b : b + 1], labels[b : b + 1]
        x_mid = ddim_step(xb, mixture(xb, sigma[b : b + 1], labels=lb), s, s_mid)
        x_two = ddim_step(x_mid, mixture(x_mid, sigma_mid[b : b + 1], labels=lb), s_mid, s_next)
        student_step = ddim_step(xb, target[b : b + 1], s, s_next)
        torch.testing.assert_close(student_step, x_two, rtol=1e-12, atol=1e-12)
    if last_zero:  # at the last step the target is the teacher's second prediction
        _, denoised_mid = two_step_ddim(mixture, x, sigma, sigma_mid, sigma_next, labels=labels)
        torch.testing.assert_close(target, denoised_mid, rtol=0, atol=1e-14)


def test_target_agrees_with_the_sampler_suite_on_a_two_step_grid(mixture):
    """With sigma'' = 0: sample_ddim over [s, s', 0] with the teacher == sample_ddim over [s, 0] with x_tilde."""
    s, s_mid = 3.0, 0.7
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * s
    teacher_two = sample_ddim(mixture, x, torch.tensor([s, s_mid, 0.0], dtype=F64))
    full = torch.full((32,), s, dtype=F64)
    target = progressive_target(mixture, x, full, full * 0 + s_mid, full * 0)
    student_one = sample_ddim(lambda x_in, sigma: target, x, torch.tensor([s, 0.0], dtype=F64))
    torch.testing.assert_close(student_one, teacher_two, rtol=1e-12, atol=1e-12)


def test_vp_form_of_the_target_equals_the_ve_form():
    """(z'' - (s''/s) z) / (a'' - (s''/s) a) in VP variables == (x'' - r x)/(1 - r) in the VE view."""
    sigma, _, sigma_next = _levels(16, seed=3)
    x = torch.randn(16, 5, dtype=F64)
    x_next = torch.randn(16, 5, dtype=F64)
    alpha, alpha_next = torch.rsqrt(1 + sigma**2), torch.rsqrt(1 + sigma_next**2)
    vp = vp_one_step_target(
        alpha[:, None] * x,
        alpha_next[:, None] * x_next,
        alpha,
        alpha * sigma,
        alpha_next,
        alpha_next * sigma_next,
    )
    torch.testing.assert_close(vp, one_step_target(x, x_next, sigma, sigma_next), rtol=1e-12, atol=1e-12)


def test_per_sample_ddim_step_equals_the_scalar_step():
    x, denoised = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    sigma, sigma_next = torch.tensor([2.0, 1.0, 0.5], dtype=F64), torch.tensor([1.0, 0.3, 0.0], dtype=F64)
    out = ddim_step_to(x, denoised, sigma, sigma_next)
    for b in range(3):
        expected = ddim_step(x[b], denoised[b], float(sigma[b]), float(sigma_next[b]))
        torch.testing.assert_close(out[b], expected, rtol=1e-15, atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# Guided teacher, weighting, w sampling
# ---------------------------------------------------------------------------------------------------
def test_guided_teacher_is_the_cfg_combination_with_per_sample_w(mixture):
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    sigma = torch.full((12,), 0.8, dtype=F64)
    labels = torch.arange(12) % 3
    w = torch.linspace(0, 4, 12, dtype=F64)
    guided = guided_teacher(mixture, w, null_label=mixture.null_label)(x, sigma, labels=labels)
    d_c = mixture(x, sigma, labels=labels)
    d_u = mixture(x, sigma, labels=torch.full_like(labels, mixture.null_label))
    torch.testing.assert_close(guided, (1 + w[:, None]) * d_c - w[:, None] * d_u, rtol=1e-12, atol=1e-12)


def test_truncated_snr_weighting_is_max_snr_one():
    sigma = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    pred, target = torch.zeros(3, 4, dtype=F64), torch.ones(3, 4, dtype=F64) * 2
    expected = torch.maximum(sigma.pow(-2), torch.ones(3, dtype=F64)) * 4
    torch.testing.assert_close(weighted_error(pred, target, sigma), expected)
    torch.testing.assert_close(weighted_error(pred, target, sigma, "v"), (1 + sigma**2) / sigma**2 * 4)


def test_guidance_weights_are_uniform_on_the_interval():
    w = sample_guidance_weights(20000, 0.5, 4.0, generator=torch.Generator().manual_seed(0))
    assert 0.5 <= w.min() and w.max() <= 4.0
    assert abs(w.mean().item() - 2.25) < 0.02 and abs(w.var().item() - 3.5**2 / 12) < 0.03
    with pytest.raises(ValueError, match="w_min=3.0, w_max=1.0"):
        sample_guidance_weights(4, 3.0, 1.0)


def test_halving_schedule_is_validated():
    assert check_halving([64, 32, 16, 8, 4, 2, 1]) == [64, 32, 16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match="halve.*8 followed by 2"):
        check_halving([16, 8, 2, 1])
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        check_halving([0])


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [VPCosine(), KarrasTime(0.002, 80.0, 7.0)], ids=["cosine", "karras"])
@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_grids_nest_and_end_at_zero(schedule, n):
    fine, coarse = distillation_sigmas(schedule, 2 * n), distillation_sigmas(schedule, n)
    assert coarse[-1] == 0 and len(coarse) == n + 1 and (coarse[1:] < coarse[:-1]).all()
    torch.testing.assert_close(fine[::2], coarse, rtol=1e-12, atol=0)
    torch.testing.assert_close(coarse[0], schedule.sigma_ve(torch.tensor(1.0, dtype=F64)))


def test_karras_time_grid_is_edms_karras_grid():
    """sigma(i/N), i = N..1 are the first N levels of EDM's (N+1)-level Karras grid (Karras et al. eq. 5)."""
    n = 16
    schedule = KarrasTime(0.002, 80.0, 7.0)
    expected = karras_sigmas(n + 1, 0.002, 80.0, 7.0)[:n]
    torch.testing.assert_close(distillation_sigmas(schedule, n)[:n], expected, rtol=1e-12, atol=0)
    t = torch.rand(50, dtype=F64)
    torch.testing.assert_close(schedule.t_from_sigma(schedule.sigma_ve(t)), t, rtol=0, atol=1e-12)


def test_clipped_schedule_with_duplicate_levels_is_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        distillation_sigmas(VPCosine(logsnr_min=-8.0), 1024)


def test_student_levels_are_consecutive_levels_of_the_teacher_grid():
    schedule, n = VPCosine(), 4
    fine = distillation_sigmas(schedule, 2 * n).float()
    sigma, mid, nxt = student_step_levels(schedule, n, 4000, generator=torch.Generator().manual_seed(0))
    index = torch.searchsorted(-fine, -sigma)  # position of sigma in the descending fine grid
    assert torch.equal(fine[index], sigma) and torch.equal(fine[index + 1], mid)
    assert torch.equal(fine[index + 2], nxt)
    assert sorted(set(index.tolist())) == [0, 2, 4, 6]  # every student step t = i/N, i = N..1, is drawn
    counts = torch.bincount(index // 2, minlength=n).double()
    assert ((counts / 4000 - 0.25).abs() < 0.03).all()


# ---------------------------------------------------------------------------------------------------
# The stochastic distilled sampler
# ---------------------------------------------------------------------------------------------------
def test_stochastic_sampler_is_registered_as_an_sde_sampler():
    assert SAMPLERS["distilled_stochastic"] is sample_distilled_stochastic
    assert "distilled_stochastic" in SDE_SAMPLERS


def test_stochastic_sampler_without_noise_is_ddim(mixture):
    sigmas = distillation_sigmas(VPCosine(), 8)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    labels = torch.arange(32) % 3
    out = sample(mixture, x, sigmas, method="distilled_stochastic", eta=0.0, cond={"labels": labels})
    torch.testing.assert_close(out, sample_ddim(mixture, x, sigmas, cond={"labels": labels}), rtol=0, atol=0)


def test_stochastic_levels_are_a_double_step_then_noise_back():
    s = [8.0, 4.0, 2.0, 1.0, 0.0]
    assert distilled_levels(s, 0) == pytest.approx((2.0, math.sqrt(16 - 4)))  # down to s_2, noise up to s_1
    assert distilled_levels(s, 2) == (0.0, 1.0)  # the double step reaches 0, noise back to s_3
    assert distilled_levels(s, 3) == (0.0, 0.0)  # last step deterministic
    down, up = distilled_levels(s, 0, eta=0.5)
    assert down**2 + up**2 == pytest.approx(16.0) and up == pytest.approx(0.5 * math.sqrt(12))
    with pytest.raises(ValueError, match="eta must be in"):
        sample_distilled_stochastic(lambda x, s: x, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), eta=1.5)


def test_stochastic_sampler_keeps_the_schedule_marginals():
    """Data = one point p, so D = p exactly and every DDIM step is exact: the state at level sigma_i must be
    p + sigma_i eps_i with eps_i ~ N(0, I); the fresh noise decorrelates consecutive states by sigma_down/sigma_i."""
    point = torch.tensor([0.5, -1.0], dtype=F64)
    sigmas = distillation_sigmas(VPCosine(logsnr_min=-6.0), 6)
    n = 40000
    x = point + torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    states = []
    out = sample_distilled_stochastic(
        lambda x_in, sigma: point.expand_as(x_in),
        x,
        sigmas,
        generator=torch.Generator().manual_seed(1),
        callback=lambda info: states.append(info["x"].clone()),
    )
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-12)
    s = sigmas.tolist()
    for i, state in enumerate(states):
        eps = (state - point) / s[i]
        assert abs(eps.var().item() - 1) < 0.03, (i, eps.var().item())
        assert eps.mean(0).abs().max() < 0.03
        if i + 1 < len(states):
            eps_next = (states[i + 1] - point) / s[i + 1]
            corr = (eps * eps_next).mean().item()
            expected = distilled_levels(s, i)[0] / s[i + 1]  # sigma_down / sigma_{i+1}
            assert abs(corr - expected) < 0.03, (i, corr, expected)
            assert expected < 0.999  # the noise is real


def test_stochastic_sampler_draws_the_mixture_distribution(mixture):
    """Many steps: sample mean, covariance and class frequencies match the exact mixture (z-scores < 4)."""
    sigmas = karras_sigmas(100, 0.01, 20.0)
    gen = torch.Generator().manual_seed(3)
    n = 4000
    x = torch.randn(n, 2, generator=gen, dtype=F64) * sigmas[0]
    out = sample_distilled_stochastic(mixture, x, sigmas, generator=gen)
    mean, cov = mixture.mean_and_cov()
    z_mean = ((out.mean(0) - mean) / (torch.diag(cov) / n).sqrt()).abs().max()
    centered = out - mean
    emp = centered.T @ centered / n
    var_of_cov = (torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / n  # Gaussian approximation
    z_cov = ((emp - cov) / var_of_cov.sqrt()).abs().max()
    predicted = mixture.class_log_posterior(out, torch.full((n,), 1e-3, dtype=F64)).argmax(1)
    freq = torch.bincount(predicted, minlength=3).double() / n
    w = torch.stack([mixture.weights[mixture.component_labels == c].sum() for c in range(3)])
    z_freq = ((freq - w) / (w * (1 - w) / n).sqrt()).abs().max()
    assert max(z_mean, z_cov, z_freq) < 4.0, (z_mean, z_cov, z_freq)


# ---------------------------------------------------------------------------------------------------
# Editing (SDEdit) and inpainting on the distillation grid
# ---------------------------------------------------------------------------------------------------
def test_edit_start_and_levels_are_the_tail_of_the_grid():
    assert [edit_start(4, s) for s in (1.0, 0.75, 0.5, 0.3, 0.25, 0.01)] == [4, 3, 2, 2, 1, 1]
    grid = distillation_sigmas(VPCosine(), 4)
    torch.testing.assert_close(edit_sigmas(VPCosine(), 4, 0.5), grid[2:], rtol=0, atol=0)
    torch.testing.assert_close(edit_sigmas(VPCosine(), 4, 1.0), grid, rtol=0, atol=0)
    assert edit_start(4, 0.0) == 0  # strength 0: no step, the input itself
    torch.testing.assert_close(edit_sigmas(VPCosine(), 4, 0.0), grid[-1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="strength must be in \\[0, 1\\].*got 1.5"):
        edit_start(4, 1.5)


def test_full_strength_edit_is_ddim_generation_from_the_noised_input(mixture):
    sigmas = distillation_sigmas(KarrasTime(0.01, 20.0, 7.0), 4)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.arange(16) % 3
    out = sdedit(mixture, x0, sigmas, generator=torch.Generator().manual_seed(5), labels=labels)
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = sample_ddim(mixture, x0 + sigmas[0] * eps, sigmas, cond={"labels": labels})
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_edit_strength_trades_faithfulness_for_change(mixture):
    """Class-0 points edited with their own label stay near the input at strength 0.25 and become new samples at
    strength 1; edited towards class 2 with guidance they land in class 2 (exact class posterior of the mixture)."""
    n, schedule = 600, KarrasTime(0.01, 20.0, 7.0)
    x0, labels = mixture.sample(3 * n, generator=torch.Generator().manual_seed(1))
    x0 = x0[labels == 0][:n]
    guided = guided_teacher(mixture, 2.0, null_label=mixture.null_label)
    own, target = torch.zeros(len(x0), dtype=torch.long), torch.full((len(x0),), 2)

    def edit(strength: float, label: torch.Tensor) -> torch.Tensor:
        sigmas = edit_sigmas(schedule, 8, strength)
        return sdedit(guided, x0, sigmas, generator=torch.Generator().manual_seed(2), labels=label)

    near, far = ((edit(s, own) - x0).norm(dim=1).mean() for s in (0.25, 1.0))
    assert near < 0.3 * far, (near, far)
    moved = edit(1.0, target)
    posterior = mixture.class_log_posterior(moved, torch.full((len(moved),), 1e-3, dtype=F64)).argmax(1)
    assert (posterior == 2).double().mean() > 0.95


def _gaussian_image_prior(seed: int = 0):
    from gaussian_image_prior import GaussianImagePrior

    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(16, 16, generator=g, dtype=F64) / 4
    return GaussianImagePrior(torch.randn(16, generator=g, dtype=F64) * 0.3, factor @ factor.T, (1, 4, 4))


@pytest.mark.parametrize("name", ["left", "right", "top", "bottom", "center", "border"])
def test_inpainting_keeps_the_known_region_exactly(name):
    images = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    mask = named_mask(name, images.shape)
    assert 0 < int(mask.sum()) < 16
    sigmas = distillation_sigmas(KarrasTime(0.01, 20.0, 7.0), 4)
    out = inpaint(_gaussian_image_prior(), images, mask, sigmas, generator=torch.Generator().manual_seed(4))
    known = mask.expand_as(images)
    assert torch.equal(out[known], images[known])
    assert (out[~known] - images[~known]).abs().min() > 0  # the unknown region was generated, not copied


def test_inpainting_a_point_mass_recovers_the_point_in_the_unknown_region():
    """Data = one image p: D = p exactly, every DDIM step is exact, so the hole is filled with p."""
    point = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    images = torch.randn(5, 1, 4, 4, dtype=F64)
    mask = named_mask("center", images.shape)
    out = inpaint(lambda x, s: point.expand_as(x), images, mask, distillation_sigmas(VPCosine(), 2))
    expected = torch.where(mask, images, point.expand_as(images))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="end at sigma = 0"):
        inpaint(lambda x, s: x, images, mask, torch.tensor([2.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="unknown mask 'diagonal'"):
        named_mask("diagonal", images.shape)
