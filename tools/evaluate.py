"""Evaluate a trained model at a grid of samplers x NFEs: markdown table, JSON and a PNG plot of FID vs NFE.

    python tools/evaluate.py --config configs/quickstart.yaml \
        --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt \
        --samplers '[{"method": "euler"}, {"method": "heun"}]' --steps 4 8 16 32 --num-samples 1000 --out eval/

Other arguments starting with ``--model.`` or ``--data.`` override the YAML as on the ``diffusion-lab`` command
line (e.g. ``--data.init_args.root=/data/cifar10``).

The model and DataModule are built from the same YAML as training (``diffusion-lab fit --config ...``); the
checkpoint's ``state_dict`` is loaded with the project's safe loader (tensors only). Samples are seeded as in
the ``SampleQuality`` callback, so the numbers equal what that callback logs for the same settings; the real
statistics come from (or go to) the ``tools/fid_stats.py`` cache. ``diffusion-lab test`` with a
``SampleQuality`` callback measures one sampler the same way.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusion_lab.metrics.factory import QualityConfig
from diffusion_lab.metrics.feature_net import load_feature_net
from diffusion_lab.metrics.features import FeatureNetExtractor, build_feature_extractor
from diffusion_lab.metrics.quality_vs_nfe import sweep_samplers, write_sweep_table
from diffusion_lab.metrics.reference_stats import (
    DEFAULT_CACHE_DIR,
    datamodule_reference_path,
    load_or_compute_reference_stats,
    reference_loader,
)
from diffusion_lab.pretrained.safe_load import load_state_dict_file

TRAINER_OVERRIDES = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--reliability=false",
]


def build_from_config(
    config: str, checkpoint: str | None, device: str, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, object]:
    """(model, datamodule) from a training YAML (plus CLI ``overrides`` such as
    ``--data.init_args.root=/data/cifar10``), with the checkpoint's weights loaded (strictly)."""
    from diffusion_lab.cli import DiffusionLabCLI

    with warnings.catch_warnings():  # "args given while sys.argv also has arguments": ours are this tool's
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = DiffusionLabCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            # the Trainer is built but not used: keep it from claiming GPUs / processes or opening loggers
            args=["--config", config, *overrides, *TRAINER_OVERRIDES],
            auto_configure_optimizers=False,
            save_config_callback=None,
        )
    model, datamodule = cli.model, cli.datamodule
    if checkpoint is not None:
        state_dict = load_state_dict_file(
            checkpoint, what="model checkpoint", where_to_get="train it", key="state_dict"
        )
        model.load_state_dict(state_dict)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if hasattr(datamodule, "data_shape") and hasattr(type(model), "data_shape"):
        model.data_shape = datamodule.data_shape
    return model.to(device).eval(), datamodule


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the training YAML (model + data)")
    parser.add_argument(
        "--checkpoint", default=None, help="Lightning checkpoint whose state_dict is evaluated"
    )
    parser.add_argument(
        "--samplers", default='[{"method": "heun"}]', help="JSON list of sampler override dicts"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--feature-extractor", default="feature_net", choices=["inception", "feature_net", "timm"]
    )
    parser.add_argument(
        "--weights", default=None, help="feature extractor weights (default: shipped digits net)"
    )
    parser.add_argument("--timm-model", default=None)
    parser.add_argument(
        "--timm-num-classes", type=int, default=0, help="classifier outputs of the timm model"
    )
    parser.add_argument("--classifier", default=None, help="FeatureNet file for class accuracy")
    parser.add_argument("--reference-split", default="train")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--denoiser-attribute", default=None, help="sub-module whose calls count as NFE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="eval", help="output folder")
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith(("--model.", "--data.", "--seed_everything"))]
    if bad:
        parser.error(f"unrecognized arguments {bad}; only --model.* / --data.* overrides go to the config")

    model, datamodule = build_from_config(args.config, args.checkpoint, args.device, overrides)
    extractor = build_feature_extractor(
        args.feature_extractor, args.weights, args.timm_model, args.timm_num_classes
    ).to(args.device)
    classifier = load_feature_net(args.classifier).to(args.device) if args.classifier else None
    if classifier is None and isinstance(extractor, FeatureNetExtractor):
        classifier = extractor.network
    path = datamodule_reference_path(datamodule, args.reference_split, extractor.key, args.cache_dir)
    reference = load_or_compute_reference_stats(
        path, extractor, reference_loader(datamodule, args.reference_split), device=args.device
    )
    rows = sweep_samplers(
        model,
        extractor,
        reference,
        json.loads(args.samplers),
        args.steps,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        classifier=classifier,
        quality=QualityConfig(seed=args.seed),
        denoiser_attribute=args.denoiser_attribute,
        device=args.device,
    )
    md_path = write_sweep_table(rows, args.out, title=f"Sample quality vs NFE ({Path(args.config).stem})")
    print(md_path.read_text())
    return md_path


if __name__ == "__main__":
    main()
