"""Simulate low-dose CT slices, writing them in the AAPM-Mayo folder layout that ``data.ct.CTSlicePairs`` reads.

Two sources:

* ``--phantoms``: the ``CTPhantoms`` test split of a config (default ``configs/ldct/phantom_prior.yaml``): fills
  its disk cache and exports ``OUT/phantoms/full/slice_NNNN.npy`` plus one folder per dose level (HU);
* ``--full-dose-dir DIR`` (repeatable): real full-dose slices (``.npy`` in HU, or DICOM with the ``dicom``
  extra), one folder per patient, re-projected and simulated at each ``--photons`` level (Zeng et al. 2015 in
  attenuation units, ``data.ct_simulation``), exported as ``OUT/<folder name>/full/`` and ``OUT/<name>/I0=.../``.

The reference written to ``full/`` is the noise-free FBP of the same re-projection (``--reference fbp``, the
default: it shares the pipeline's blur, so a comparison measures the noise only) or the input (``input``).
Pixels outside the reconstruction circle (table, air) are set to air, as the parallel-beam projector needs.

    python tools/simulate_low_dose.py --phantoms --out sim/
    python tools/simulate_low_dose.py --full-dose-dir mayo/L067/full_1mm --photons 1e4 5e4 --out sim/ \\
        --field-of-view-mm 350 --resolution 256
    diffusion-lab test --config configs/ldct/ddlm_phantoms.yaml --data.class_path diffusion_lab.data.ct.CTSlicePairs \\
        --data.init_args.root sim --data.init_args.full_dose_dir '*/full' --data.init_args.low_dose_dir '*/I0=1e4' ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_lab.data.ct import format_photons, list_slices, read_slice_hu  # noqa: E402
from diffusion_lab.data.ct_simulation import (  # noqa: E402
    MU_WATER,
    CTGeometry,
    hu_to_mu,
    mu_to_hu,
    reconstruction_circle,
    simulate_pair,
)


def simulate_folder(
    folder: Path,
    out: Path,
    photons: list[float],
    geometry: CTGeometry,
    resolution: int | None,
    electronic_noise_std: float,
    reference: str,
    seed: int,
) -> int:
    """Simulate every slice of ``folder``; returns the number written."""
    files = list_slices(folder)
    if not files:
        raise FileNotFoundError(f"no .npy / .dcm / .IMA slices in {str(folder)!r}")
    name = folder.parent.name if folder.name.lower().startswith("full") else folder.name
    for index, path in enumerate(files):
        hu = read_slice_hu(path)
        if hu.shape[0] != hu.shape[1]:
            raise ValueError(f"slice {str(path)!r} is not square: {hu.shape}")
        if resolution and hu.shape[0] != resolution:
            hu = F.interpolate(torch.from_numpy(hu)[None, None], size=(resolution,) * 2, mode="area")[
                0, 0
            ].numpy()
        mu = np.clip(hu_to_mu(hu, MU_WATER), 0.0, None) * reconstruction_circle(hu.shape[0])
        fbp, low = simulate_pair(mu, geometry, photons, [seed, index], electronic_noise_std)
        full = fbp if reference == "fbp" else mu
        _save(out / name / "full", path.stem, mu_to_hu(full))
        for level, image in zip(photons, low):
            _save(out / name / format_photons(level), path.stem, mu_to_hu(image))
    return len(files)


def export_phantoms(config: Path, out: Path) -> int:
    """Export the config's CTPhantoms test pairs (cached simulation) in HU."""
    from diffusion_lab.methods.loading import build_from_config

    _, datamodule = build_from_config(config)
    arrays = datamodule.arrays("test", with_low_dose=True)
    for index, full in enumerate(arrays["full_dose"].double().numpy()):
        _save(out / "phantoms" / "full", f"slice_{index:04d}", mu_to_hu(full, datamodule.window.mu_water))
        for name, low in zip(datamodule.dose_names, arrays["low_dose"][:, index].double().numpy()):
            _save(out / "phantoms" / name, f"slice_{index:04d}", mu_to_hu(low, datamodule.window.mu_water))
    return len(arrays["full_dose"])


def _save(folder: Path, stem: str, hu: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}.npy", hu.astype(np.float32))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phantoms", action="store_true", help="export the phantom config's test pairs")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ldct" / "phantom_prior.yaml")
    parser.add_argument("--full-dose-dir", type=Path, action="append", default=[])
    parser.add_argument("--photons", type=float, nargs="+", default=[1e4, 5e4])
    parser.add_argument("--electronic-noise-std", type=float, default=0.0)
    parser.add_argument("--field-of-view-mm", type=float, default=350.0)
    parser.add_argument("--num-angles", type=int, default=None, help="default: 2 x resolution")
    parser.add_argument("--resolution", type=int, default=None, help="area-resize slices to this size first")
    parser.add_argument("--reference", choices=("fbp", "input"), default="fbp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.phantoms and not args.full_dose_dir:
        parser.error("give --phantoms and/or at least one --full-dose-dir")
    if args.phantoms:
        print(f"phantoms: {export_phantoms(args.config, args.out)} slices -> {args.out / 'phantoms'}")
    for folder in args.full_dose_dir:
        size = args.resolution or read_slice_hu(list_slices(folder)[0]).shape[0]
        geometry = CTGeometry(args.field_of_view_mm, args.num_angles or 2 * size)
        count = simulate_folder(
            folder, args.out, args.photons, geometry, args.resolution, args.electronic_noise_std, args.reference,
            args.seed,
        )  # fmt: skip
        print(f"{folder}: {count} slices simulated at I0 = {args.photons}")


if __name__ == "__main__":
    main()
