"""pretrained.load: every entry documents its source, fails clearly on a missing file, and loads offline."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from diffusion_lab import pretrained
from diffusion_lab.nets.adm import from_preset
from diffusion_lab.pretrained.guided_diffusion import NoisyClassifierVE, adm_alphas_cumprod
from diffusion_lab.pretrained.registry import REGISTRY
from diffusion_lab.pretrained.safe_load import MissingWeightsError

NEEDS = {"inception/": "torch_fidelity"}  # the diffusers entries check the folder before importing


def _skip_without_optional_package(name: str) -> None:
    for prefix, package in NEEDS.items():
        if name.startswith(prefix) and importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")


def test_every_entry_says_where_to_get_it_and_which_config_key_takes_it():
    assert {n.split("/")[0] for n in pretrained.available()} == {
        "adm",
        "diffusers",
        "dino",
        "clip",
        "inception",
    }
    assert len([n for n in pretrained.available() if n.startswith("adm/")]) == 7
    for name, entry in REGISTRY.items():
        assert entry.where_to_get and entry.config_key and entry.description, name
        text = pretrained.describe(name)
        assert entry.where_to_get in text and entry.config_key in text
    with pytest.raises(KeyError, match="available: .*adm/256x256_diffusion_uncond"):
        pretrained.load("adm/256x256_uncond", "x.pt")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_missing_file_error_names_the_file_and_where_to_get_it(name, tmp_path, no_network):
    _skip_without_optional_package(name)
    missing = tmp_path / "not_downloaded_yet"
    with pytest.raises(MissingWeightsError) as err:
        pretrained.load(name, missing)
    message = str(err.value)
    assert str(missing) in message
    assert "http" in message or "huggingface-cli download" in message  # an actual place to get it


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_adm_entry_gives_the_cosine_eps_denoiser_of_the_64x64_model(tmp_path, no_network):
    flags = dict(num_channels=32, num_head_channels=32)  # the 64x64 architecture at a small width
    net = _randomized(from_preset("64x64_diffusion", use_fp16=False, **flags))
    torch.save(net.state_dict(), tmp_path / "64x64_diffusion.pt")
    denoiser = pretrained.load("adm/64x64_diffusion", tmp_path / "64x64_diffusion.pt", flag_overrides=flags)
    abar = adm_alphas_cumprod("cosine")
    x, labels, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), 250
    sigma = math.sqrt((1 - abar[t]) / abar[t])
    with torch.no_grad():
        x0 = denoiser(x, torch.full((2,), sigma), labels=labels)
        eps = net(x * math.sqrt(abar[t]), torch.full((2,), float(t)), y=labels)[
            :, :3
        ]  # learned sigma dropped
    torch.testing.assert_close(x0, x - sigma * eps, rtol=1e-4, atol=1e-4)


def test_adm_classifier_entry_gives_the_ve_classifier(tmp_path, no_network):
    flags = dict(classifier_width=64)
    net = _randomized(from_preset("64x64_classifier", classifier_use_fp16=False, **flags))
    torch.save(net.state_dict(), tmp_path / "64x64_classifier.pt")
    classifier = pretrained.load(
        "adm/64x64_classifier", tmp_path / "64x64_classifier.pt", flag_overrides=flags
    )
    assert isinstance(classifier, NoisyClassifierVE)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = classifier(x, 0.5)
    assert logits.shape == (1, 1000)
