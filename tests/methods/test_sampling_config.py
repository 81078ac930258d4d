"""GuidedSamplerConfig overrides (what `tools/evaluate.py` and `sample(config=...)` use to switch samplers)."""

from __future__ import annotations

from diffusion_lab.methods.sampling import GuidedSamplerConfig


def test_override_to_another_method_drops_the_old_methods_options():
    langevin = GuidedSamplerConfig(method="annealed_langevin", steps=4, options={"step_size": 1e-4})
    heun = langevin.with_overrides(method="heun", steps=6)
    assert heun.method == "heun" and heun.steps == 6 and heun.options == {}


def test_override_keeps_options_of_the_same_method_and_takes_explicit_ones():
    langevin = GuidedSamplerConfig(method="annealed_langevin", steps=4, options={"step_size": 1e-4})
    assert langevin.with_overrides(steps=8).options == {"step_size": 1e-4}
    assert langevin.with_overrides(method="ddim", options={"eta": 1.0}).options == {"eta": 1.0}
