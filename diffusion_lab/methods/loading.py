"""Load a trained module for inference: build it from its YAML config, then load weights safely.

One explicit helper instead of relying on ``--ckpt_path`` to restore hyperparameters: the config says what the
model is, the checkpoint only supplies tensors (read through ``pretrained.safe_load``, never an unrestricted
unpickle), so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from diffusion_lab.pretrained.safe_load import load_state_dict_file

CPU_TRAINER = (
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.logger=false",
)


def build_from_config(
    configs: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()
) -> tuple[L.LightningModule, L.LightningDataModule | None]:
    """Instantiate the model and DataModule of a config (several configs are merged in order) without running."""
    from diffusion_lab.cli import DiffusionLabCLI

    paths = [configs] if isinstance(configs, (str, Path)) else list(configs)
    args = [a for p in paths for a in ("--config", str(p))] + list(CPU_TRAINER) + list(overrides)
    cli = DiffusionLabCLI(
        args=args,
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule


def load_module(
    configs: str | Path | Sequence[str | Path],
    checkpoint: str | Path,
    overrides: Sequence[str] = (),
    strict: bool = True,
) -> L.LightningModule:
    """Build the config's model, load ``checkpoint`` (Lightning .ckpt or safetensors) into it; eval mode.

    The DataModule's ``data_shape`` is attached to the model (``model.data_shape``) when the model has one.
    """
    model, datamodule = build_from_config(configs, overrides)
    state = load_state_dict_file(
        checkpoint, what="model checkpoint", where_to_get="train one with `diffusion-lab fit --config ...`"
    )
    model.load_state_dict(state, strict=strict)
    if datamodule is not None and hasattr(datamodule, "data_shape") and hasattr(type(model), "data_shape"):
        model.data_shape = datamodule.data_shape
    return model.eval()
