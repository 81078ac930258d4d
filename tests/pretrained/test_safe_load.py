"""The one safe weights loader: formats, missing / truncated / corrupt files, code-carrying pickles."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion_lab.pretrained.safe_load import (
    CorruptWeightsError,
    MissingWeightsError,
    UnsafeWeightsError,
    detect_format,
    load_state_dict_file,
    scan_pickle_imports,
)

WHERE = "https://example.org/weights (the project README)"


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "conv.bias": torch.randn(8, generator=gen)}


def load(path: Path, **kw) -> dict[str, torch.Tensor]:
    return load_state_dict_file(path, what="test weights", where_to_get=WHERE, **kw)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write(path: Path, fmt: str, obj) -> Path:
    if fmt == "safetensors":
        save_file(obj, str(path))
    elif fmt == "zip":
        torch.save(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "pickle"])
def test_round_trip_in_every_format_is_exact_and_format_is_sniffed_not_named(fmt, tmp_path):
    path = write(tmp_path / "weights.bin", fmt, state())  # misleading extension on purpose
    assert detect_format(path) == fmt
    assert_same(load(path), state())


def test_nested_checkpoints_lightning_and_explicit_key(tmp_path):
    path = write(
        tmp_path / "lightning.ckpt", "zip", {"epoch": 3, "state_dict": state(), "optimizer_states": []}
    )
    assert_same(load(path), state())
    path = write(tmp_path / "ema.pt", "zip", {"ema": OrderedDict(state()), "model": {"x": torch.zeros(1)}})
    assert_same(load(path, key="ema"), state())
    with pytest.raises(KeyError, match="no key 'nope'"):
        load(path, key="nope")
    path = write(tmp_path / "odd.pt", "zip", {"weights": state(), "step": 1})
    with pytest.raises(CorruptWeightsError, match="key"):
        load(path)


def test_missing_file_names_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "no_such_file.safetensors"
    with pytest.raises(MissingWeightsError) as err:
        load(missing)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value) and WHERE in str(err.value) and "test weights" in str(err.value)
    with pytest.raises(IsADirectoryError):
        load(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "pickle"])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9])
def test_truncated_files_raise_a_clear_error_naming_the_file(fmt, keep, tmp_path):
    big = {"w": torch.randn(64, 64)}
    full = write(tmp_path / "full", fmt, big).read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(CorruptWeightsError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert "pickle" not in type(err.value.__cause__).__module__ if err.value.__cause__ else True


def test_random_bytes_and_html_error_pages_are_rejected(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    html = tmp_path / "model.safetensors"
    html.write_text("<!DOCTYPE html><html>404 Not Found</html>")
    for path in (junk, html):
        with pytest.raises(CorruptWeightsError, match=str(path.name)):
            load(path)


class _TouchOnLoad:
    """Unpickling this runs Path.touch(marker): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "pickle_proto2", "pickle_proto5"])
def test_pickle_with_code_is_refused_and_never_executed(how, tmp_path):
    marker = tmp_path / "code_ran"
    payload = {"w": torch.zeros(2), "evil": _TouchOnLoad(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch_zip":
        torch.save(payload, path)
    elif how == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2 if how == "pickle_proto2" else 5))
    assert any(name.startswith("pathlib.") for name in scan_pickle_imports(path))
    with pytest.raises(UnsafeWeightsError, match="imports code"):
        load(path)
    assert not marker.exists()


def test_plain_torch_checkpoints_import_only_torch_rebuild_helpers(tmp_path):
    path = write(tmp_path / "ok.pt", "zip", OrderedDict(state()))
    names = scan_pickle_imports(path)
    assert names and all(n.startswith("torch.") or n == "collections.OrderedDict" for n in names)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; still writes archives
def test_torchscript_archives_are_refused_with_a_pointer_to_the_plain_release(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UnsafeWeightsError, match="TorchScript") as err:
        load(path)
    assert WHERE in str(err.value)
