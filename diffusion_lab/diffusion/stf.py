"""Stable Target Field (Xu, Tong & Jaakkola, ICLR 2023): a lower-variance regression target for DSM.

For a noisy sample ``y = x_1 + sigma eps`` of a data point ``x_1`` and a reference batch ``{x_1, ..., x_n}``
drawn from the data (the generating point always included), the stable target of the denoiser is the
self-normalised importance-weighted mean (Xu et al. 2023, Sec. 4, the STF objective, written for ``D``)

    T(y) = sum_i w_i x_i,        w_i = softmax_i( -||y - x_i||^2 / (2 sigma^2) ).

``T`` is the exact denoiser ``E[x0 | y]`` of the empirical distribution of the reference batch: with the whole
data set as reference batch it is the ideal denoiser (unbiased), for growing ``n`` it tends to it (asymptotically
unbiased), and because it averages over many plausible clean images instead of the single ``x_1`` its
(conditional) covariance is much smaller than DSM's at intermediate sigma. ``n = 1`` gives DSM's ``x_1``.
The score-space target is ``(T - y) / sigma^2`` and the eps-space target ``(y - T) / sigma``
(``denoiser.x0_to_score`` / ``x0_to_eps``); the weights are the same in the VP view ``x_t = alpha (x0 + sigma
eps)`` since ``||alpha y - alpha x_i||^2 / (2 alpha^2 sigma^2)`` is the same logit.

Cost and memory. ``||y - x||^2 = ||y||^2 - 2 y.x + ||x||^2`` turns the distances into one matmul per chunk
of references, and an online (streaming) log-sum-exp -- running row maximum, running normaliser, running
weighted sum, rescaled whenever the maximum grows -- accumulates the target chunk by chunk, so the largest
temporary is ``B x chunk`` and no ``B x n x D`` tensor is ever built. The generating point enters every row
through its exact distance ``||y_i - x_1,i||^2 = sigma^2 ||eps||^2`` (no cancellation error, and a finite
logit even at ``sigma = 0``, where the target is exactly ``x_1``); at large sigma the weights become uniform and
the target the reference mean. Everything is computed in float32 or wider with autocast off and full-precision
float32 matmuls (TF32's 10-bit mantissa would corrupt ``2 y.x`` at small sigma).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["stable_target", "target_covariance_trace"]


@contextlib.contextmanager
def _exact_float32(device: torch.device) -> Iterator[None]:
    """Autocast off and IEEE float32 matmuls (no TF32 / bf16 passes) inside the block; restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _flat(x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).to(dtype)  # (N, D), also for N = 0


def stable_target(
    y: Tensor,
    sigma: Tensor | float,
    own: Tensor,
    references: Tensor,
    *,
    ref_sqnorm: Tensor | None = None,
    exclude: Tensor | None = None,
    labels: Tensor | None = None,
    ref_labels: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Stable target ``sum_i w_i x_i`` over {own point} + shared references, by chunked online log-sum-exp.

    Row ``b`` averages over its generating point ``own[b]`` and every shared reference ``references[j]`` it
    is allowed to see, with weights ``softmax(-||y_b - x||^2 / (2 sigma_b^2))`` (module docstring).

    Args:
        y: noisy samples, (B, *shape).
        sigma: noise level per row, B values (any shape, e.g. (B,) or (B, 1, 1, 1)) or a scalar; ``sigma = 0``
            is allowed (the target is ``own``).
        own: each row's generating point x_1, (B, *shape); always in the row's reference set.
        references: shared reference batch, (m, *shape); ``m = 0`` gives the DSM target ``own``.
        ref_sqnorm: ``||references[j]||^2`` (m,) when already known (computed once per step by the caller).
        exclude: (B,) index into ``references`` of a row's own point when it is also among the shared
            references (so it is not counted twice); negative entries exclude nothing.
        labels, ref_labels: class-conditional variant: row ``b`` sees only references with
            ``ref_labels[j] == labels[b]``; rows with a negative label see every reference (unconditional).
        chunk_size: references per chunk; peak extra memory is O(B x chunk_size + B x D).

    Returns the target, shape and dtype of ``y``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if own.shape != y.shape:
        raise ValueError(f"own must have the shape of y {tuple(y.shape)}, got {tuple(own.shape)}")
    if references.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"references must have per-sample shape {tuple(y.shape[1:])}, got {tuple(references.shape[1:])}"
        )
    if (labels is None) != (ref_labels is None):
        raise ValueError("labels and ref_labels must be given together (class-conditional targets)")
    batch, m = y.shape[0], references.shape[0]
    for name, value, size in (
        ("exclude", exclude, batch),
        ("labels", labels, batch),
        ("ref_labels", ref_labels, m),
    ):
        if value is not None and value.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(value.shape)}")
    dtype = torch.promote_types(y.dtype, torch.float32)
    with _exact_float32(y.device):
        yf, ownf, refs = (
            _flat(y, "y", dtype),
            _flat(own, "own", dtype),
            _flat(references, "references", dtype),
        )
        sig = torch.as_tensor(sigma, dtype=dtype, device=y.device)
        if sig.numel() not in (1, batch):
            raise ValueError(
                f"sigma must be a scalar or hold one value per row ({batch}), got {tuple(sig.shape)}"
            )
        sig = sig.reshape(-1).expand(batch)
        # 1 / (2 sigma^2), capped so that sigma -> 0 gives huge but finite logits (never 0/0)
        inv_two_var = 0.5 / (sig * sig).clamp_min(torch.finfo(dtype).tiny)
        y_sqnorm = yf.square().sum(1)  # (B,)
        if ref_sqnorm is None:
            ref_sqnorm = refs.square().sum(1)  # (m,)
        ref_sqnorm = ref_sqnorm.to(dtype)

        # running state of the online softmax, seeded with the always-present generating point
        run_max = -(yf - ownf).square().sum(1) * inv_two_var  # (B,) exact logit of x_1
        run_sum = torch.ones_like(run_max)  # sum_j exp(logit_j - run_max)
        run_acc = ownf.clone()  # (B, D) sum_j exp(logit_j - run_max) x_j
        for start in range(0, m, chunk_size):
            chunk = refs[start : start + chunk_size]  # (c, D)
            sqdist = y_sqnorm[:, None] - 2 * (yf @ chunk.T) + ref_sqnorm[None, start : start + chunk_size]
            logits = -sqdist.clamp_min(0) * inv_two_var[:, None]  # (B, c)
            keep = _allowed(batch, start, chunk.shape[0], exclude, labels, ref_labels, y.device)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            new_max = torch.maximum(run_max, logits.amax(1))  # finite: run_max starts finite
            rescale = torch.exp(run_max - new_max)
            weights = torch.exp(logits - new_max[:, None])  # (B, c), masked entries -> 0
            run_sum = run_sum * rescale + weights.sum(1)
            run_acc = run_acc * rescale[:, None] + weights @ chunk
            run_max = new_max
        target = run_acc / run_sum[:, None]
    return target.reshape(y.shape).to(y.dtype)


def _allowed(
    batch: int,
    start: int,
    size: int,
    exclude: Tensor | None,
    labels: Tensor | None,
    ref_labels: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """(B, size) mask of the references ``start:start+size`` each row may use; None when all are allowed."""
    keep = None
    if labels is not None and ref_labels is not None:
        row = labels.reshape(batch, 1)
        keep = (row < 0) | (row == ref_labels[start : start + size].reshape(1, size))
    if exclude is not None:
        columns = torch.arange(start, start + size, device=device)
        not_own = exclude.reshape(batch, 1) != columns[None]
        keep = not_own if keep is None else keep & not_own
    return keep


def target_covariance_trace(
    data: Tensor,
    sigma: float,
    reference_size: int,
    *,
    num_points: int = 64,
    num_draws: int = 64,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Average conditional covariance trace of the DSM and STF targets at one sigma (Xu et al. 2023, Fig. 1).

    For ``num_points`` noisy points ``y = x + sigma eps`` (``x`` uniform over ``data``), the randomness a
    target has *given y* is that of the generating point ``x_1 ~ p(x0 | y)`` (the exact posterior of the
    empirical distribution, ``softmax_k(-||y - x_k||^2 / (2 sigma^2))``) and, for STF, of the other
    ``reference_size - 1`` references: a uniform subset of ``data`` without ``x_1`` (so ``reference_size =
    len(data)`` is the whole data set and the target the ideal denoiser). Returns
    ``(mean_y tr Cov[x_1 | y], mean_y tr Cov[T | y])`` in x0 space; the DSM value is exact, the STF value a
    Monte Carlo estimate over ``num_draws`` (unbiased sample covariance). Score-space values are these over
    sigma^4.

    Draw ``r`` uses one random subset ``S_r`` of size ``reference_size`` shared by all points; a point whose
    ``x_1`` is in ``S_r`` excludes it, any other excludes one uniformly chosen member, so each point's others
    are a uniform ``(reference_size - 1)``-subset of ``data`` without ``x_1``, independent across draws.
    Computed in float64 on ``data``'s device (e.g. CIFAR-10 on a GPU); the random draws use the CPU
    ``generator``, so results do not depend on the device beyond rounding.
    """
    num_data = data.shape[0]
    if not 1 <= reference_size <= num_data:
        raise ValueError(f"reference_size must be in [1, {num_data}] (the data size), got {reference_size}")
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2 for a sample covariance, got {num_draws}")
    device = data.device  # the math runs there; every random draw comes from the CPU ``generator``
    flat = data.reshape(num_data, -1).double()
    x = flat[torch.randint(num_data, (num_points,), generator=generator).to(device)]
    y = x + sigma * torch.randn(x.shape, generator=generator, dtype=flat.dtype).to(device)
    logits = -torch.cdist(y, flat).square() / (2 * sigma**2)
    posterior = torch.softmax(logits, dim=1)  # (P, N) exact p(x0 = data_k | y)
    ideal = posterior @ flat
    dsm = (posterior * torch.cdist(ideal, flat).square()).sum(1).mean().item()

    sqnorm = flat.square().sum(1)
    targets = []
    for _ in range(num_draws):
        owner = torch.multinomial(posterior.cpu(), 1, generator=generator).squeeze(1)  # (P,) index of x_1
        subset = torch.randperm(num_data, generator=generator)[:reference_size]
        position = torch.full((num_data,), -1, dtype=torch.long)
        position[subset] = torch.arange(reference_size)
        exclude = position[owner]
        absent = exclude < 0
        exclude[absent] = torch.randint(reference_size, (int(absent.sum()),), generator=generator)
        targets.append(
            stable_target(
                y,
                sigma,
                flat[owner.to(device)],
                flat[subset.to(device)],
                ref_sqnorm=sqnorm[subset.to(device)],
                exclude=exclude.to(device),
                chunk_size=chunk_size,
            )
        )
    stacked = torch.stack(targets)  # (R, P, D)
    stf = stacked.var(dim=0, unbiased=True).sum(1).mean().item()
    return dsm, stf
