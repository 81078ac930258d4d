"""The FID InceptionV3 loads only from a local file, never touches the network, and equals torch-fidelity's."""

from __future__ import annotations

import socket

import pytest
import torch

from diffusion_lab.metrics.features import InceptionExtractor, build_feature_extractor, to_uint8
from diffusion_lab.pretrained.inception import INCEPTION_WEIGHTS_FILE, FIDInceptionV3
from diffusion_lab.pretrained.safe_load import MissingWeightsError


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    yield attempts
    assert attempts == []


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A randomly initialised InceptionV3 state dict saved as torch-fidelity's .pth (a plain torch.save)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / INCEPTION_WEIGHTS_FILE
    torch.save(FIDInceptionV3(None, ["2048"]).state_dict(), path)
    return path


def test_no_weights_path_names_the_file_and_where_to_get_it(no_network):
    with pytest.raises(MissingWeightsError) as info:
        build_feature_extractor("inception", None)
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILE in message and "https://github.com/" in message
    assert "feature_extractor_weights_path" in message


def test_missing_weights_file_is_a_clear_error_without_network(tmp_path, no_network):
    missing = tmp_path / INCEPTION_WEIGHTS_FILE
    with pytest.raises(MissingWeightsError) as info:
        build_feature_extractor("inception", missing)
    assert str(missing) in str(info.value) and "pytorch-fid" in str(info.value)


def test_local_file_loads_offline_and_matches_torch_fidelity(random_inception_file, no_network):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = build_feature_extractor("inception", random_inception_file)
    assert isinstance(extractor, InceptionExtractor) and extractor.key.startswith("inception-")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features, logits = extractor(images)
    # torch-fidelity's own constructor and loader (given a local path it does not download either)
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], str(random_inception_file)
    )
    expected_features, expected_logits = reference(to_uint8(images))
    assert torch.allclose(features, expected_features, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits, expected_logits, rtol=1e-5, atol=1e-4)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    extractor.train()
    assert not extractor.training and not extractor.network.training  # batch-norm statistics stay frozen


def test_grey_images_are_repeated_to_rgb(random_inception_file):
    extractor = build_feature_extractor("inception", random_inception_file)
    grey = torch.rand(1, 1, 8, 8) * 2 - 1
    assert torch.equal(extractor(grey)[0], extractor(grey.expand(-1, 3, -1, -1))[0])
