"""``diffusion-lab``: the LightningCLI entry point (fit / validate / test / predict) for every method.

Subclass mode for model and data: ``--model.class_path``, ``--data.class_path`` and every nested ``class_path``
(``--model.network.class_path``, ``--model.loss.class_path``) swap parts from YAML or the command line.

Data shape is written once, in the DataModule: before instantiation the CLI reads ``num_classes``,
``num_channels`` and ``resolution`` from the configured DataModule and sets them on the model and on its network
wherever their constructors take an argument of that name (``num_classes -> num_classes``, ``num_channels ->
in_channels`` (or ``dim`` for vector nets), ``resolution -> resolution``). This is
``link_arguments(apply_on="instantiate")`` generalised to any model/network pair: a static link would fail for
networks that lack one of the targets (an MLP has no ``resolution``). A value set by hand that differs from both
the data and the constructor default is an error, not a silent override.

Every run gets the reliability defaults (exact-resume RNG state, NaN/Inf guard, preemption checkpoint, atomic
checkpoint writes; ``diffusion_lab.reliability.defaults``); ``--reliability false`` leaves the Trainer as configured.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffusion_lab.reliability.defaults import with_reliability

# (attribute of the DataModule, constructor argument that receives it)
DATA_LINKS: tuple[tuple[str, str], ...] = (
    ("num_classes", "num_classes"),
    ("num_channels", "in_channels"),
    ("num_channels", "dim"),
    ("resolution", "resolution"),
)


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import class_path {class_path!r}: {err}") from err


def instantiate(spec: Any) -> Any:
    """Instantiate a ``{class_path, init_args}`` spec (recursively); other values are returned as they are."""
    if isinstance(spec, Namespace):
        spec = spec.as_dict()
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return import_class(spec["class_path"])(**args)
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def _accepts(class_path: str, name: str) -> bool:
    return name in inspect.signature(import_class(class_path).__init__).parameters


def link_data_to_model(config: Namespace) -> None:
    """Copy the DataModule's shape attributes into the model (and its network) config, see module docstring."""
    data_spec, model_spec = config.get("data"), config.get("model")
    if not (isinstance(data_spec, Namespace) and data_spec.get("class_path")):
        return
    if not (isinstance(model_spec, Namespace) and model_spec.get("class_path")):
        return
    datamodule = instantiate(data_spec)
    targets = [("model", model_spec)]
    network = model_spec.get("init_args", Namespace()).get("network")
    if isinstance(network, Namespace) and network.get("class_path"):
        targets.append(("model.network", network))
    for source, arg in DATA_LINKS:
        value = getattr(datamodule, source, None)
        if value is None:
            continue
        for where, spec in targets:
            if not _accepts(spec.class_path, arg):
                continue
            init_args = spec.get("init_args")
            if init_args is None:
                spec.init_args = init_args = Namespace()
            current = init_args.get(arg)
            default = inspect.signature(import_class(spec.class_path).__init__).parameters[arg].default
            if current is not None and current != value and current != default:
                raise ValueError(
                    f"{where}.init_args.{arg}={current!r} contradicts the data ({data_spec.class_path}.{source}"
                    f"={value!r}); remove it from the config: it is taken from the data"
                )
            init_args[arg] = value


class DiffusionLabCLI(LightningCLI):
    """LightningCLI that links data shape to the model generically and adds the reliability defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--reliability",
            type=bool,
            default=True,
            help="add ExactResume, NaNGuard, Preemption and AtomicCheckpointIO to the Trainer (docs/reliability.md)",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self._get(self.config, "reliability", default=True):
            kwargs = {
                **kwargs,
                **with_reliability({**self._get(self.config_init, "trainer", default={}), **kwargs}),
            }
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """The config is authoritative; ``--ckpt_path`` supplies tensors only.

        Lightning would re-apply the checkpoint's saved hyperparameters over the parsed config, silently undoing
        command-line choices such as ``--model.predict_num_samples`` at predict time. Our checkpoints are loaded
        with the run's full config (network and loss are never hyperparameters), so that step is skipped.
        """

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        link_data_to_model(config)


def main(args: list[str] | None = None) -> DiffusionLabCLI:
    """Console script ``diffusion-lab``; ``args`` replaces ``sys.argv[1:]`` (used by tests)."""
    return DiffusionLabCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def run() -> None:
    """The ``diffusion-lab`` console script: exit status 0 on success (``main`` returns the CLI object, which
    ``sys.exit`` would print and turn into status 1)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
