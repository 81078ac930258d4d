"""Train the small feature/classifier network used by FID, IS and class accuracy on small data sets.

Reproduces the shipped digits net bit for bit on the same torch build (defaults, one thread; about 30 s on one
CPU core):

    python tools/train_feature_net.py --out diffusion_lab/assets/digits_feature_net.safetensors

Any DataModule of the zoo that yields ``(x in [-1, 1], labels)`` works:

    python tools/train_feature_net.py --datamodule diffusion_lab.data.cifar10.CIFAR10 \
        --datamodule-args '{"batch_size": 256}' --width 64 --feature-dim 256 --epochs 40 --out cifar_net.safetensors

Training reads the DataModule's ``train_set`` through this tool's own loader, shuffled by a generator seeded with
``--seed`` (the DataModule's training loader is built for the Lightning loop: its order is set by the Trainer's
epoch and the global seed). The held-out accuracy is measured on the DataModule's validation split, which
plays no part in training (fixed epoch count, no early stopping). It is written into the weights file's metadata
and into a JSON file next to it together with the command that produced it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusion_lab.metrics.feature_net import (
    FeatureNet,
    calibrate_features,
    evaluate_accuracy,
    save_feature_net,
    train_feature_net,
)
from diffusion_lab.metrics.reference_stats import reference_loader


def build_datamodule(class_path: str, init_args: dict):
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"--datamodule must be a full class path like diffusion_lab.data.digits.Digits, got {class_path!r}"
        )
    datamodule = getattr(importlib.import_module(module_name), class_name)(**init_args)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datamodule", default="diffusion_lab.data.digits.Digits")
    parser.add_argument(
        "--datamodule-args",
        default='{"val_fraction": 0.1, "seed": 0, "batch_size": 64}',
        help="JSON dict of the DataModule's init arguments",
    )
    parser.add_argument(
        "--dataset-name", default=None, help="name stored in the metadata (default: class name)"
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-shift", type=int, default=1, help="random translation augmentation (pixels)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: the DataModule's batch_size (64 for the shipped net)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (bit-exact results need the same)"
    )
    parser.add_argument("--out", type=Path, default=Path("digits_feature_net.safetensors"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    datamodule = build_datamodule(args.datamodule, json.loads(args.datamodule_args))
    batch_size = args.batch_size or datamodule.batch_size
    train_loader = DataLoader(
        datamodule.train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    train_eval_loader = reference_loader(datamodule, "train")  # unshuffled
    val_loader = reference_loader(datamodule, "val")
    model = FeatureNet(
        in_channels=datamodule.num_channels,
        resolution=datamodule.resolution,
        num_classes=datamodule.num_classes,
        width=args.width,
        feature_dim=args.feature_dim,
    )
    start = time.perf_counter()
    train_feature_net(
        model,
        train_loader,
        epochs=args.epochs,
        lr=args.lr,
        max_shift=args.max_shift,
        seed=args.seed,
    )
    calibrate_features(model, train_eval_loader)
    seconds = time.perf_counter() - start
    info = {
        "dataset": args.dataset_name or type(datamodule).__name__.lower(),
        "datamodule": args.datamodule,
        "datamodule_args": json.loads(args.datamodule_args),
        "test_split": "the DataModule's validation split (held out from training)",
        "test_accuracy": evaluate_accuracy(model, val_loader),
        "num_test_images": len(val_loader.dataset),
        "train_accuracy": evaluate_accuracy(model, train_eval_loader),
        "batch_size": batch_size,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "command": "python tools/train_feature_net.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_net(model, args.out, info)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(json.dumps(info, indent=2, sort_keys=True))
    return info


if __name__ == "__main__":
    main()
