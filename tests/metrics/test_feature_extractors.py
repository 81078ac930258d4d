"""Input conventions of the feature extractors and the timm path with local weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffusion_lab.metrics.features import (
    PassThroughExtractor,
    TimmExtractor,
    build_feature_extractor,
    to_uint8,
)
from diffusion_lab.pretrained.safe_load import MissingWeightsError


def test_to_uint8_inverts_the_dataset_scaling_exactly():
    """uint8 images k map to k / 127.5 - 1 in the DataModules; quantising must give k back for every k."""
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(k.float() / 127.5 - 1), k)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_timm_extractor_uses_the_model_normalisation_and_head(timm_weights):
    model, path = timm_weights
    extractor = build_feature_extractor("timm", path, timm_model="test_vit", timm_num_classes=7)
    assert isinstance(extractor, TimmExtractor) and extractor.key.startswith("timm-test_vit-")
    size = extractor.input_size
    images = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features, logits = extractor(images)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_logits = model(((images + 1) / 2 - mean) / std)  # timm's own full forward
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert features.shape == (3, model.num_features) and extractor.num_logits == 7


def test_timm_extractor_resizes_and_repeats_grey(timm_weights):
    _, path = timm_weights
    extractor = build_feature_extractor("timm", path, timm_model="test_vit")
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    features, logits = extractor(grey)
    assert logits is None and features.shape[0] == 2
    assert torch.equal(features, extractor(grey.expand(-1, 3, -1, -1))[0])


def test_timm_errors(tmp_path):
    with pytest.raises(ValueError, match="timm_model"):
        build_feature_extractor("timm", tmp_path / "w.safetensors")
    with pytest.raises(MissingWeightsError, match="w.safetensors"):
        build_feature_extractor("timm", tmp_path / "w.safetensors", timm_model="test_vit")
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        build_feature_extractor("timm", None, timm_model="test_vit")


def test_unknown_extractor_and_bad_images_are_errors():
    with pytest.raises(ValueError, match="unknown feature_extractor 'clip'"):
        build_feature_extractor("clip")
    extractor = build_feature_extractor("feature_net")
    with pytest.raises(ValueError, match=r"float images \(B, 1 or 3, H, W\)"):
        extractor(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected features \(B, 4\)"):
        PassThroughExtractor(4)(torch.zeros(2, 5))


def test_extractors_stay_in_eval_mode():
    extractor = build_feature_extractor("feature_net")
    extractor.train()
    assert not extractor.training and not extractor.network.training


def test_timm_weights_of_another_model_are_refused(timm_weights):
    _, path = timm_weights
    with pytest.raises(ValueError, match="does not fit timm model 'test_resnet'"):
        build_feature_extractor("timm", path, timm_model="test_resnet")
