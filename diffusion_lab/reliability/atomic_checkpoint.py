"""Atomic checkpoint files and safe, clearly failing checkpoint loading.

Writing (:func:`atomic_save`): the checkpoint is serialised into ``.NAME.tmp-PID`` in the target's
directory, flushed and ``fsync``-ed, then renamed over ``NAME`` with ``os.replace`` (atomic on POSIX and
Windows within one file system), and the directory is ``fsync``-ed so the rename survives a power loss. A
process killed at any moment leaves either the previous file or the new one, never a torn one; stale
temporaries of dead writers are removed by the next save.

Reading (:func:`load_checkpoint_file`): the CRC-32 of every member of the zip archive is checked (``torch.load``
does not, so a flipped bit would load silently), then ``torch.load(..., weights_only=True)``, so a checkpoint
from elsewhere cannot run code. Failures are sorted into a missing file (``FileNotFoundError``), a truncated or
corrupt file (:class:`CorruptCheckpointError`) and a pickle that imports code (:class:`UnsafeCheckpointError`,
naming the imports, found by ``pretrained.safe_load``'s opcode scan without executing anything); each
message names the file. Never a raw unpickling traceback.

:class:`AtomicCheckpointIO` plugs both into Lightning (``trainer.plugins``), so ``ModelCheckpoint``, the
preemption handler and ``--ckpt_path`` use them.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.pretrained.safe_load import (
    CorruptWeightsError,
    UnsafeWeightsError,
    detect_format,
    scan_pickle_imports,
)

__all__ = [
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "atomic_save",
    "load_checkpoint_file",
]


class CorruptCheckpointError(CorruptWeightsError):
    """A checkpoint file is empty, truncated, corrupt, or not a Lightning checkpoint."""


class UnsafeCheckpointError(UnsafeWeightsError):
    """A checkpoint's pickle imports code outside what ``torch.load(weights_only=True)`` allows."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.tmp-PID`` files next to ``path`` left by writers that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(
    obj: Any, path: str | os.PathLike, write: Callable[[Any, io.BufferedWriter], None] | None = None
) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file + fsync + ``os.replace`` + directory fsync).

    ``write(obj, file)`` serialises into the open temporary file (default ``torch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _corrupt(path: Path, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint '{path}' is truncated or corrupt ({detail}). It was probably cut off while being written "
        f"or copied; use an earlier checkpoint (e.g. last.ckpt written with AtomicCheckpointIO is never torn)."
    )


def _check_crc(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` if a member of the zip archive fails its CRC-32 (``torch.load``
    itself does not check them, so a flipped bit in tensor data would load silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    if bad is not None:
        raise _corrupt(path, f"CRC-32 mismatch in member {bad!r}")


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Load a Lightning checkpoint (or any ``torch.save`` dict) safely; see the module docstring for errors.

    ``verify``: check the CRC-32 of every member of a zip-format checkpoint first (one extra read).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"expected a checkpoint file but '{path}' is a directory")
    try:
        fmt = detect_format(path)
    except CorruptWeightsError as err:
        raise _corrupt(path, str(err)) from err
    if fmt == "safetensors":
        raise CorruptCheckpointError(
            f"'{path}' is a safetensors weights file, not a training checkpoint; load it for inference with "
            f"diffusion_lab.methods.loading.load_module (resuming needs the optimiser and loop state)"
        )
    if verify and zipfile.is_zipfile(path):
        _check_crc(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused something: code imports, or a stream too broken to decode. Tell them apart
        # by scanning the opcodes (nothing is executed).
        try:
            imports = scan_pickle_imports(path)
        except CorruptWeightsError as scan_err:
            raise _corrupt(path, str(scan_err)) from err
        foreign = sorted({name for name in imports if not name.startswith(("torch.", "collections."))})
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint '{path}': torch.load(weights_only=True) rejected it "
            f"(imports: {', '.join(foreign[:5]) or 'see below'}; {str(err).strip().splitlines()[-1][:200]}). "
            f"A pickle that imports code could run arbitrary commands; if the file is yours and trusted, "
            f"re-save it with plain tensors and containers only."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise _corrupt(path, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}") from err
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with atomic local writes and safe loading (``trainer.plugins``).

    Args:
        verify: after writing the temporary file, re-read it as a zip archive and check every member's CRC
            before it replaces the previous checkpoint (costs one read of the file, usually from page cache).

    Remote paths (``s3://`` etc.) fall back to Lightning's fsspec transaction. ``last_saved`` is the path of
    the most recent completed write.
    """

    def __init__(self, verify: bool = False) -> None:
        super().__init__()
        self.verify = verify
        self.last_saved: str | None = None

    def write(self, checkpoint: dict[str, Any], f: io.BufferedWriter) -> None:
        """Serialise ``checkpoint`` into the open temporary file (a hook for fault-injection tests)."""
        torch.save(checkpoint, f)
        if self.verify:
            f.flush()
            with zipfile.ZipFile(f.name) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise CorruptCheckpointError(
                    f"checkpoint just written to '{f.name}' fails its CRC check in {bad}"
                )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            super().save_checkpoint(checkpoint, path)
        else:
            atomic_save(checkpoint, path, self.write)
        self.last_saved = str(path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Always ``weights_only=True`` (a ``weights_only=False`` request is refused rather than obeyed silently)."""
        if weights_only is False:
            raise UnsafeCheckpointError(
                f"{type(self).__name__} loads checkpoints with weights_only=True only; got weights_only=False "
                f"for '{path}'"
            )
        fs = get_filesystem(path)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location if map_location is not None else "cpu")
