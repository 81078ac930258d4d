"""Atomic writes (a writer killed part-way leaves the previous file) and safe, clearly failing loads."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from diffusion_lab.reliability import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    load_checkpoint_file,
)


def test_interrupted_write_leaves_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)

    def half_then_die(obj, f):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        f.write(buffer.getvalue()[:100])
        raise KeyboardInterrupt  # any interruption while the temporary is being written

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": torch.tensor(2)}, path, half_then_die)
    assert int(load_checkpoint_file(path)["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temporary_of_a_dead_writer_is_removed(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max of Linux: no such process
    stale = tmp_path / f".last.ckpt.tmp-{dead_pid}"
    stale.write_bytes(b"half a checkpoint")
    atomic_save({"a": torch.ones(1)}, tmp_path / "last.ckpt")
    assert not stale.exists() and (tmp_path / "last.ckpt").is_file()


def test_checkpoint_io_round_trip_and_refuses_weights_only_false(tmp_path):
    io_plugin = AtomicCheckpointIO(verify=True)
    path = tmp_path / "sub" / "x.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, path)
    assert io_plugin.last_saved == str(path)
    assert torch.equal(io_plugin.load_checkpoint(path)["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True only"):
        io_plugin.load_checkpoint(path, weights_only=False)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "bit_flip"])
def test_corrupt_files_get_a_clear_error_naming_the_file(tmp_path, kind):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(512))
    else:  # a flipped byte inside the tensor data: torch.load's zip reader checks CRCs
        with zipfile.ZipFile(good) as archive:
            member = next(i for i in archive.infolist() if "/data/" in i.filename)
        header = data[member.header_offset : member.header_offset + 30]  # the local header's own lengths
        name_length, extra_length = (
            int.from_bytes(header[26:28], "little"),
            int.from_bytes(header[28:30], "little"),
        )
        offset = member.header_offset + 30 + name_length + extra_length + 10
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        bad.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint '{bad}' is truncated or corrupt"):
        load_checkpoint_file(bad)
    if kind == "bit_flip":  # why the CRC check is needed: torch.load alone returns the damaged tensor
        assert not torch.equal(
            torch.load(bad, weights_only=True)["state_dict"]["w"], torch.load(good)["state_dict"]["w"]
        )


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load checkpoint .*evil.ckpt.*system"):
        load_checkpoint_file(path)
    assert not (tmp_path / "PWNED").exists()
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip pickle format, same payload
    legacy.write_bytes(pickle.dumps({"payload": _RunsCode()}))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match="legacy.ckpt"):
        load_checkpoint_file(legacy)
    assert not (tmp_path / "PWNED").exists()


def test_missing_directory_safetensors_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt' does not exist"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_checkpoint_file(tmp_path)
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(weights))
    with pytest.raises(CorruptCheckpointError, match="safetensors weights file, not a training checkpoint"):
        load_checkpoint_file(weights)
    listed = tmp_path / "list.ckpt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(CorruptCheckpointError, match="holds a list, not a dict"):
        load_checkpoint_file(listed)
