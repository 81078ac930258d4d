"""Splitting samplers for guided diffusion: LTSP (Lie-Trotter) and STSP (Strang) splitting with PLMS.

Wizadwongsa & Suwajanakorn, "Accelerating Guided Diffusion Sampling with Splitting Numerical Methods",
ICLR 2023 (Sec. 4, Algorithms 1 and 2; code sWizad/split-diffusion). Guided sampling is the ODE (VE view,
``x = x0 + sigma eps``)::

    dx/dsigma = f(x, sigma) + g(x, sigma),      f = (x - D_base(x, sigma)) / sigma,   g = -delta / sigma

where ``D_guided = D_base + delta`` (:mod:`diffusion_lab.diffusion.guidance`). Classifier guidance has
``g = -s sigma grad_x log p(c | x, sigma)``, the paper's ``-s sqrt(1 - abar) grad log p(c | x_t)`` in its DDIM
coordinates ``x_bar = x_t / sqrt(abar)``, ``sigma = sqrt(1 - abar) / sqrt(abar)`` (exactly this view). A
high-order solver applied to ``f + g`` suffers from the guidance term, whose derivatives are large and
irregular; splitting integrates the parts apart: ``f`` with PLMS (Adams-Bashforth on the history of
``eps = f`` only, warm-up AB1, AB2, AB3 as in the authors' code, no pseudo Runge-Kutta), ``g`` with Euler.
Step i, ``h = sigma_{i+1} - sigma_i`` (negative), ``m = (sigma_i + sigma_{i+1}) / 2``::

    LTSP:  x' = x_i + h g(x_i, sigma_i);     x_{i+1} = PLMS_f(x', sigma_i -> sigma_{i+1}), eps sampled at x'
    STSP:  x' = x_i + h/2 g(x_i, sigma_i);   x'' = PLMS_f(x', sigma_i -> sigma_{i+1});
           x_{i+1} = x'' + h/2 g_end

``scheme`` picks where STSP samples ``eps`` and ``g_end``:

* ``"paper"`` (default; the authors' ``stsp_sample``): eps at ``x'``; ``g_end`` is the guidance gradient at
  ``(x'', sigma_{i+1})`` with its sigma prefactor at the mid level ``m`` (their ``sqrt(1 - abar)`` of the
  mean of the two sigmas): ``g_end = (m / sigma_{i+1}) g(x'', sigma_{i+1})``, i.e. ``-s m grad log
  p(c | x'', sigma_{i+1})`` for classifier and loss guidance, whose ``g`` is sigma times a gradient.
* ``"second_order"``: eps at ``x_i`` and ``g_end = g(x'' + h/2 g(x_i, sigma_i), sigma_{i+1})``.

Why the second scheme exists. Strang splitting is second order when both sub-flows are solved to second
order (Strang 1968): with the exact f-flow ``y`` from ``x'`` the offset ``y - x = (h/2 - tau) g`` to the
solution ``x`` averages to zero over the step, which is what cancels the f/g commutator. A multistep f-solver
does not follow ``y``: it extrapolates the sampled ``eps``, and in the paper's scheme the samples lie on the
shifted points ``x'_j = x_j + h/2 g_j``, so the f-integral picks up ``h^2/2 f_x g`` per step; the Euler half
steps add ``h^2/4 g_x g``. Both are first-order global errors, which the mixture tests measure (slope 1 in
n, like LTSP, with a smaller constant). Sampling eps on the solution itself restores the zero-mean offset, and
evaluating the closing half step at the predicted end point ``x'' + h/2 g_i`` turns the two half steps into the
trapezoidal rule for g: the scheme is then second order (slope 2, tested), at the paper's cost (one
``D_base`` and two guidance evaluations per step). At ``sigma_{i+1} = 0`` the closing half step is skipped
(``g = O(sigma)``; the authors' discrete grid ends at their smallest timestep instead).

With g = 0 both samplers reduce exactly to PLMS with the AB warm-up (``sample_plms(warmup="ab")``), tested.

The naive baselines of the paper are the other samplers run on the guided denoiser ``D_base + delta``:
``ddim`` (DDIM with guidance, Euler on f + g) and ``plms`` with ``warmup="ab"`` (PLMS on f + g as one ODE).
The guidance reaches a splitting sampler as the ``denoiser`` itself: a
:class:`~diffusion_lab.diffusion.guidance.Guidance` (what ``sample(..., guidance=factory)`` builds) is split
into ``f`` (its ``base``) and ``g`` (its ``ode_term``); any other denoiser has g = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.samplers._base import Callback, Cond, GridDenoiser
from diffusion_lab.diffusion.samplers.multistep import plms_step

GuidanceTerm = Callable[..., Tensor]
"""``g(x, sigma_batch, **cond) -> dx/dsigma``: the guidance part of the guided probability-flow ODE."""

Splitting = Literal["lie_trotter", "strang"]
StrangScheme = Literal["paper", "second_order"]
STRANG_SCHEMES: tuple[str, ...] = ("paper", "second_order")


def split_guided_denoiser(denoiser: DenoiserFn) -> tuple[DenoiserFn, GuidanceTerm | None]:
    """``(D_base, g)`` of a guided denoiser: a :class:`Guidance` splits into its ``base`` denoiser (the f part)
    and its ``ode_term`` (g); any other denoiser is unguided (g = None)."""
    if isinstance(denoiser, Guidance):
        return denoiser.base, denoiser.ode_term
    return denoiser, None


def _check_order(order: int) -> None:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"PLMS order of a splitting sampler must be an integer in 1..4, got {order!r}")


def _splitting_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    splitting: Splitting,
    scheme: StrangScheme,
    order: int,
    callback: Callback | None,
    cond: Cond | None,
) -> Tensor:
    """Shared loop of LTSP and STSP (module docstring). The callback sees the state at ``sigmas[i]`` before
    step i as ``x``, the state after the first guidance sub-step as ``x_guided`` and ``D_base`` at the point
    where eps is sampled as ``denoised``."""
    _check_order(order)
    if scheme not in STRANG_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(STRANG_SCHEMES)}, got {scheme!r}")
    base, term = split_guided_denoiser(denoiser)
    model = GridDenoiser(base, x, sigmas, cond)
    s = model.values
    strang = splitting == "strang"
    on_solution = strang and scheme == "second_order"  # eps sampled at x_i rather than at x'

    history: list[Tensor] = []
    for i in range(model.steps):
        h = s[i + 1] - s[i]
        g_i = None if term is None else term(x, model.sigmas[i].expand(x.shape[0]), **model.cond)
        guided = x if g_i is None else torch.add(x, g_i, alpha=(0.5 if strang else 1.0) * h)
        at = x if on_solution else guided
        denoised = model.at(at, i)
        model.report(callback, i, x, denoised, x_guided=guided)
        eps = (at - denoised).div_(s[i])
        history = [*history[1 - order :], eps] if order > 1 else [eps]
        x = plms_step(guided, history, s[i], s[i + 1], order)
        if strang and g_i is not None and s[i + 1] > 0:
            level = model.sigmas[i + 1].expand(x.shape[0])
            if on_solution:
                g_end = term(torch.add(x, g_i, alpha=0.5 * h), level, **model.cond)
            else:
                g_end = term(x, level, **model.cond).mul_((s[i] + s[i + 1]) / (2 * s[i + 1]))
            x = torch.add(x, g_end, alpha=0.5 * h)
    return x


def sample_ltsp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Lie-Trotter splitting with PLMS (LTSP; Wizadwongsa & Suwajanakorn 2023, Algorithm 1).

    Per step an Euler step of the guidance term g, then a PLMS step (AB of ``order``, lower orders while the
    history fills) of the unguided ODE f. ``denoiser`` is a :class:`Guidance` (split into f and g) or a plain
    denoiser (g = 0: plain PLMS). First order in the splitting. ``generator`` is unused (deterministic).
    """
    return _splitting_loop(
        denoiser,
        x,
        sigmas,
        splitting="lie_trotter",
        scheme="paper",
        order=order,
        callback=callback,
        cond=cond,
    )


def sample_stsp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    scheme: StrangScheme = "paper",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Strang splitting with PLMS (STSP; Wizadwongsa & Suwajanakorn 2023, Algorithm 2).

    Per step a half Euler step of g at ``sigma_i``, a full PLMS step of f, a half Euler step of g at
    ``sigma_{i+1}`` (skipped at sigma = 0); two guidance evaluations and one ``D_base`` per step.
    ``scheme="paper"`` is the authors' algorithm (first order overall with a multistep f-solver);
    ``"second_order"`` samples eps on the solution and closes with the trapezoidal rule for g (second
    order; module docstring). ``generator`` is unused (deterministic).
    """
    return _splitting_loop(
        denoiser, x, sigmas, splitting="strang", scheme=scheme, order=order, callback=callback, cond=cond
    )


__all__ = [
    "GuidanceTerm",
    "STRANG_SCHEMES",
    "split_guided_denoiser",
    "sample_ltsp",
    "sample_stsp",
]
