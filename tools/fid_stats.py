"""Compute and cache a data set's reference feature statistics for FID / KID / precision-recall.

    python tools/fid_stats.py --datamodule diffusion_lab.data.digits.Digits --split train
    python tools/fid_stats.py --datamodule diffusion_lab.data.cifar10.CIFAR10 --split train \
        --feature-extractor inception --weights ~/weights/pt_inception-2015-12-05-6726825d.pth

The file lands in ``--cache-dir`` (default ``data_cache/fid_stats``) under a name built from data set, split,
resolution and feature extractor (including a hash of its weights); ``SampleQuality`` finds it there with the
same settings, so validation never recomputes it. An existing file is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusion_lab.cli import import_class
from diffusion_lab.metrics.features import build_feature_extractor
from diffusion_lab.metrics.reference_stats import (
    DEFAULT_CACHE_DIR,
    compute_reference_stats,
    datamodule_reference_path,
    reference_loader,
)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datamodule", default="diffusion_lab.data.digits.Digits", help="DataModule class path"
    )
    parser.add_argument(
        "--datamodule-args", default="{}", help="JSON dict of the DataModule's init arguments"
    )
    parser.add_argument("--split", default="train", help="train | val | test")
    parser.add_argument(
        "--feature-extractor", default="feature_net", choices=["inception", "feature_net", "timm"]
    )
    parser.add_argument(
        "--weights", default=None, help="feature extractor weights (default: shipped digits net)"
    )
    parser.add_argument("--timm-model", default=None)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--out", default=None, help="explicit output file (default: the cache-key name)")
    parser.add_argument("--max-features", type=int, default=10_000, help="feature vectors kept for KID / P&R")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force", action="store_true", help="recompute even if the file exists")
    args = parser.parse_args(argv)

    datamodule = import_class(args.datamodule)(**json.loads(args.datamodule_args))
    datamodule.prepare_data()
    datamodule.setup("fit")
    extractor = build_feature_extractor(args.feature_extractor, args.weights, args.timm_model).to(args.device)
    path = (
        Path(args.out)
        if args.out
        else datamodule_reference_path(datamodule, args.split, extractor.key, args.cache_dir)
    )
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to recompute)")
        return path
    loader = reference_loader(datamodule, args.split, args.batch_size)
    stats = compute_reference_stats(extractor, loader, max_features=args.max_features, device=args.device)
    stats.save(path)
    print(f"wrote {path}: {stats.num_samples} images, {stats.mean.numel()} features, key {stats.key}")
    return path


if __name__ == "__main__":
    main()
