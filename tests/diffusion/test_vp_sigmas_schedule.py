"""The ``vp`` sampling grid takes its VP schedule from YAML: ``schedule_kwargs: {schedule: {class_path, init_args}}``
(or a class name), as plain data (``tools/evaluate --samplers`` JSON, ``yaml.safe_load`` in tools) or as the
instance the CLI builds; the grid is EDM's ``sigma_ve(t_i)``, t uniform from 1 to eps_s, of *that* schedule."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from diffusion_lab.diffusion.samplers import SamplerConfig, vp_sigmas
from diffusion_lab.diffusion.schedules import SubVP, VPCosine, schedule_from_spec

COSINE_YAML = """
method: ddpm
steps: 6
schedule: vp
schedule_kwargs:
  eps_s: 0.01
  schedule: {class_path: diffusion_lab.diffusion.schedules.VPCosine, init_args: {s: 0.02}}
"""


def _cosine_sigma(t: torch.Tensor, s: float) -> torch.Tensor:
    """iDDPM eq. 17 in closed form: sigma_ve = sqrt((1 - abar) / abar), abar = cos^2(phi(t)) / cos^2(phi(0))."""
    phi = lambda u: (u + s) / (1 + s) * math.pi / 2  # noqa: E731
    abar = torch.cos(phi(t)) ** 2 / math.cos(phi(0.0)) ** 2
    return ((1 - abar) / abar).sqrt()


def test_vp_grid_from_yaml_class_path_is_the_cosine_schedule():
    config = SamplerConfig(**yaml.safe_load(COSINE_YAML))  # plain dicts, as tools and JSON overrides give it
    sigmas = config.sigmas()
    t = torch.linspace(1.0, 0.01, 6, dtype=torch.float64)
    expected = _cosine_sigma(t, 0.02).clamp(max=math.exp(10.0))  # log-SNR clipped at -20
    torch.testing.assert_close(sigmas[:-1], expected, rtol=1e-9, atol=0)
    assert sigmas[-1] == 0
    # the same grid from an instance (what LightningCLI builds) and from a bare class name
    torch.testing.assert_close(vp_sigmas(6, VPCosine(s=0.02), eps_s=0.01), sigmas)
    assert not torch.equal(vp_sigmas(6, "VPCosine", eps_s=0.01), sigmas)  # s = 0.008 by default: differs
    torch.testing.assert_close(vp_sigmas(6, "SubVP", eps_s=0.01), vp_sigmas(6, SubVP(), eps_s=0.01))


def test_bad_schedule_specs_are_named():
    with pytest.raises(ValueError, match="cannot import schedule class_path 'NoSuchSchedule'"):
        vp_sigmas(4, {"class_path": "NoSuchSchedule"})
    with pytest.raises(TypeError, match="'torch.nn.Linear' is not a NoiseSchedule"):
        schedule_from_spec(
            {"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}}
        )
    with pytest.raises(TypeError, match="a schedule must be"):
        vp_sigmas(4, 3.0)
