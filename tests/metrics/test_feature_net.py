"""The shipped digits feature net: accuracy on held-out digits, FID sanity, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_lab.data.digits import Digits
from diffusion_lab.metrics.factory import build_fid
from diffusion_lab.metrics.feature_net import (
    DIGITS_FEATURE_NET,
    FeatureNet,
    calibrate_features,
    evaluate_accuracy,
    load_feature_net,
    save_feature_net,
    shipped_asset,
)
from diffusion_lab.metrics.features import FeatureNetExtractor
from diffusion_lab.pretrained.safe_load import MissingWeightsError


@pytest.fixture(scope="module")
def digits():
    dm = Digits(val_fraction=0.1, seed=0, batch_size=256)  # the split the shipped net was trained on
    dm.setup("fit")
    return dm


def test_shipped_net_accuracy_on_held_out_split_is_at_least_95_percent(digits):
    model = load_feature_net()
    accuracy = evaluate_accuracy(model, digits.val_dataloader())
    assert accuracy >= 0.95
    record = json.loads(shipped_asset(DIGITS_FEATURE_NET).with_suffix(".json").read_text())
    assert accuracy == pytest.approx(
        record["test_accuracy"], abs=1e-9
    )  # the documented number is the real one
    assert record["num_test_images"] == len(digits.val_set)
    assert "tools/train_feature_net.py" in record["command"]


def test_fid_train_vs_val_is_far_below_fid_data_vs_noise(digits):
    train, val = digits.train_set.images, digits.val_set.images
    fid = build_fid("feature_net", reset_real_features=False)
    fid.update(train, real=True)
    fid.update(val, real=False)
    data_vs_data = float(fid.compute())
    fid.reset()
    noise = torch.rand(len(val), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid.update(noise, real=False)
    data_vs_noise = float(fid.compute())
    assert data_vs_data < 0.05 * data_vs_noise


def test_calibration_standardises_training_features(digits):
    model = calibrate_features(FeatureNet(), digits.train_dataloader())
    with torch.no_grad():
        features = torch.cat([model.features_and_logits(x)[0] for x, _ in digits.train_dataloader()]).double()
    assert features.mean(0).abs().max() < 1e-4
    assert float(features.var(0).mean()) == pytest.approx(1.0, rel=1e-4)


def test_save_load_round_trip_rebuilds_the_architecture(tmp_path):
    model = FeatureNet(in_channels=3, resolution=16, num_classes=4, width=8, feature_dim=12).eval()
    model.feature_scale.fill_(2.5)
    path = tmp_path / "net.safetensors"
    save_feature_net(model, path, {"note": "test"})
    loaded = load_feature_net(path)
    assert loaded.config() == model.config()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    for a, b in zip(model.features_and_logits(x), loaded.features_and_logits(x)):
        assert torch.equal(a, b)


def test_file_without_architecture_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in FeatureNet().state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="lacks architecture metadata"):
        load_feature_net(path)


def test_missing_file_names_the_file_and_the_tool(tmp_path):
    with pytest.raises(MissingWeightsError, match="train_feature_net.py") as info:
        FeatureNetExtractor.from_file(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(info.value)


def test_wrong_input_shape_and_bad_resolution_are_errors():
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 8, 8\)"):
        FeatureNet()(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        FeatureNet(resolution=12)
