"""The reference ODE solver of the sampler tests: classic RK4, written independently of the library's samplers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


def rk4_integrate(
    derivative: Callable[[Tensor, float], Tensor], y: Tensor, levels: Sequence[float]
) -> Tensor:
    """Integrate ``dy/ds = derivative(y, s)`` through the points ``levels`` with one classic Runge-Kutta-4 step
    per interval: ``y += h (k1 + 2 k2 + 2 k3 + k4) / 6``."""
    for s, t in zip(levels[:-1], levels[1:], strict=True):
        h = t - s
        k1 = derivative(y, s)
        k2 = derivative(y + h / 2 * k1, s + h / 2)
        k3 = derivative(y + h / 2 * k2, s + h / 2)
        k4 = derivative(y + h * k3, t)
        y = y + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return y
