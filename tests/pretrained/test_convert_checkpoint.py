"""tools/convert_checkpoint.py: Lightning / pickle checkpoints to safetensors, exactly and safely."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_lab.nets.adm import from_preset
from diffusion_lab.pretrained.safe_load import UnsafeWeightsError

_spec = importlib.util.spec_from_file_location(
    "convert_checkpoint", Path(__file__).parents[2] / "tools" / "convert_checkpoint.py"
)
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)


def lightning_like_checkpoint() -> dict:
    """The layout of this project's DiffusionModule checkpoints: denoiser.* and its EMA copy."""
    w, b = torch.randn(4, 3), torch.randn(4)
    return {
        "epoch": 2,
        "global_step": 10,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {
            "denoiser.network.lin.weight": w,
            "denoiser.network.lin.bias": b,
            "ema.averaged.network.lin.weight": 2 * w,
            "ema.averaged.network.lin.bias": 2 * b,
            "ema.num_updates": torch.tensor(10),
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
        "hyper_parameters": {"ema_decay": 0.999, "image_size": 8},
    }


def test_ema_weights_of_a_lightning_checkpoint_are_extracted_exactly(tmp_path):
    ckpt = lightning_like_checkpoint()
    torch.save(ckpt, tmp_path / "last.ckpt")
    out = tmp_path / "ema.safetensors"
    assert (
        convert_checkpoint.main([str(tmp_path / "last.ckpt"), str(out), "--prefix", "ema.averaged.network."])
        == 0
    )
    state = load_file(str(out))
    assert sorted(state) == ["lin.bias", "lin.weight"]
    assert torch.equal(state["lin.weight"], ckpt["state_dict"]["ema.averaged.network.lin.weight"])
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["converted_from"] == "last.ckpt"
    with pytest.raises(ValueError, match="no tensor name starts with"):
        convert_checkpoint.convert(tmp_path / "last.ckpt", tmp_path / "x.safetensors", prefix="student.")


def test_legacy_pickle_with_tied_weights_and_dtype_cast(tmp_path):
    shared = torch.randn(5, 5)
    torch.save(
        {"embed.weight": shared, "head.weight": shared, "steps": torch.arange(3)},
        tmp_path / "tied.pt",
        _use_new_zipfile_serialization=False,
    )
    state = convert_checkpoint.convert(tmp_path / "tied.pt", tmp_path / "tied.safetensors", dtype="float16")
    loaded = load_file(str(tmp_path / "tied.safetensors"))
    assert loaded["head.weight"].dtype == torch.float16 and loaded["steps"].dtype == torch.int64
    assert torch.equal(loaded["embed.weight"], shared.half()) and torch.equal(
        loaded["head.weight"], shared.half()
    )
    assert state.keys() == loaded.keys()


def test_check_against_an_adm_preset(tmp_path):
    meta = from_preset("64x64_classifier", device="meta").state_dict()
    good = {k: torch.zeros(()).expand(v.shape) for k, v in meta.items()}  # right shapes, no memory
    convert_checkpoint.check_against_preset(good, "adm/64x64_classifier")
    bad = dict(good)
    bad.pop("out.2.c_proj.bias")
    with pytest.raises(ValueError, match="missing \\['out.2.c_proj.bias'\\]"):
        convert_checkpoint.check_against_preset(bad, "adm/64x64_classifier")
    with pytest.raises(ValueError, match="wrong shapes"):
        convert_checkpoint.check_against_preset(good, "adm/128x128_classifier")


def test_code_carrying_input_is_refused_and_output_must_be_safetensors(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"w": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeWeightsError):
        convert_checkpoint.convert(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(ValueError, match=".safetensors"):
        convert_checkpoint.convert(tmp_path / "evil.pt", tmp_path / "out.pt")
