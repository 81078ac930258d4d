"""Teacher trajectories on disk (sharded safetensors + ``meta.json``) and the DataModule that reads them (DSNO).

A trajectory set is a directory::

    meta.json                     format, count, shard size, data shape, sigma_start, the M recorded levels,
                                  number of classes, seed, and how the states were made (teacher, sampler, ...)
    shard_00000.safetensors       index (n,), noise (n, *shape), states (n, M, *shape), labels (n,)
    shard_00001.safetensors       ...

Trajectory ``i`` starts from the unit noise ``z_i = randn(shape)`` of ``torch.Generator().manual_seed(seed + i)``
(the initial state is ``sigma_start * z_i``) with label ``i mod num_classes``; ``states[i, m]`` is the solver's
state at ``sigmas[m]`` (VE view ``x = x0 + sigma eps``; the last level is 0 for a trajectory that ends in the
sample). Shards are written atomically (temporary file, then rename), so an interrupted run leaves only complete
shards and a re-run with the same settings resumes where it stopped. Shards are read with safetensors only (no
pickle); a truncated or corrupt shard raises :class:`CorruptTrajectoryError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lab.data.base import DataModuleBase

FORMAT = "diffusion_lab.trajectories/1"
META = "meta.json"
KEYS = ("index", "noise", "states", "labels")
SampleFn = Callable[[Tensor, Tensor], Tensor]
"""``(unit_noise (n, *shape), labels (n,)) -> states (n, M, *shape)``: runs the teacher and records its states."""


class CorruptTrajectoryError(ValueError):
    """A trajectory shard or ``meta.json`` is truncated, corrupt or inconsistent with the set's metadata."""


def shard_path(directory: str | os.PathLike, shard: int) -> Path:
    return Path(directory) / f"shard_{shard:05d}.safetensors"


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The set's ``meta.json``; FileNotFoundError naming the directory and how to make the set."""
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"no trajectory set at '{directory}' ({META} is missing); make one with "
            f"`python tools/make_trajectories.py --config <dsno config>` (or --teacher-config ... --out {directory})"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptTrajectoryError(
            f"'{path}' is not valid JSON ({err}); delete the set and remake it"
        ) from err
    if meta.get("format") != FORMAT:
        raise CorruptTrajectoryError(f"'{path}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _shard_rows(meta: Mapping[str, Any], shard: int) -> range:
    start = shard * meta["shard_size"]
    return range(start, min(start + meta["shard_size"], meta["num_trajectories"]))


def num_shards(meta: Mapping[str, Any]) -> int:
    return -(-meta["num_trajectories"] // meta["shard_size"])


def read_shard(
    directory: str | os.PathLike, shard: int, meta: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """Tensors of one shard, checked against the metadata (keys, count, shapes, indices).

    Raises FileNotFoundError for a missing shard and :class:`CorruptTrajectoryError` (naming the shard) for a
    truncated, corrupt or inconsistent one.
    """
    from diffusion_lab.pretrained.safe_load import CorruptWeightsError, load_state_dict_file

    meta = read_meta(directory) if meta is None else meta
    path = shard_path(directory, shard)
    if not path.is_file():
        raise FileNotFoundError(
            f"trajectory shard '{path}' is missing: the set is incomplete; re-run tools/make_trajectories.py "
            "with the same arguments (it resumes)"
        )
    remake = "delete it and re-run tools/make_trajectories.py with the same arguments (it resumes)"
    try:
        tensors = load_state_dict_file(
            path, what="trajectory shard", where_to_get="tools/make_trajectories.py"
        )
    except CorruptWeightsError as err:
        raise CorruptTrajectoryError(
            f"trajectory shard '{path}' is truncated or corrupt: {remake} ({err})"
        ) from err
    rows = _shard_rows(meta, shard)
    shape, m = tuple(meta["data_shape"]), len(meta["sigmas"])
    expected = {
        "index": (len(rows),),
        "noise": (len(rows), *shape),
        "states": (len(rows), m, *shape),
        "labels": (len(rows),),
    }
    got = {k: tuple(tensors[k].shape) if k in tensors else None for k in KEYS}
    if got != expected or not torch.equal(tensors["index"], torch.arange(rows.start, rows.stop)):
        raise CorruptTrajectoryError(
            f"trajectory shard '{path}' does not match {META}: tensor shapes {got}, expected {expected}; {remake}"
        )
    return tensors


def _shard_is_complete(directory: Path, shard: int, meta: Mapping[str, Any]) -> bool:
    try:
        read_shard(directory, shard, meta)
    except (FileNotFoundError, CorruptTrajectoryError):
        return False
    return True


def _write_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def unit_noise_for(indices: range | list[int], shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard-normal noise of each trajectory from its own seed ``seed + i`` (independent of batching)."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices]
    )


def write_trajectories(
    directory: str | os.PathLike,
    sample_fn: SampleFn,
    *,
    num_trajectories: int,
    data_shape: tuple[int, ...],
    sigma_start: float,
    sigmas: list[float],
    num_classes: int = 0,
    shard_size: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Write (or finish writing) a trajectory set; returns the directory (module docstring for the layout).

    ``sample_fn`` maps unit noise and labels to the recorded states. ``source`` (teacher, sampler, ...) is stored
    in ``meta.json``; resuming requires the same settings, else ValueError names the first difference.
    """
    from tqdm.auto import tqdm

    if num_trajectories < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(
            f"need num_trajectories, shard_size, batch_size >= 1; got {num_trajectories}, {shard_size}, {batch_size}"
        )
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "num_trajectories": int(num_trajectories),
        "shard_size": int(shard_size),
        "data_shape": [int(s) for s in data_shape],
        "sigma_start": float(sigma_start),
        "sigmas": [float(s) for s in sigmas],
        "num_classes": int(num_classes),
        "seed": int(seed),
        "dtype": str(dtype).removeprefix("torch."),
        "source": json.loads(json.dumps(dict(source or {}))),
    }
    if (directory / META).is_file():
        old = read_meta(directory)
        for key, value in meta.items():
            if old.get(key) != value:
                raise ValueError(
                    f"'{directory}' already holds trajectories made with {key}={old.get(key)!r}, not {value!r}; "
                    "use another output directory or delete this one"
                )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    shards = [s for s in range(num_shards(meta)) if not _shard_is_complete(directory, s, meta)]
    done = num_trajectories - sum(len(_shard_rows(meta, s)) for s in shards)
    bar = tqdm(total=num_trajectories, initial=done, desc="trajectories", unit="traj", disable=not progress)
    try:
        for shard in shards:
            rows = _shard_rows(meta, shard)
            parts: dict[str, list[Tensor]] = {k: [] for k in KEYS}
            for start in range(rows.start, rows.stop, batch_size):
                index = torch.arange(start, min(start + batch_size, rows.stop))
                noise = unit_noise_for(index.tolist(), tuple(data_shape), seed)
                labels = index % num_classes if num_classes else torch.zeros_like(index)
                states = sample_fn(noise, labels).detach().cpu()
                if tuple(states.shape) != (len(index), len(sigmas), *data_shape):
                    raise ValueError(
                        f"sample_fn returned states of shape {tuple(states.shape)}, expected "
                        f"{(len(index), len(sigmas), *data_shape)}"
                    )
                for key, value in zip(KEYS, (index, noise.to(dtype), states.to(dtype), labels)):
                    parts[key].append(value)
                bar.update(len(index))
            tensors = {k: torch.cat(v) for k, v in parts.items()}
            _write_atomic(shard_path(directory, shard), tensors, {"shard": str(shard), "format": FORMAT})
    finally:
        bar.close()
    return directory


def load_trajectories(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta, tensors of all shards concatenated: index, noise, states, labels), every shard checked."""
    meta = read_meta(directory)
    shards = [read_shard(directory, s, meta) for s in range(num_shards(meta))]
    return meta, {k: torch.cat([s[k] for s in shards]) for k in KEYS}


class TrajectoryDataset(Dataset):
    """Items ``(noise (*shape), states (M, *shape), labels ())`` in float32 / int64."""

    def __init__(self, noise: Tensor, states: Tensor, labels: Tensor) -> None:
        if not noise.shape[0] == states.shape[0] == labels.shape[0]:
            raise ValueError(
                f"{noise.shape[0]} noises, {states.shape[0]} trajectories, {labels.shape[0]} labels"
            )
        self.noise, self.states, self.labels = noise, states, labels.long()

    def __len__(self) -> int:
        return self.noise.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.noise[index].float(), self.states[index].float(), self.labels[index]


class TrajectoryData(DataModuleBase):
    """DataModule of a trajectory set: batches ``(noise (B, *shape), states (B, M, *shape), labels (B,))``.

    Args:
        path: the set's directory (made by ``tools/make_trajectories.py``); a relative path that does not exist
            in the working directory is looked up relative to the repository root.
        val_fraction: fraction of the trajectories held out for validation (the last ones by index).
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.

    ``data_shape``, ``num_classes``, ``sigma_start`` and ``sigmas`` come from ``meta.json`` (None while the set
    does not exist yet). ``predict`` needs no trajectories.
    """

    def __init__(
        self,
        path: str,
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path, self.val_fraction = path, val_fraction

    @property
    def directory(self) -> Path:
        path = Path(self.path).expanduser()
        if path.exists() or path.is_absolute():
            return path
        repo_path = Path(__file__).resolve().parents[2] / path
        return repo_path if repo_path.exists() else path

    @property
    def meta(self) -> dict[str, Any] | None:
        return read_meta(self.directory) if (self.directory / META).is_file() else None

    def is_complete(self) -> bool:
        """Whether ``meta.json`` and every shard file exist (contents are checked when loading)."""
        meta = self.meta
        return meta is not None and all(
            shard_path(self.directory, s).is_file() for s in range(num_shards(meta))
        )

    def _meta_value(self, key: str) -> Any:
        meta = self.meta
        return None if meta is None else meta[key]

    @property
    def data_shape(self) -> tuple[int, ...] | None:
        shape = self._meta_value("data_shape")
        return None if shape is None else tuple(shape)

    @property
    def num_channels(self) -> int | None:
        shape = self.data_shape
        return None if shape is None else shape[0]

    @property
    def resolution(self) -> int | None:
        shape = self.data_shape
        return shape[-1] if shape is not None and len(shape) == 3 else None

    @property
    def num_classes(self) -> int | None:
        return self._meta_value("num_classes")

    @property
    def sigma_start(self) -> float | None:
        return self._meta_value("sigma_start")

    @property
    def sigmas(self) -> list[float] | None:
        return self._meta_value("sigmas")

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" or self.train_set is not None:
            return
        _, tensors = load_trajectories(self.directory)
        n = tensors["noise"].shape[0]
        n_val = int(round(self.val_fraction * n))
        if n - n_val < 1:
            raise ValueError(f"{n} trajectories leave no training set with val_fraction={self.val_fraction}")
        parts = [tensors[k] for k in ("noise", "states", "labels")]
        self.train_set = TrajectoryDataset(*(p[: n - n_val] for p in parts))
        self.val_set = TrajectoryDataset(*(p[n - n_val :] for p in parts)) if n_val else None


__all__ = [
    "CorruptTrajectoryError",
    "TrajectoryData",
    "TrajectoryDataset",
    "load_trajectories",
    "read_meta",
    "read_shard",
    "shard_path",
    "unit_noise_for",
    "write_trajectories",
]
