"""Sampling grids against their defining formulas (EDM eq. 5 and Table 1, DDIM's respacing)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.samplers import (
    SIGMA_SCHEDULES,
    check_sigmas,
    get_sigmas,
    karras_sigmas,
    loglinear_sigmas,
    respaced_sigmas,
    vp_sigmas,
)
from diffusion_lab.diffusion.schedules import VPCosine

F64 = torch.float64


def test_karras_grid_follows_edm_eq5_element_by_element():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    sigmas = karras_sigmas(n, smin, smax, rho)
    expected = [
        (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)
    ] + [0.0]
    assert sigmas.dtype == F64 and sigmas.shape == (n + 1,)
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-13, abs=0)
    assert sigmas[0] == pytest.approx(smax, rel=1e-14) and sigmas[-2] == pytest.approx(smin, rel=1e-12)
    check_sigmas(sigmas)  # a valid sampling grid


def test_karras_rho_one_is_uniform_and_large_rho_tends_to_geometric():
    torch.testing.assert_close(
        karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], torch.linspace(5.0, 1.0, 5, dtype=F64)
    )
    torch.testing.assert_close(
        karras_sigmas(6, 0.01, 10.0, rho=1e6)[:-1], loglinear_sigmas(6, 0.01, 10.0)[:-1], rtol=1e-5, atol=0
    )


def test_loglinear_grid_has_a_constant_ratio():
    sigmas = loglinear_sigmas(10, 0.01, 50.0)[:-1]
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 50.0) ** (1 / 9)))
    assert sigmas[0] == pytest.approx(50.0) and sigmas[-1] == pytest.approx(0.01)


def test_vp_grid_is_edm_table1_vp_discretisation():
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t_i = 1 + i/(n-1)(eps_s - 1)."""
    n, eps_s, beta_d, beta_min = 12, 1e-3, 19.9, 0.1
    t = [1 + i / (n - 1) * (eps_s - 1) for i in range(n)]
    expected = [math.sqrt(math.exp(0.5 * beta_d * ti**2 + beta_min * ti) - 1) for ti in t] + [0.0]
    assert vp_sigmas(n, eps_s=eps_s).tolist() == pytest.approx(expected, rel=1e-12)


def test_vp_grid_accepts_another_schedule():
    schedule = VPCosine()
    sigmas = vp_sigmas(8, schedule=schedule, eps_s=0.01)
    expected = schedule.sigma_ve(torch.linspace(1.0, 0.01, 8, dtype=F64))
    torch.testing.assert_close(sigmas[:-1], expected)


MODEL_SIGMAS = (lambda a: ((1 - a) / a).sqrt())(
    torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
)


def test_respaced_uniform_is_ddim_skip():
    sigmas = respaced_sigmas(50, MODEL_SIGMAS, "uniform")
    steps = list(range(0, 1000, 1000 // 50))[::-1]  # DDIM: seq = range(0, T, T // n)
    torch.testing.assert_close(sigmas, torch.cat([MODEL_SIGMAS[steps], torch.zeros(1, dtype=F64)]))


def test_respaced_quad_is_ddim_quadratic_skip_without_repeats():
    n = 100
    seq = sorted({int(s) for s in (torch.linspace(0, math.sqrt(0.8 * 1000), n, dtype=F64) ** 2).tolist()})
    sigmas = respaced_sigmas(n, MODEL_SIGMAS, "quad")
    torch.testing.assert_close(sigmas, torch.cat([MODEL_SIGMAS[seq[::-1]], torch.zeros(1, dtype=F64)]))
    check_sigmas(sigmas)  # repeated low timesteps were merged: still strictly decreasing
    assert len(sigmas) - 1 == len(seq) < n


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
def test_respaced_other_spacings_pick_model_levels(spacing):
    sigmas = respaced_sigmas(10, MODEL_SIGMAS, spacing)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert all(bool((MODEL_SIGMAS == s).any()) for s in sigmas[:-1])
    check_sigmas(sigmas)


def test_get_sigmas_dispatches_by_name_and_rejects_typos():
    torch.testing.assert_close(
        get_sigmas("karras", 5, sigma_min=0.1, sigma_max=3.0), karras_sigmas(5, 0.1, 3.0)
    )
    torch.testing.assert_close(
        get_sigmas("respaced", 5, model_sigmas=MODEL_SIGMAS, spacing="quad"),
        respaced_sigmas(5, MODEL_SIGMAS, "quad"),
    )
    assert set(SIGMA_SCHEDULES) == {"karras", "loglinear", "vp", "respaced"}
    with pytest.raises(ValueError, match="unknown sigma schedule 'karas'; expected one of karras, loglinear"):
        get_sigmas("karas", 5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sigma_mn'\]"):
        get_sigmas("karras", 5, sigma_mn=0.1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: karras_sigmas(0), "integer >= 1"),
        (lambda: karras_sigmas(5, sigma_min=2.0, sigma_max=1.0), "sigma_min <= sigma_max"),
        (lambda: karras_sigmas(5, sigma_min=0.0), "0 < sigma_min"),
        (lambda: karras_sigmas(5, rho=0.0), "rho must be > 0"),
        (lambda: loglinear_sigmas(3, 1.0, 1.0), "need sigma_min < sigma_max"),
        (lambda: vp_sigmas(5, eps_s=1.5), r"eps_s must be in \(0, 1\)"),
        (lambda: respaced_sigmas(2000, MODEL_SIGMAS), r"in \[1, 1000\]"),
        (lambda: respaced_sigmas(10, MODEL_SIGMAS.flip(0)), "strictly ascending"),
        (lambda: respaced_sigmas(10, MODEL_SIGMAS, "cubic"), "unknown spacing 'cubic'"),
    ],
)
def test_bad_grid_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_single_level_grid_is_one_step_to_zero():
    assert karras_sigmas(1, 0.5, 0.5).tolist() == [0.5, 0.0]
    assert vp_sigmas(1).tolist() == pytest.approx([math.sqrt(math.exp(10.05) - 1), 0.0])
