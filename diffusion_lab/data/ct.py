"""CT DataModules: simulated phantom pairs (``CTPhantoms``) and real full-/low-dose slice pairs (``CTSlicePairs``).

Both serve two kinds of batches:

* fit / validate: full-dose slices ``(x (B, 1, R, R), labels (B,) = 0)`` in the [-1, 1] window scale, to train
  a diffusion prior on full-dose images only (``num_classes = 0``: unconditional);
* test / predict: dicts ``{"full_dose": (B, 1, R, R), "low_dose": (B, 1, R, R), "dose": (B,) int64,
  "index": (B,) int64}``, one item per (slice, dose level); ``dose_names[dose]`` names the level.

The window (:class:`~diffusion_lab.data.ct_simulation.IntensityWindow`) maps attenuation or HU affinely to
[-1, 1] without clipping; ``window`` is exposed so outputs can be written back in physical units.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.base import DataModuleBase, TensorImageDataset
from diffusion_lab.data.ct_phantoms import phantom_seed, random_phantom, shepp_logan
from diffusion_lab.data.ct_simulation import (
    MU_WATER,
    CTGeometry,
    IntensityWindow,
    Units,
    cache_key,
    cached_arrays,
    load_cached,
    reconstruct,
    save_cached,
    simulate_pair,
)

log = logging.getLogger(__name__)


class PairedSlices(Dataset):
    """(slice, dose) pairs as dicts; item ``k * N + n`` is slice n at dose level k.

    Args:
        full_dose: (N, 1, H, W) reference slices.
        low_dose: (K, N, 1, H, W) low-dose slices at K dose levels.
    """

    def __init__(self, full_dose: Tensor, low_dose: Tensor) -> None:
        if low_dose.ndim != 5 or low_dose.shape[1:] != full_dose.shape:
            raise ValueError(
                f"low_dose must be (K, *full_dose.shape) = (K, {tuple(full_dose.shape)}), got {tuple(low_dose.shape)}"
            )
        self.full_dose, self.low_dose = full_dose.float(), low_dose.float()

    def __len__(self) -> int:
        return self.low_dose.shape[0] * self.low_dose.shape[1]

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        dose, index = divmod(item, self.full_dose.shape[0])
        return {
            "full_dose": self.full_dose[index],
            "low_dose": self.low_dose[dose, index],
            "dose": torch.tensor(dose),
            "index": torch.tensor(index),
        }


class LazySlices(Dataset):
    """``(image, label 0)`` items computed on first access by ``compute(index)`` and kept in memory.

    Simulating a training split takes about 60 ms a slice (two minutes for 2048 slices at 64 x 64); computing
    items when first drawn lets a short run (``fast_dev_run``, a smoke test) start at once. Items are
    deterministic functions of their index, so the order they are computed in changes nothing. When every item
    exists, ``on_complete(images)`` runs once (``CTPhantoms`` writes its disk cache there).
    """

    def __init__(
        self,
        length: int,
        compute: Callable[[int], Tensor],
        on_complete: Callable[[Tensor], None] | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.compute, self.on_complete = length, compute, on_complete
        self.images: Tensor | None = None
        self.done = torch.zeros(length, dtype=torch.bool)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not self.done[index]:
            image = self.compute(int(index)).float()
            if self.images is None:
                self.images = torch.empty((self.length, *image.shape))
            self.images[index] = image
            self.done[index] = True
            if self.on_complete is not None and bool(self.done.all()):
                callback, self.on_complete = self.on_complete, None
                callback(self.images)
        return self.images[index], torch.tensor(0)


class _PairsDataModule(DataModuleBase):
    """Shared pieces: one channel, no classes, dict loaders for test and predict."""

    window: IntensityWindow
    dose_names: list[str]

    @property
    def num_channels(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return 0

    def test_dataloader(self) -> DataLoader:
        dataset = self._dataset("test_set", "test")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('test') did not create a test set")
        return self._loader(dataset, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


# ---------------------------------------------------------------------------------------------------
# Simulated phantoms
# ---------------------------------------------------------------------------------------------------
def format_photons(photons: float) -> str:
    """Dose-level name, e.g. ``I0=1e4`` or ``I0=2.5e4``."""
    mantissa, exponent = f"{photons:.6e}".split("e")
    return f"I0={float(mantissa):g}e{int(exponent)}"


class CTPhantoms(_PairsDataModule):
    """Random Shepp-Logan-family phantoms (``ct_phantoms``) with simulated low-dose FBP reconstructions.

    The full-dose image is the noise-free FBP of the phantom (``reference="fbp"``: it shares FBP's blur and
    ringing with the low-dose images, as a real full-dose scan does) or the phantom itself
    (``reference="phantom"``). Low-dose images follow ``ct_simulation``: Poisson counts at ``photons`` incident
    photons per detector bin, optional electronic noise, log, FBP. Everything is cached under ``cache_dir``
    (keyed by a hash of the settings); later runs load the arrays.

    Args:
        resolution: image size R (64 and 128 are the documented sizes; any size >= 8 works).
        num_train, num_val, num_test: random phantoms per split (independent seeded streams).
        include_shepp_logan: append scikit-image's Shepp-Logan phantom as the last test slice.
        photons: incident photons I0 of each low-dose level.
        electronic_noise_std: electronic noise in counts (Zeng et al. 2015 use sigma_e^2 around 10).
        field_of_view_mm, num_angles, filter_name: the scan (``num_angles`` default 2 R views over [0, 180)).
        units, window_low, window_high, mu_water: intensity window (``IntensityWindow``).
        reference: ``fbp`` or ``phantom`` (see above).
        seed: seed of every phantom and noise draw.
        cache_dir: folder of the simulation cache.
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.
    """

    def __init__(
        self,
        resolution: int = 64,
        num_train: int = 2048,
        num_val: int = 64,
        num_test: int = 64,
        include_shepp_logan: bool = True,
        photons: Sequence[float] = (1e4, 5e4),
        electronic_noise_std: float = 0.0,
        field_of_view_mm: float = 350.0,
        num_angles: int | None = None,
        filter_name: str = "ramp",
        units: Units = "attenuation",
        window_low: float | None = None,
        window_high: float | None = None,
        mu_water: float = MU_WATER,
        reference: str = "fbp",
        seed: int = 0,
        cache_dir: str = "data_cache/ct",
        batch_size: int = 32,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if num_train < 1 or num_val < 0 or num_test < 0 or num_test + include_shepp_logan < 1:
            raise ValueError(
                f"need num_train >= 1, num_val >= 0 and at least one test slice, got num_train={num_train}, "
                f"num_val={num_val}, num_test={num_test}, include_shepp_logan={include_shepp_logan}"
            )
        photons = [float(p) for p in photons]
        if not photons or any(not p > 0 for p in photons):
            raise ValueError(f"photons must be a non-empty list of positive counts, got {photons}")
        if reference not in ("fbp", "phantom"):
            raise ValueError(f"reference must be 'fbp' or 'phantom', got {reference!r}")
        self.save_hyperparameters()
        self._resolution = resolution
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.include_shepp_logan = include_shepp_logan
        self.photons = photons
        self.electronic_noise_std = electronic_noise_std
        self.geometry = CTGeometry(field_of_view_mm, num_angles or 2 * resolution, filter_name)
        self.window = IntensityWindow(units, window_low, window_high, mu_water)
        self.reference, self.seed, self.cache_dir = reference, seed, Path(cache_dir)
        self.dose_names = [format_photons(p) for p in photons]

    @property
    def resolution(self) -> int:
        return self._resolution

    # ---- simulation ----------------------------------------------------------------------------------
    def phantom(self, split: str, index: int) -> np.ndarray:
        """Phantom ``index`` of ``split`` as attenuation (1/mm); the test split ends with Shepp-Logan."""
        if split == "test" and self.include_shepp_logan and index == self.num_test:
            r = shepp_logan(self._resolution)
        else:
            r = random_phantom(self._resolution, np.random.default_rng(phantom_seed(self.seed, split, index)))
        return r * self.window.mu_water

    def _count(self, split: str) -> int:
        return {
            "train": self.num_train,
            "val": self.num_val,
            "test": self.num_test + self.include_shepp_logan,
        }[split]

    def _spec(self, split: str, with_low_dose: bool) -> dict:
        return {
            "version": 1,
            "split": split,
            "n": self._count(split),
            "resolution": self._resolution,
            "seed": self.seed,
            "geometry": vars(self.geometry),
            "reference": self.reference,
            "mu_water": self.window.mu_water,
            "shepp_logan": self.include_shepp_logan and split == "test",
            "photons": self.photons if with_low_dose else None,
            "electronic_noise_std": self.electronic_noise_std if with_low_dose else None,
        }

    def _cache_path(self, spec: dict) -> Path:
        kind = "pairs" if spec["photons"] is not None else "full"
        return self.cache_dir / f"phantoms_{spec['split']}_{kind}_{self._resolution}px_{cache_key(spec)}.npz"

    def full_dose_slice(self, split: str, index: int) -> np.ndarray:
        """Full-dose image (1/mm) of slice ``index``: the noise-free FBP of its phantom, or the phantom."""
        mu = self.phantom(split, index)
        return reconstruct(mu, self.geometry) if self.reference == "fbp" else mu

    def _simulate(self, split: str, with_low_dose: bool) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        full, low = [], []
        for index in tqdm(range(self._count(split)), desc=f"simulating CT {split}", leave=False):
            if not with_low_dose:
                full.append(self.full_dose_slice(split, index))
                continue
            mu = self.phantom(split, index)
            fbp, noisy = simulate_pair(
                mu,
                self.geometry,
                self.photons,
                phantom_seed(self.seed, split, index),
                self.electronic_noise_std,
            )
            full.append(mu if self.reference == "phantom" else fbp)
            low.append(noisy)
        out = {"full_dose": np.stack(full)}
        if with_low_dose:
            out["low_dose"] = np.stack(low, axis=1)  # (K, N, H, W)
        return out

    def arrays(self, split: str, with_low_dose: bool = True) -> dict[str, Tensor]:
        """Cached attenuation arrays (1/mm) of a split: ``full_dose`` (N, H, W), ``low_dose`` (K, N, H, W)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        spec = self._spec(split, with_low_dose)
        return cached_arrays(self._cache_path(spec), spec, lambda: self._simulate(split, with_low_dose))

    def pairs(self, split: str = "test") -> PairedSlices:
        """(full-dose, low-dose) pairs of ``split`` in the [-1, 1] window scale."""
        arrays = self.arrays(split, with_low_dose=True)
        return PairedSlices(
            self.window.mu_to_unit(arrays["full_dose"][:, None]),
            self.window.mu_to_unit(arrays["low_dose"][:, :, None]),
        )

    def full_dose(self, split: str) -> Tensor:
        """Full-dose slices (N, 1, R, R) of ``split`` in the [-1, 1] window scale."""
        return self.window.mu_to_unit(self.arrays(split, with_low_dose=False)["full_dose"][:, None])

    def full_dose_dataset(self, split: str) -> Dataset:
        """``(x (1, R, R), label 0)`` items of ``split`` for training: from the disk cache when it holds them,
        else simulated lazily (:class:`LazySlices`) and cached once every slice has been drawn."""
        spec = self._spec(split, with_low_dose=False)
        path = self._cache_path(spec)
        stored = load_cached(path, spec)
        if stored is not None:
            images = self.window.mu_to_unit(stored["full_dose"][:, None])
            return TensorImageDataset(images, torch.zeros(len(images), dtype=torch.long))

        def compute(index: int) -> Tensor:
            return self.window.mu_to_unit(torch.from_numpy(self.full_dose_slice(split, index)).float()[None])

        def write(images: Tensor) -> None:
            save_cached(path, spec, {"full_dose": self.window.unit_to_mu(images[:, 0].double()).numpy()})

        return LazySlices(self._count(split), compute, write)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self.full_dose_dataset("train")
            if self.num_val:
                self.val_set = self.full_dose_dataset("val")
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.pairs("test")


# ---------------------------------------------------------------------------------------------------
# Real data (AAPM-Mayo style)
# ---------------------------------------------------------------------------------------------------
SLICE_SUFFIXES = (".npy", ".dcm", ".ima")


def read_slice_hu(path: Path, npy_scale: float = 1.0, npy_offset: float = 0.0) -> np.ndarray:
    """One slice in HU: a DICOM file (``pixel_array * RescaleSlope + RescaleIntercept``, needs the optional
    ``pydicom``: ``pip install diffusion_lab[dicom]``) or a 2-D ``.npy`` (``value * npy_scale + npy_offset``)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        image = np.load(path, allow_pickle=False).astype(np.float64) * npy_scale + npy_offset
    else:
        try:
            import pydicom
        except ImportError as err:
            raise ImportError(
                f"reading DICOM slice {str(path)!r} needs pydicom: pip install 'diffusion_lab[dicom]'"
            ) from err
        ds = pydicom.dcmread(path)
        slope, intercept = (
            float(getattr(ds, "RescaleSlope", 1.0)),
            float(getattr(ds, "RescaleIntercept", 0.0)),
        )
        image = ds.pixel_array.astype(np.float64) * slope + intercept
    if image.ndim != 2:
        raise ValueError(f"slice {str(path)!r} must be 2-D, got shape {image.shape}")
    return image


def list_slices(folder: Path) -> list[Path]:
    """Slice files of a folder (``.npy``, ``.dcm``, ``.IMA``), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES)


def find_slice_pairs(root: Path, full_dose_dir: str, low_dose_dir: str) -> list[tuple[Path, Path]]:
    """(full-dose file, low-dose file) pairs: the folders matching each glob (relative to ``root``) are paired in
    sorted order (one pair of folders per patient), and their files in name order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CT data root {str(root)!r} does not exist or is not a directory")
    full_dirs = sorted(p for p in root.glob(full_dose_dir) if p.is_dir())
    low_dirs = sorted(p for p in root.glob(low_dose_dir) if p.is_dir())
    if not full_dirs or len(full_dirs) != len(low_dirs):
        raise FileNotFoundError(
            f"under {str(root)!r}, full_dose_dir={full_dose_dir!r} matches {len(full_dirs)} folders and "
            f"low_dose_dir={low_dose_dir!r} matches {len(low_dirs)}; expected the same number (> 0), one pair "
            "per patient (AAPM-Mayo layout: <patient>/full_1mm and <patient>/quarter_1mm)"
        )
    pairs = []
    for full_dir, low_dir in zip(full_dirs, low_dirs):
        full, low = list_slices(full_dir), list_slices(low_dir)
        if not full or len(full) != len(low):
            raise ValueError(
                f"{str(full_dir)!r} has {len(full)} slices and {str(low_dir)!r} has {len(low)}; expected the same "
                f"number (> 0) of {SLICE_SUFFIXES} files, paired in name order"
            )
        pairs.extend(zip(full, low))
    return pairs


class CTSlicePairs(_PairsDataModule):
    """Real full-dose / low-dose slice pairs from DICOM or NumPy folders (AAPM-Mayo 2016 layout).

    ``root/<patient>/full_1mm/*.IMA`` with ``root/<patient>/quarter_1mm/*.IMA`` (or ``.dcm`` / ``.npy``), given
    as the globs ``full_dose_dir`` and ``low_dose_dir``. Test and predict use the pairs of the folders whose
    path contains one of ``test_patients`` (all pairs when None); fit / validate use the full-dose slices of the
    other folders (all when None), the last ``val_fraction`` of them for validation. Slices are converted to HU,
    area-resized to ``resolution`` when their size differs, and windowed (default HU [-1024, 3072]).

    Args:
        root, full_dose_dir, low_dose_dir: where the slices are (see above).
        test_patients: substrings naming the held-out patients (e.g. ``["L506"]``).
        dose_name: name of the low-dose level in logs (e.g. ``quarter``).
        resolution: output size R.
        units, window_low, window_high, mu_water: intensity window (``IntensityWindow``).
        npy_scale, npy_offset: ``HU = value * npy_scale + npy_offset`` for ``.npy`` slices.
        val_fraction: fraction of the training slices kept for validation.
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.
    """

    def __init__(
        self,
        root: str,
        full_dose_dir: str = "*/full_1mm",
        low_dose_dir: str = "*/quarter_1mm",
        test_patients: Sequence[str] | None = None,
        dose_name: str = "quarter",
        resolution: int = 512,
        units: Units = "hu",
        window_low: float | None = -1024.0,
        window_high: float | None = 3072.0,
        mu_water: float = MU_WATER,
        npy_scale: float = 1.0,
        npy_offset: float = 0.0,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.root, self.full_dose_dir, self.low_dose_dir = Path(root), full_dose_dir, low_dose_dir
        self.test_patients = list(test_patients) if test_patients else None
        self._resolution = resolution
        self.window = IntensityWindow(units, window_low, window_high, mu_water)
        self.npy_scale, self.npy_offset, self.val_fraction = npy_scale, npy_offset, val_fraction
        self.dose_names = [dose_name]

    @property
    def resolution(self) -> int:
        return self._resolution

    def load(self, paths: Sequence[Path]) -> Tensor:
        """Slices (N, 1, R, R) in the [-1, 1] window scale."""
        slices = []
        for path in paths:
            image = torch.from_numpy(read_slice_hu(path, self.npy_scale, self.npy_offset)).float()[None, None]
            if image.shape[-2:] != (self._resolution, self._resolution):
                image = F.interpolate(image, size=(self._resolution,) * 2, mode="area")
            slices.append(self.window.hu_to_unit(image[0]))
        return torch.stack(slices)

    def _is_test(self, path: Path) -> bool:
        return self.test_patients is None or any(p in str(path) for p in self.test_patients)

    def setup(self, stage: str | None = None) -> None:
        pairs = find_slice_pairs(self.root, self.full_dose_dir, self.low_dose_dir)
        if stage in (None, "fit", "validate") and self.train_set is None:
            train = [full for full, _ in pairs if self.test_patients is None or not self._is_test(full)]
            if not train:
                raise ValueError(
                    f"no training slices left after holding out test_patients={self.test_patients}"
                )
            if self.test_patients is None:
                log.warning(
                    "CTSlicePairs: no test_patients given; the prior trains on the test patients' slices"
                )
            images = self.load(train)
            n_val = int(round(self.val_fraction * len(images)))
            labels = torch.zeros(len(images), dtype=torch.long)
            self.train_set = TensorImageDataset(images[: len(images) - n_val], labels[: len(images) - n_val])
            if n_val:
                self.val_set = TensorImageDataset(images[-n_val:], labels[-n_val:])
        if stage in (None, "test", "predict") and self.test_set is None:
            test = [pair for pair in pairs if self._is_test(pair[0])]
            if not test:
                raise ValueError(
                    f"no slice pairs match test_patients={self.test_patients} under {str(self.root)!r}"
                )
            full = self.load([f for f, _ in test])
            self.test_set = PairedSlices(full, self.load([low for _, low in test])[None])


__all__ = [
    "CTPhantoms",
    "CTSlicePairs",
    "LazySlices",
    "PairedSlices",
    "find_slice_pairs",
    "format_photons",
    "list_slices",
    "read_slice_hu",
]
