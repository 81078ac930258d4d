"""Exact denoiser, score and density of a (class-conditional) Gaussian mixture.

Ground truth for tests and toy benchmarks: with data ``x0 ~ sum_k pi_k N(mu_k, S_k)`` and the
variance-exploding corruption ``x = x0 + sigma * eps`` (Karras et al. 2022, eq. 1), the noisy
marginal is again a mixture, ``p_sigma(x) = sum_k pi_k N(x; mu_k, S_k + sigma^2 I)``, and Tweedie's
formula gives the ideal denoiser in closed form:

    r_k(x)      = pi_k N(x; mu_k, C_k) / sum_j pi_j N(x; mu_j, C_j),     C_k = S_k + sigma^2 I
    E[x0 | x]   = sum_k r_k(x) (mu_k + S_k C_k^{-1} (x - mu_k))
    grad log p  = (E[x0 | x] - x) / sigma^2

Class conditioning restricts the sum to the components whose ``component_labels`` equal the label.
A label equal to ``null_label`` (or ``labels=None``) gives the unconditional denoiser, which is what
a classifier-free-guidance model's null token learns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GaussianMixture(nn.Module):
    """A Gaussian mixture in ``dim`` dimensions that is also an exact ``Denoiser``.

    Args:
        means: (K, D) component means.
        covs: (K, D, D) component covariances (symmetric positive semi-definite).
        weights: (K,) mixture weights (normalised internally).
        component_labels: (K,) class of each component, or None for an unconditional mixture.
    """

    def __init__(
        self,
        means: Tensor,
        covs: Tensor,
        weights: Tensor | None = None,
        component_labels: Tensor | None = None,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(
                f"covs must have shape {(k, d, d)} to match means {tuple(means.shape)}, got {tuple(covs.shape)}"
            )
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any():
            raise ValueError(f"weights must be {k} non-negative numbers, got {weights}")
        if component_labels is None:
            component_labels = torch.zeros(k, dtype=torch.long)
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("component_labels", torch.as_tensor(component_labels, dtype=torch.long))
        # Eigendecomposition once: C_k^{-1} for any sigma is then a diagonal rescaling.
        evals, evecs = torch.linalg.eigh(covs)
        self.register_buffer("evals", evals.clamp_min(0.0))
        self.register_buffer("evecs", evecs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.component_labels.max()) + 1

    @property
    def null_label(self) -> int:
        """The label that means 'unconditional' (one past the last class, as in the nets)."""
        return self.num_classes

    # ------------------------------------------------------------------ internals
    def _component_terms(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Per-component log(pi_k N(x; mu_k, C_k)) (B, K) and posterior means (B, K, D), float64."""
        dtype = self.means.dtype  # float64 unless the module was cast; computations follow the buffers
        x = x.to(dtype).reshape(x.shape[0], -1)
        s2 = sigma.to(dtype).reshape(-1, 1, 1) ** 2  # (B, 1, 1)
        diff = x[:, None, :] - self.means[None]  # (B, K, D)
        proj = torch.einsum("bkd,kde->bke", diff, self.evecs)  # coordinates in each eigenbasis
        c = self.evals[None] + s2  # (B, K, D) eigenvalues of C_k
        mahal = (proj**2 / c).sum(-1)
        logdet = torch.log(c).sum(-1)
        log_n = -0.5 * (mahal + logdet + self.dim * math.log(2 * math.pi))
        log_terms = torch.log(self.weights)[None] + log_n
        # S_k C_k^{-1} (x - mu_k) in the eigenbasis: eigenvalue ratio lambda / (lambda + sigma^2).
        shrink = torch.einsum("bke,kde->bkd", proj * self.evals[None] / c, self.evecs)
        return log_terms, self.means[None] + shrink

    def _mask(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B, K) boolean: components allowed for each sample's label."""
        if labels is None:
            return torch.ones(batch, len(self.weights), dtype=torch.bool, device=self.means.device)
        labels = torch.as_tensor(labels, device=self.means.device).reshape(-1).expand(batch)
        uncond = labels == self.null_label
        return (self.component_labels[None] == labels[:, None]) | uncond[:, None]

    def _posterior(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        log_terms, means = self._component_terms(x, sigma)
        log_terms = log_terms.masked_fill(~self._mask(labels, x.shape[0]), -math.inf)
        return log_terms, torch.softmax(log_terms, dim=-1), means

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None, **_: object) -> Tensor:
        """Ideal denoiser ``E[x0 | x0 + sigma eps = x, label]``; x (B, D) or (B, *shape) with prod = D."""
        _, resp, means = self._posterior(x, sigma, labels)
        return (resp[..., None] * means).sum(1).to(x.dtype).reshape(x.shape)

    def score(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """grad_x log p_sigma(x | label) = (D(x, sigma) - x) / sigma^2."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return (self(x, sigma.reshape(-1), labels) - x) / sigma**2

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0, labels: Tensor | None = None) -> Tensor:
        """log p_sigma(x | label), (B,), float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        log_terms, _, _ = self._posterior(x, sigma, labels)
        if labels is not None:  # renormalise the prior over the allowed components
            prior = torch.log((self.weights[None] * self._mask(labels, x.shape[0])).sum(-1))
            return torch.logsumexp(log_terms, -1) - prior
        return torch.logsumexp(log_terms, -1)

    def class_log_posterior(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log p(c | x, sigma) for every class c, (B, C): the exact noise-aware classifier."""
        log_terms, _, _ = self._posterior(x, sigma, None)
        per_class = torch.full(
            (x.shape[0], self.num_classes), -math.inf, dtype=self.means.dtype, device=x.device
        )
        for c in range(self.num_classes):
            sel = self.component_labels == c
            per_class[:, c] = torch.logsumexp(log_terms[:, sel], -1)
        return per_class - torch.logsumexp(per_class, -1, keepdim=True)

    def sample(
        self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw n exact samples; returns (x0 (n, D) float64, class labels (n,))."""
        probs = self.weights.expand(n, -1)
        if labels is not None:
            probs = probs * self._mask(labels, n)
        comp = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.evecs[comp] * self.evals[comp].sqrt()[:, None, :]  # (n, D, D) = V diag(sqrt(l))
        x = self.means[comp] + torch.einsum("nde,ne->nd", scale, z)
        return x, self.component_labels[comp]

    def mean_and_cov(self, labels: int | None = None) -> tuple[Tensor, Tensor]:
        """Exact mean (D,) and covariance (D, D) of the clean data (optionally of one class)."""
        w = self.weights.clone()
        if labels is not None:
            w = w * (self.component_labels == labels)
            w = w / w.sum()
        mean = (w[:, None] * self.means).sum(0)
        second = (w[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return mean, second - mean[:, None] * mean[None, :]


def toy_mixture_2d(
    num_classes: int = 3, components_per_class: int = 2, std: float = 0.15, seed: int = 0
) -> GaussianMixture:
    """A fixed, well-separated class-conditional 2-D mixture used across tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * components_per_class
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    radius = 1.0 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)
    means = torch.stack([radius * angles.cos(), radius * angles.sin()], -1)
    a = torch.randn(k, 2, 2, generator=g, dtype=torch.float64) * 0.3
    covs = std**2 * (torch.eye(2, dtype=torch.float64) + a @ a.transpose(1, 2))
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    labels = torch.arange(k) % num_classes
    return GaussianMixture(means, covs, weights, labels)
