"""Shared fixtures for the diffusion-core tests: the analytic 2-D mixture and seeded generators."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.diffusion.analytic import GaussianMixture, toy_mixture_2d


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    """The fixed class-conditional 2-D mixture (3 classes x 2 components)."""
    return toy_mixture_2d()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
