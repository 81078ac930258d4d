"""Linear multistep samplers: PLMS (PNDM) and LMS, with the reusable steps the splitting samplers call.

Both integrate ``dx/dsigma = eps_hat(x, sigma) = (x - D(x, sigma)) / sigma`` by reusing the derivatives of
earlier steps (one denoiser evaluation per step after warm-up)::

    x_{i+1} = x_i + sum_j w_{ij} eps_hat_{i-j}

* PLMS (Liu et al. 2022, "PNDM", eq. 12): ``w_ij = (sigma_{i+1} - sigma_i) b_j`` with the constant-step
  Adams-Bashforth weights ``b`` (AB4: 55, -59, 37, -9 over 24). In the VE view PNDM's transfer
  ``phi(x, eps, t, t - delta)`` is the DDIM step ``x + (sigma' - sigma) eps``, so this is PNDM exactly.
  The weights assume equal steps in the grid's index, so the method is 4th order on a grid uniform in sigma
  but only 2nd order on graded grids (Karras rho, VP uniform-t): the error of averaging eps with equal
  weights over unequal sigma-intervals is O(h^3) per step.
* LMS (k-diffusion's ``sample_lms``): ``w_ij = int_{sigma_i}^{sigma_{i+1}} l_j(s) ds`` with the Lagrange
  basis ``l_j`` on the previous nodes ``sigma_i, ..., sigma_{i-k+1}`` (variable-step Adams-Bashforth),
  integrated exactly here; order ``k`` on any smooth grid.

Warm-up: the first steps lack history. PNDM's pseudo Runge-Kutta warm-up (``warmup="prk"``, eq. 13)
is classic RK4 in sigma through the DDIM transfer (4 evaluations per step, midpoint ``(sigma + sigma')/2``);
the lower-order warm-up AB1, AB2, AB3 (``warmup="ab"`` / ``"lower_order"``) costs nothing extra but its
first Euler step has local error O(h^2), which caps the global order at 2 (with a small constant, since
the path is nearly straight at high noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.samplers._base import Callback, Cond, GridDenoiser

# Adams-Bashforth weights for equal steps, newest derivative first (PNDM eq. 12 and its warm-up).
AB_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def linear_combination(x: Tensor, history: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``x + sum_j weights[j] * history[-1 - j]`` (newest entry of ``history`` last) into one new tensor."""
    out = torch.add(x, history[-1], alpha=weights[0])
    for j in range(1, len(weights)):
        out.add_(history[-1 - j], alpha=weights[j])
    return out


def plms_step(
    x: Tensor, eps_history: Sequence[Tensor], sigma: float, sigma_next: float, order: int = 4
) -> Tensor:
    """One PLMS step (PNDM eq. 12, DDIM transfer in the VE view): ``x + (sigma_next - sigma) eps'`` with
    ``eps'`` the Adams-Bashforth combination of the last ``min(len(eps_history), order)`` derivatives
    (``eps_history`` newest last): AB1, (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24.

    This is the diffusion-part step of the splitting samplers (LTSP/STSP), which keep their own history.
    """
    if not 1 <= order <= 4:
        raise ValueError(f"PLMS order must be 1..4, got {order}")
    if not eps_history:
        raise ValueError("plms_step needs at least one derivative in eps_history")
    k = min(len(eps_history), order)
    h = sigma_next - sigma
    return linear_combination(x, eps_history, [h * b for b in AB_COEFFICIENTS[k - 1]])


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Exact variable-step Adams-Bashforth weights ``int_{s_i}^{s_{i+1}} l_j(s) ds``, j = 0..k-1, where
    ``l_j`` is the Lagrange basis polynomial on the nodes ``s_i, s_{i-1}, ..., s_{i-k+1}``, k = min(order,
    i + 1). Computed in float64 on the scaled variable ``v = (s - s_i)/(s_{i+1} - s_i)``, integrated over
    ``v in [0, 1]`` term by term (plain Python: k <= 6 terms, cheaper than any array call).
    """
    k = min(order, i + 1)
    h = sigmas[i + 1] - sigmas[i]
    nodes = [(sigmas[i - m] - sigmas[i]) / h for m in range(k)]
    weights = []
    for j in range(k):
        poly = [1.0]  # coefficients of prod_{m != j} (v - v_m) / (v_j - v_m), lowest degree first
        for m in range(k):
            if m != j:
                scale = 1.0 / (nodes[j] - nodes[m])
                shifted = [0.0] + poly  # v * poly
                poly = [
                    (shifted[d] - nodes[m] * (poly[d] if d < len(poly) else 0.0)) * scale
                    for d in range(len(shifted))
                ]
        weights.append(h * sum(c / (d + 1) for d, c in enumerate(poly)))
    return weights


def rk4_step(
    model: GridDenoiser, x: Tensor, eps: Tensor, sigma: float, sigma_next: float, i_next: int
) -> Tensor:
    """Classic RK4 on ``dx/dsigma = eps_hat`` = PNDM's pseudo Runge-Kutta step (eq. 13) in the VE view.

    ``eps`` is the derivative at ``(x, sigma)`` (already evaluated); three more evaluations at the midpoint
    ``(sigma + sigma_next)/2`` (twice) and at ``sigma_next`` (grid index ``i_next``, must be > 0)::

        x_{i+1} = x + (sigma_next - sigma)(e1 + 2 e2 + 2 e3 + e4) / 6
    """
    h = sigma_next - sigma
    mid = sigma + h / 2
    x1 = torch.add(x, eps, alpha=h / 2)
    e2 = (x1 - model.at_value(x1, mid)).div_(mid)
    x2 = torch.add(x, e2, alpha=h / 2)
    e3 = (x2 - model.at_value(x2, mid)).div_(mid)
    x3 = torch.add(x, e3, alpha=h)
    e4 = (x3 - model.at(x3, i_next)).div_(sigma_next)
    return linear_combination(x, [e4, e3, e2, eps], [h / 6, h / 3, h / 3, h / 6])


def _multistep_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int,
    rk4_warmup: bool,
    constant_step_weights: bool,
    callback: Callback | None,
    cond: Cond | None,
) -> Tensor:
    """Shared loop of PLMS and LMS: ``x_{i+1} = x_i + sum_j w_ij eps_{i-j}``; RK4 for the first
    ``order - 1`` steps when ``rk4_warmup`` (never for a step to sigma = 0, where eps is undefined)."""
    model = GridDenoiser(denoiser, x, sigmas, cond)
    s = model.values
    # Step i sees min(order, i + 1) derivatives; LMS weights are Python floats fixed before the loop.
    weights = None if constant_step_weights else [lms_coefficients(s, i, order) for i in range(model.steps)]
    history: list[Tensor] = []
    for i in range(model.steps):
        denoised = model.at(x, i)
        model.report(callback, i, x, denoised)
        eps = (x - denoised).div_(s[i])
        history = [*history[1 - order :], eps] if order > 1 else [eps]
        if rk4_warmup and i < order - 1 and s[i + 1] > 0:
            x = rk4_step(model, x, eps, s[i], s[i + 1], i + 1)
        elif weights is None:
            x = plms_step(x, history, s[i], s[i + 1], order)
        else:
            x = linear_combination(x, history, weights[i])
    return x


def sample_plms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    warmup: Literal["prk", "ab"] = "prk",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, eqs. 12-13; module docstring).

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i)(55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24`` with
    ``e = eps_hat``. Warm-up for the first three steps: ``"prk"`` (PNDM's pseudo Runge-Kutta = RK4 in sigma,
    4 evaluations per step, N + 9 evaluations in all) or ``"ab"`` (AB1, AB2, AB3; N evaluations; the
    variant of the splitting samplers). 4th order on sigma-uniform grids with ``"prk"``.
    """
    if warmup not in ("prk", "ab"):
        raise ValueError(
            f"warmup must be 'prk' (pseudo Runge-Kutta) or 'ab' (Adams-Bashforth), got {warmup!r}"
        )
    return _multistep_loop(
        denoiser,
        x,
        sigmas,
        order=4,
        rk4_warmup=warmup == "prk",
        constant_step_weights=True,
        callback=callback,
        cond=cond,
    )


def sample_lms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    warmup: Literal["lower_order", "rk4"] = "lower_order",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Linear multistep on the sigma grid (k-diffusion ``sample_lms``; variable-step Adams-Bashforth).

    ``x_{i+1} = x_i + sum_{j<k} c_ij eps_hat_{i-j}`` with ``c_ij = int_{sigma_i}^{sigma_{i+1}} l_j``, the
    integrated Lagrange basis on the last k nodes (:func:`lms_coefficients`, exact polynomial integrals
    instead of k-diffusion's numerical quadrature). ``warmup="lower_order"`` uses orders 1..k-1 for the
    first steps (k-diffusion), ``"rk4"`` takes them with RK4 (3 extra evaluations each), which keeps the
    global order ``min(order, 4)``.
    """
    if not isinstance(order, int) or not 1 <= order <= 6:
        raise ValueError(f"LMS order must be an integer in 1..6 (higher orders are unstable), got {order!r}")
    if warmup not in ("lower_order", "rk4"):
        raise ValueError(f"warmup must be 'lower_order' or 'rk4', got {warmup!r}")
    return _multistep_loop(
        denoiser,
        x,
        sigmas,
        order=order,
        rk4_warmup=warmup == "rk4",
        constant_step_weights=False,
        callback=callback,
        cond=cond,
    )


__all__ = [
    "AB_COEFFICIENTS",
    "linear_combination",
    "plms_step",
    "lms_coefficients",
    "rk4_step",
    "sample_plms",
    "sample_lms",
]
