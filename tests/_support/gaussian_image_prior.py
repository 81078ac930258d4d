"""An exact Gaussian image prior for the DDLM tests: ``GaussianMixture`` with one component, on image tensors.

For ``x0 ~ N(mu, S)`` in D = C H W dimensions the ideal denoiser is the Wiener filter
``D(x, sigma) = mu + S (S + sigma^2 I)^-1 (x - mu)`` (``diffusion.analytic``), the exact prior of a Gaussian
image model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.analytic import GaussianMixture


class GaussianImagePrior(nn.Module):
    """``D(x (B, C, H, W), sigma)`` of a single Gaussian ``N(mean, cov)`` over the flattened image."""

    def __init__(self, mean: Tensor, cov: Tensor, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.mixture = GaussianMixture(mean.reshape(1, -1), cov[None])
        self.shape = tuple(shape)

    @classmethod
    def fit(cls, images: Tensor, ridge: float = 1e-4) -> GaussianImagePrior:
        """Sample mean and covariance (plus ``ridge`` I) of images (N, C, H, W)."""
        flat = images.double().flatten(1)
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / (len(flat) - 1) + ridge * torch.eye(flat.shape[1], dtype=torch.float64)
        return cls(mean, cov, tuple(images.shape[1:]))

    def forward(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = self.mixture(x.double().flatten(1), sigma)
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        x0, _ = self.mixture.sample(n, generator=generator)
        return x0.reshape(n, *self.shape)
