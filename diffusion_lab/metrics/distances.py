"""Fast exact forms of FID and KID for the feature-level path (callback, evaluate), equal to torchmetrics'.

torchmetrics computes ``Tr (S1 S2)^(1/2)`` from the eigenvalues of the non-symmetric ``S1 S2``
(``torch.linalg.eigvals``), and KID by recomputing three polynomial-kernel matrices for every random subset.
On a CPU these dominate one validation evaluation (about 100 s for 2048-d Inception features, and 100 subsets
of KID cost more than the feature extraction). The same numbers follow from cheaper exact identities:

* **FID** (Heusel et al. 2017, eq. 6): ``d^2 = ||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1 S2)^(1/2)``. With
  ``A = S1^(1/2)`` (symmetric PSD), ``S1 S2 = A (A S2)`` has the same eigenvalues as ``(A S2) A = A S2 A``
  (``XY`` and ``YX`` share their spectrum), which is symmetric PSD, so ``Tr (S1 S2)^(1/2) = sum_i sqrt(l_i)``
  with ``l_i`` from one symmetric ``eigh``. ``A`` of the reference is computed once and cached.
* **KID** (Binkowski et al. 2018, eq. 3): unbiased MMD^2 with ``k(x, y) = (gamma x.y + coef)^degree`` averaged
  over random subsets. All kernel values are computed once, ``K_rr``, ``K_ff``, ``K_rf``, and each subset's
  block sums are read off with 0/1 indicator matrices ``Z``: ``sum_{i,j in S} K_ij = (K Z * Z).sum(0)``, for all
  subsets in one matrix product (in row chunks, so memory stays ``2048 x n``). The subsets are drawn exactly as
  torchmetrics draws them (per subset ``randperm(n_real)[:m]`` then ``randperm(n_fake)[:m]`` from the global
  generator), so under the same seed the values equal torchmetrics' ``KernelInceptionDistance`` (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance", "kernel_inception_distance", "sqrtm_psd"]


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clamped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.to(torch.float64))
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, sqrt_cov1: Tensor | None = None
) -> Tensor:
    """Frechet distance between N(mean1, cov1) and N(mean2, cov2) (float64 scalar); pass ``sqrt_cov1`` to reuse
    the square root of a fixed reference covariance."""
    mean1, cov1, mean2, cov2 = (t.to(torch.float64) for t in (mean1, cov1, mean2, cov2))
    root = sqrtm_psd(cov1) if sqrt_cov1 is None else sqrt_cov1.to(torch.float64)
    inner = root @ cov2 @ root
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt


def _indicators(n: int, draws: list[Tensor]) -> Tensor:
    """(n, len(draws)) 0/1 matrix: column s marks the members of subset s."""
    z = torch.zeros(n, len(draws), dtype=torch.float64)
    for s, index in enumerate(draws):
        z[index, s] = 1.0
    return z


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(mean, std) over ``subsets`` of the unbiased MMD^2 between ``subset_size`` real and fake features.

    Draws its subsets from the global torch generator like torchmetrics; wrap in ``torch.random.fork_rng`` and
    seed it for reproducible values.
    """
    n_real, n_fake = real.shape[0], fake.shape[0]
    if not 2 <= subset_size <= min(n_real, n_fake):
        raise ValueError(
            f"subset_size must be in [2, min(n_real, n_fake) = {min(n_real, n_fake)}], got {subset_size}"
        )
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    x, y = real.to(torch.float64).cpu(), fake.to(torch.float64).cpu()

    def block_sums(a: Tensor, b: Tensor, z_a: Tensor, z_b: Tensor, chunk: int = 2048) -> Tensor:
        """sum_{i in S_a, j in S_b} k(a_i, b_j) for every subset, in row chunks (memory chunk x len(b))."""
        total = torch.zeros(z_a.shape[1], dtype=torch.float64)
        for start in range(0, a.shape[0], chunk):
            k = (a[start : start + chunk] @ b.T * gamma + coef) ** degree
            total += ((k @ z_b) * z_a[start : start + chunk]).sum(0)
        return total

    draws_real, draws_fake = [], []
    for _ in range(subsets):  # the order torchmetrics uses
        draws_real.append(torch.randperm(n_real)[:subset_size])
        draws_fake.append(torch.randperm(n_fake)[:subset_size])
    z_real = _indicators(n_real, draws_real)
    z_fake = _indicators(n_fake, draws_fake)
    diag_real = (x.square().sum(1) * gamma + coef) ** degree  # k(x_i, x_i), left out of the unbiased sums
    diag_fake = (y.square().sum(1) * gamma + coef) ** degree
    m = subset_size
    off_rr = block_sums(x, x, z_real, z_real) - z_real.T @ diag_real
    off_ff = block_sums(y, y, z_fake, z_fake) - z_fake.T @ diag_fake
    cross = block_sums(x, y, z_real, z_fake)
    values = (off_rr + off_ff) / (m * (m - 1)) - 2 * cross / m**2
    return values.mean(), values.std(unbiased=False)
