"""What every sampler shares: input checks, denoiser evaluation on the sigma grid, callbacks, noise.

The sampler contract (see ``samplers/__init__.py``): ``x`` is the initial noise already scaled by
``sigmas[0]``; ``sigmas`` is a strictly decreasing 1-D grid ending with 0; the sampler returns ``x0`` at
``sigmas[-1] == 0``. The denoiser ``D(x, sigma, **cond)`` is in the VE view ``x = x0 + sigma eps`` and
defines the probability-flow ODE (Karras et al. 2022, eq. 3 with ``sigma(t) = t``)::

    dx/dsigma = (x - D(x, sigma)) / sigma = eps_hat(x, sigma).

Scalar step coefficients are Python floats computed once from the grid (one host read per sampling run,
none per step), and the per-level sigma batches are built once, so the hot loop only runs the denoiser
and a few fused elementwise ops.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn

Callback = Callable[[dict[str, Any]], None]
Cond = Mapping[str, Any]


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a sampling grid and return it as Python floats (float64 precision).

    Raises ValueError naming the offending entry when the grid is not 1-D, has fewer than two entries, is
    not finite, negative, not strictly decreasing, or does not end with 0.
    """
    if not isinstance(sigmas, Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 entries (sigma_max, ..., 0), got {sigmas.numel()}")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    for i, s in enumerate(values):
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"sigmas must be finite and non-negative, got sigmas[{i}] = {s}")
    for i in range(len(values) - 1):
        if not values[i] > values[i + 1]:
            raise ValueError(
                f"sigmas must be strictly decreasing, got sigmas[{i}] = {values[i]} <= "
                f"sigmas[{i + 1}] = {values[i + 1]}"
            )
    if values[-1] != 0:
        raise ValueError(
            f"sigmas must end with 0 (samplers return x0 at sigma = 0), got sigmas[-1] = {values[-1]}; "
            "append one with torch.cat([sigmas, sigmas.new_zeros(1)])"
        )
    return values


def check_x_and_cond(x: Tensor, cond: Cond | None) -> dict[str, Any]:
    """Validate the initial noise (B, ...) and that batch-shaped conditioning matches its batch size."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(
            "x must be a floating-point tensor of shape (B, ...), got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        )
    cond = dict(cond or {})
    for key, value in cond.items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"cond[{key!r}] has batch size {value.shape[0]} but x has batch size {x.shape[0]}"
            )
    return cond


def sigma_dtype(x: Tensor) -> torch.dtype:
    """Noise levels travel in x's dtype, but never below float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class GridDenoiser:
    """Evaluates ``D(x, sigma, **cond)`` at the grid levels with per-level sigma batches built once.

    Attributes:
        sigmas: the grid on x's device, (N+1,), in :func:`sigma_dtype`.
        values: the grid as Python floats.
        nfe: number of denoiser evaluations so far (counted on the host, no synchronisation).
    """

    def __init__(self, denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Cond | None) -> None:
        self.cond = check_x_and_cond(x, cond)
        self.values = check_sigmas(sigmas)
        self.denoiser = denoiser
        self.dtype = sigma_dtype(x)
        self.sigmas = torch.as_tensor(sigmas).detach().to(device=x.device, dtype=self.dtype)
        self._batches = self.sigmas[:, None].repeat(1, x.shape[0])  # (N+1, B): row i is level i for the batch
        self.nfe = 0

    @property
    def steps(self) -> int:
        return len(self.values) - 1

    def at(self, x: Tensor, i: int) -> Tensor:
        """``D(x, sigmas[i])``."""
        self.nfe += 1
        return self.denoiser(x, self._batches[i], **self.cond)

    def at_value(self, x: Tensor, sigma: float) -> Tensor:
        """``D(x, sigma)`` at an off-grid level (churned or intermediate sigma)."""
        self.nfe += 1
        level = torch.full((x.shape[0],), sigma, device=x.device, dtype=self.dtype)
        return self.denoiser(x, level, **self.cond)

    def report(self, callback: Callback | None, i: int, x: Tensor, denoised: Tensor, **extra: Any) -> None:
        """Call ``callback(dict(i, x, sigma, sigma_next, denoised, ...))`` for step i (x is the state at
        ``sigmas[i]`` before the step)."""
        if callback is not None:
            callback(
                {
                    "i": i,
                    "x": x,
                    "sigma": self.sigmas[i],
                    "sigma_next": self.sigmas[i + 1],
                    "denoised": denoised,
                }
                | extra
            )


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (reproducible when seeded)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ddim_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One deterministic DDIM step = one Euler step of the PF-ODE in sigma (VE view).

    ``x_next = D + sigma_next * (x - D) / sigma = x + (sigma_next - sigma) eps_hat`` (Song et al. 2021a,
    eq. 12 with eta = 0 divided by ``sqrt(abar)``; Karras et al. 2022, Algorithm 1 without the correction).
    The DDIM step is exact whenever ``eps_hat`` is constant along the path, e.g. for a single data point.
    """
    return torch.lerp(denoised, x, sigma_next / sigma)


def ancestral_levels(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of the DDIM(eta) step in the VE view.

    Song et al. 2021a (eq. 16) add noise of VP variance
    ``s_t^2 = eta^2 (1 - abar_{t-1})/(1 - abar_t) (1 - abar_t / abar_{t-1})``. With ``abar = 1/(1 + sigma^2)``
    and division by ``sqrt(abar_{t-1})`` this is the VE variance ``sigma_up^2 = eta^2 sigma_next^2 (sigma^2 -
    sigma_next^2) / sigma^2``, and the deterministic part ``sqrt(1 - abar_{t-1} - s_t^2) eps_hat`` becomes
    ``sigma_down eps_hat`` with ``sigma_down^2 = sigma_next^2 - sigma_up^2``. ``eta = 1`` is DDPM's posterior
    (``sigma_down = sigma_next^2 / sigma``). ``sigma_up`` is capped at ``sigma_next`` for eta > 1.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def accepted_options(fn: Callable[..., Any], exclude: tuple[str, ...] = ()) -> list[str]:
    """Keyword parameters of ``fn`` after its leading positional ones, minus ``exclude``."""
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name not in exclude]


def check_options(
    fn: Callable[..., Any], options: Mapping[str, Any], what: str, exclude: tuple[str, ...]
) -> None:
    """Raise ValueError naming any keyword in ``options`` that ``fn`` does not take (typos in YAML)."""
    accepted = accepted_options(fn, exclude)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{what} got unknown option(s) {unknown}; it accepts {sorted(accepted)}")
