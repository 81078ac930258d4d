"""Splitting samplers for guided diffusion: LTSP (Lie-Trotter) and STSP (Strang) splitting with PLMS.

Wizadwongsa & Suwajanakorn, "Accelerating Guided Diffusion Sampling with Splitting Numerical Methods",
ICLR 2023 (Algorithms 1 and 2). Guided sampling is the ODE (VE view, ``x = x0 + sigma eps``)::

    dx/dsigma = f(x, sigma) + g(x, sigma),      f = (x - D_base(x, sigma)) / sigma,   g = -delta / sigma

where ``D_guided = D_base + delta`` (see :mod:`diffusion_lab.diffusion.guidance`; classifier guidance has
``g = -s sigma grad_x log p(c | x, sigma)``, which is the paper's ``-s sqrt(1 - abar) grad log p(c | x_t)`` in
its DDIM coordinates ``x_bar = x_t / sqrt(abar)``, ``sigma = sqrt(1 - abar) / sqrt(abar)``: exactly this
view). A high-order solver applied to ``f + g`` suffers from the guidance term, whose derivatives are large
and irregular; splitting integrates the two parts apart, ``f`` with PLMS (4th-order Adams-Bashforth on the
history of ``eps = f`` only, warm-up AB1, AB2, AB3 as in the authors' code) and ``g`` with Euler. Step i,
``h = sigma_{i+1} - sigma_i`` (negative)::

    LTSP:  x' = x_i + h g(x_i, sigma_i);        x_{i+1} = PLMS_f(x', sigma_i -> sigma_{i+1})
    STSP:  x' = x_i + h/2 g(x_i, sigma_i);      x'' = PLMS_f(x', sigma_i -> sigma_{i+1});
           x_{i+1} = x'' + h/2 g(x'', sigma_{i+1})

LTSP takes the guidance step first, as the authors' code does (the paper's Algorithm 1 writes it after the
PLMS step; the order does not change the method's first-order splitting error). STSP's second half step is
evaluated at the end level ``sigma_{i+1}`` (the authors' code evaluates the classifier there too): then the
pair of half steps is the trapezoidal rule in sigma for g's explicit sigma-dependence and, for an exact f
flow, the local error of the step is ``-h^2/4 g_x g`` instead of LTSP's ``h^2/2 (f_x g - g_x f - g_x g -
g_sigma)``: the commutator of f and g (the Lie-Trotter splitting error) cancels. At ``sigma_{i+1} = 0`` the
guidance term vanishes (``g = O(sigma)``), so the last half step is skipped. Cost per step: one evaluation
of ``D_base`` and one (LTSP) or two (STSP) evaluations of the guidance term.

With g = 0 both reduce exactly to PLMS with the AB warm-up (``sample_plms(warmup="ab")``): a test checks it.

The naive baselines of the paper are the other samplers run on the guided denoiser ``D_base + delta``:
``ddim`` (DDIM with guidance, i.e. Euler on f + g) and ``plms`` with ``warmup="ab"`` (PLMS on f + g as one
ODE). The guidance reaches a splitting sampler as the ``denoiser`` itself: a
:class:`~diffusion_lab.diffusion.guidance.Guidance` object (what ``sample(..., guidance=factory)`` builds)
is split into ``f`` (its ``base``) and ``g`` (its ``ode_term``); any other denoiser has g = 0.
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

VARIANT = "explicit"
Splitting = Literal["lie_trotter", "strang"]


def split_guided_denoiser(denoiser: DenoiserFn) -> tuple[DenoiserFn, GuidanceTerm | None]:
    """``(D_base, g)`` of a guided denoiser: a :class:`Guidance` splits into its ``base`` denoiser (the f part)
    and its ``ode_term`` (g); any other denoiser is unguided (g = None)."""
    if isinstance(denoiser, Guidance):
        return denoiser.base, denoiser.ode_term
    return denoiser, None


def _check_order(order: int) -> None:
    if not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"PLMS order of a splitting sampler must be an integer in 1..4, got {order!r}")


def _splitting_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    splitting: Splitting,
    order: int,
    callback: Callback | None,
    cond: Cond | None,
) -> Tensor:
    """Shared loop of LTSP and STSP (module docstring). The callback sees the state at ``sigmas[i]`` before
    step i as ``x``, the state after the first guidance sub-step as ``x_guided`` and ``D_base`` there as
    ``denoised``."""
    _check_order(order)
    base, term = split_guided_denoiser(denoiser)
    model = GridDenoiser(base, x, sigmas, cond)
    s = model.values
    first_fraction = 1.0 if splitting == "lie_trotter" else 0.5

    def guidance_step(state: Tensor, i: int, step: float) -> Tensor:
        level = model.sigmas[i].expand(state.shape[0])
        return torch.add(state, term(state, level, **model.cond), alpha=step)

    history: list[Tensor] = []
    for i in range(model.steps):
        h = s[i + 1] - s[i]
        if term is not None:
            g_first = term(x, model.sigmas[i].expand(x.shape[0]), **model.cond)
        guided = x if term is None else torch.add(x, g_first, alpha=first_fraction * h)
        denoised = model.at(guided, i)
        model.report(callback, i, x, denoised, x_guided=guided)
        eps = (guided - denoised).div_(s[i])
        history = [*history[1 - order :], eps] if order > 1 else [eps]
        x = plms_step(guided, history, s[i], s[i + 1], order)
        if splitting == "strang" and term is not None and s[i + 1] > 0:
            if VARIANT == "implicit":
                level = model.sigmas[i + 1].expand(x.shape[0])
                pred = torch.add(x, g_first, alpha=0.5 * h)
                x = torch.add(x, term(pred, level, **model.cond), alpha=0.5 * h)
            else:
                x = guidance_step(x, i + 1, 0.5 * h)
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
        denoiser, x, sigmas, splitting="lie_trotter", order=order, callback=callback, cond=cond
    )


def sample_stsp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Strang splitting with PLMS (STSP; Wizadwongsa & Suwajanakorn 2023, Algorithm 2).

    Per step a half Euler step of g at ``sigma_i``, a full PLMS step of f, a half Euler step of g at
    ``sigma_{i+1}`` (skipped at sigma = 0, where g vanishes). Second order in the splitting (the f/g
    commutator cancels); two guidance evaluations per step. ``generator`` is unused (deterministic).
    """
    return _splitting_loop(denoiser, x, sigmas, splitting="strang", order=order, callback=callback, cond=cond)


__all__ = ["GuidanceTerm", "split_guided_denoiser", "sample_ltsp", "sample_stsp"]
