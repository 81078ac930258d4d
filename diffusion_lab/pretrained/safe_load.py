"""The one safe loader for every weights file the project reads from disk.

Every pretrained loader (ADM, diffusers, DINO, CLIP, Inception) and the checkpoint converter go through
:func:`load_state_dict_file`. It accepts three on-disk formats, recognised by their first bytes rather than
by the file name:

* safetensors (8-byte little-endian header length, then a JSON header starting with ``{``);
* PyTorch's zip archive (``torch.save`` since 1.6; magic ``PK\\x03\\x04``);
* PyTorch's legacy pickle stream (``torch.save(..., _use_new_zipfile_serialization=False)``, what many
  older public checkpoints are).

Pickles are only ever opened with ``torch.load(..., weights_only=True)``. Before that, the pickle opcodes
are scanned (without executing anything) for imports of code outside torch's tensor-rebuilding helpers,
so that a file carrying code is refused with a message naming the offending import rather than a long
unpickler traceback. Truncated or corrupt files give :class:`CorruptWeightsError` naming the file, and a
missing file gives :class:`MissingWeightsError` naming the file and where a user obtains it.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "check_safetensors_file",
    "CorruptWeightsError",
    "MissingWeightsError",
    "UnsafeWeightsError",
    "detect_format",
    "load_state_dict_file",
    "scan_pickle_imports",
]

# Imports a plain tensor checkpoint legitimately contains: torch's own rebuild helpers and storage /
# dtype classes, OrderedDict (state dicts), _codecs.encode (bytes in protocol-2 pickles), and a few
# builtin containers. Anything else (os.system, builtins.eval, arbitrary classes) is refused.
_SAFE_IMPORT_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")
_SAFE_BUILTINS = {
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.slice",
    "builtins.tuple",
}
# Keys under which common checkpoint layouts nest the state dict (Lightning, open_clip training, DINO).
_NESTED_KEYS = ("state_dict", "model", "teacher", "module")


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file is not on disk; the message says what it is and where to get it."""


class CorruptWeightsError(ValueError):
    """A weights file exists but is truncated, corrupt, empty or not a weights file at all."""


class UnsafeWeightsError(ValueError):
    """A pickle file imports code (classes or functions outside torch), so it is refused unopened."""


def _missing_message(path: Path, what: str, where_to_get: str) -> str:
    return (
        f"{what}: weights file '{path}' does not exist. Obtain it from: {where_to_get}. "
        f"Then pass its local path (nothing is downloaded automatically)."
    )


def detect_format(path: str | os.PathLike) -> str:
    """Return ``"safetensors"``, ``"zip"`` (torch.save archive) or ``"pickle"`` from the first bytes."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 0:
        raise CorruptWeightsError(
            f"weights file '{path}' is empty (0 bytes); the download was probably cut off."
        )
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle PROTO opcode: every pickle since protocol 2 starts with it
        return "pickle"
    raise CorruptWeightsError(
        f"weights file '{path}' is neither safetensors nor a torch.save file (first bytes {head[:8]!r}); "
        f"it may be corrupt, an HTML error page, or a Git LFS pointer."
    )


def _iter_pickle_imports(stream: io.BufferedIOBase, max_pickles: int) -> Iterator[str]:
    """Yield ``module.name`` for every GLOBAL / STACK_GLOBAL / INST opcode in up to ``max_pickles`` pickles.

    ``pickletools.genops`` only decodes opcodes; nothing is imported or executed. STACK_GLOBAL takes its
    module and name from the two most recent string pushes, which we track.
    """
    for _ in range(max_pickles):
        if not stream.peek(1)[:1]:  # end of file: no further pickle
            return
        strings: list[str] = []  # recent string pushes, the operands of STACK_GLOBAL
        memo: dict[int, str | None] = {}
        last: str | None = None  # the value just pushed, if it was a string
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    yield str(arg).replace(" ", ".")
                elif name == "STACK_GLOBAL":
                    yield ".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>"
                if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    last = str(arg)
                    strings.append(last)
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    last = memo.get(int(arg))
                    if last is not None:
                        strings.append(last)
                else:
                    last = None
        except ValueError as err:  # genops raises ValueError on a truncated or malformed stream
            raise _ScanError(str(err)) from err


class _ScanError(Exception):
    pass


def scan_pickle_imports(path: str | os.PathLike) -> list[str]:
    """List the imports (``module.name``) a torch.save / pickle file would perform, without running it.

    For a zip archive the scanned pickle is its ``data.pkl``; a legacy torch.save stream is a sequence of
    pickles (magic number, protocol, system info, the object, storage keys), all of which are scanned.
    Raises :class:`CorruptWeightsError` if the stream cannot be decoded.
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not members:
                    raise CorruptWeightsError(f"weights file '{path}' is a zip archive without a data.pkl.")
                data = archive.read(members[0])
            return list(_iter_pickle_imports(io.BufferedReader(io.BytesIO(data)), max_pickles=1))
        if fmt == "pickle":
            with path.open("rb") as raw:
                return list(_iter_pickle_imports(io.BufferedReader(raw), max_pickles=5))
    except (zipfile.BadZipFile, _ScanError, EOFError, OSError) as err:
        raise CorruptWeightsError(
            f"weights file '{path}' is truncated or corrupt ({type(err).__name__}: {err}); download it again."
        ) from err
    return []


def _is_safe_import(name: str) -> bool:
    return name in _SAFE_BUILTINS or any(name.startswith(p) for p in _SAFE_IMPORT_PREFIXES)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CorruptWeightsError(
            f"weights file '{path}' is a truncated or corrupt safetensors file ({err}); download it again."
        ) from err


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _load_pickle(path: Path, fmt: str, where_to_get: str) -> object:
    if fmt == "zip" and _is_torchscript_archive(path):
        raise UnsafeWeightsError(
            f"refusing to load '{path}': it is a TorchScript archive (e.g. OpenAI's original CLIP release), "
            f"which carries code. Use the plain state-dict or safetensors release instead: {where_to_get}"
        )
    unsafe = [name for name in scan_pickle_imports(path) if not _is_safe_import(name)]
    if unsafe:
        raise UnsafeWeightsError(
            f"refusing to load '{path}': its pickle imports code ({', '.join(sorted(set(unsafe))[:5])}), "
            f"which could run arbitrary commands. Only plain tensor checkpoints are accepted: if you trust "
            f"the file, re-save it as torch.save(model.state_dict()) or as safetensors."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "zip"))
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(
            f"refusing to load '{path}': torch.load(weights_only=True) rejected it "
            f"({str(err).strip()[-200:]})."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CorruptWeightsError(
            f"weights file '{path}' is truncated or corrupt ({type(err).__name__}: {err}); download it again."
        ) from err


def _extract_state_dict(obj: object, path: Path, key: str | None) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint: the object itself or one nested key (Lightning etc.)."""
    if not isinstance(obj, Mapping):
        raise CorruptWeightsError(f"weights file '{path}' holds a {type(obj).__name__}, not a state dict.")
    if key is not None:
        if key not in obj:
            raise KeyError(f"weights file '{path}' has no key '{key}'; top-level keys: {sorted(obj)[:20]}")
        obj = obj[key]
    elif not all(isinstance(v, Tensor) for v in obj.values()):
        nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            raise CorruptWeightsError(
                f"weights file '{path}' is a dict with non-tensor values and none of the keys "
                f"{list(_NESTED_KEYS)}; top-level keys: {sorted(map(str, obj))[:20]}. Pass key=..."
            )
        obj = obj[nested[0]]
    non_tensor = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise CorruptWeightsError(f"state dict in '{path}' has non-tensor entries: {non_tensor[:10]}")
    return dict(obj)


def check_safetensors_file(path: str | os.PathLike, *, what: str, where_to_get: str) -> list[str]:
    """Validate a safetensors file without reading its tensors (header and size only); return its keys.

    For loaders that hand the file to another library (diffusers' ``from_pretrained``): the same
    :class:`MissingWeightsError` / :class:`CorruptWeightsError` as :func:`load_state_dict_file`, cheaply.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(_missing_message(path, what, where_to_get))
    if detect_format(path) != "safetensors":
        raise CorruptWeightsError(
            f"{what}: '{path}' is not a safetensors file (found {detect_format(path)})."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise CorruptWeightsError(
            f"weights file '{path}' is a truncated or corrupt safetensors file ({err}); download it again."
        ) from err


def load_state_dict_file(
    path: str | os.PathLike, *, what: str, where_to_get: str, key: str | None = None
) -> dict[str, Tensor]:
    """Load a ``{name: tensor}`` state dict from a local file, safely, on the CPU.

    Args:
        path: local file (safetensors, torch.save zip, or legacy torch.save pickle).
        what: human-readable name of the weights, used in error messages (e.g. ``"ADM 256x256 classifier"``).
        where_to_get: where a user obtains the file (URL or instructions), used when it is missing.
        key: nested key holding the state dict; by default the top level if all values are tensors, else
            the first of ``state_dict`` / ``model`` / ``teacher`` / ``module`` that is present.

    Raises:
        MissingWeightsError: the file does not exist (message names it and ``where_to_get``).
        CorruptWeightsError: empty, truncated, corrupt, or not a state dict.
        UnsafeWeightsError: a pickle that imports code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(_missing_message(path, what, where_to_get))
    if path.is_dir():
        raise IsADirectoryError(f"{what}: expected a weights file but '{path}' is a directory.")
    fmt = detect_format(path)
    obj = _load_safetensors(path) if fmt == "safetensors" else _load_pickle(path, fmt, where_to_get)
    return _extract_state_dict(obj, path, key)
