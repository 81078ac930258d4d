"""Teacher loading, student construction and sampling on a distillation grid, for guided distillation.

* :func:`load_teacher` builds a trained class-conditional ``DiffusionModule`` from its YAML (the teacher's
  architecture is known without its weights, so a distillation config always instantiates) and, when asked, loads
  its checkpoint; the teacher denoiser is the module's EMA denoiser.
* :func:`add_guidance_embedding` gives a backbone built on ``nets.embeddings.ConditionEmbedding`` (``UNet``, ``MLP``)
  the guidance-strength input of Meng et al. (2023, sec. 4.1): a sinusoidal embedding of ``1000 w`` mapped by a
  bias-free linear layer and added to the time embedding. The layer starts at zero, so the student initialised
  from the teacher starts as the teacher's conditional model ``x_c`` for every ``w``.
* :func:`sample_on_grid` runs a sampler of the suite on the N-step distillation grid (``sigma_ve(i/N)``, then 0).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.distillation import distillation_sigmas
from diffusion_lab.diffusion.samplers import get_sampler, sample
from diffusion_lab.diffusion.samplers._base import check_options
from diffusion_lab.diffusion.samplers.registry import _CONTRACT_ARGS
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.nets.embeddings import ConditionEmbedding

REPO = Path(__file__).resolve().parents[2]
GUIDANCE_KEY = "guidance_w"


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else relative to the repository root (configs name repo-relative files)."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute():
        return path
    candidate = REPO / path
    return candidate if candidate.exists() else path


# ---------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------
def load_teacher(config: str | Path, checkpoint: str | Path | None = None) -> nn.Module:
    """The teacher ``DiffusionModule`` of ``config`` (a YAML path), with ``checkpoint`` loaded if given; eval mode.

    Raises FileNotFoundError naming the config, or ``MissingWeightsError`` naming the checkpoint.
    """
    from diffusion_lab.methods.loading import build_from_config

    config_path = resolve_path(config)
    if not config_path.is_file():
        raise FileNotFoundError(f"teacher config '{config}' does not exist (looked in the cwd and in {REPO})")
    module, datamodule = build_from_config(config_path)
    if datamodule is not None and hasattr(datamodule, "data_shape") and hasattr(type(module), "data_shape"):
        module.data_shape = datamodule.data_shape
    if checkpoint is not None:
        load_teacher_weights(module, checkpoint, config)
    return module.eval().requires_grad_(False)


def load_teacher_weights(
    module: nn.Module, checkpoint: str | Path, config: str | Path = "its config"
) -> None:
    """Load a teacher checkpoint (Lightning .ckpt or safetensors) into ``module`` strictly, read safely."""
    from diffusion_lab.pretrained.safe_load import load_state_dict_file

    state = load_state_dict_file(
        resolve_path(checkpoint),
        what="teacher checkpoint",
        where_to_get=f"train the teacher first: diffusion-lab fit --config {config}",
    )
    module.load_state_dict(state, strict=True)


def load_teacher_denoiser_weights(
    denoiser: nn.Module, checkpoint: str | Path, config: str | Path = "its config"
) -> None:
    """Load the denoiser part of a teacher checkpoint into ``denoiser``: the EMA weights (``ema.averaged.*``) of a
    ``DiffusionModule`` checkpoint, else its ``denoiser.*`` weights, else the whole file; strict."""
    from diffusion_lab.pretrained.safe_load import load_state_dict_file

    state = load_state_dict_file(
        resolve_path(checkpoint),
        what="teacher checkpoint",
        where_to_get=f"train the teacher first: diffusion-lab fit --config {config}",
    )
    for prefix in ("ema.averaged.", "denoiser."):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if part:
            state = part
            break
    denoiser.load_state_dict(state, strict=True)


def load_teacher_for_fit(
    denoiser: nn.Module, checkpoint: str | Path | None, config: str | Path | None, fast_dev_run: bool
) -> None:
    """At the start of a fresh fit, load the teacher checkpoint's denoiser weights into ``denoiser``. Under
    ``fast_dev_run`` a missing checkpoint only warns (every config is smoke-tested in CI, where no teacher is
    trained) and the untrained teacher is used; otherwise a missing file raises (``load_teacher_denoiser_weights``).
    No checkpoint: nothing is loaded (the caller decides whether that is allowed)."""
    if checkpoint is None:
        return
    if fast_dev_run and not resolve_path(checkpoint).is_file():
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"fast_dev_run: teacher checkpoint '{checkpoint}' does not exist; smoke-testing with the untrained "
            "teacher (a real fit refuses this)"
        )
        return
    load_teacher_denoiser_weights(denoiser, checkpoint, config if config is not None else "its config")


def teacher_denoiser(teacher: nn.Module) -> nn.Module:
    """The denoiser to distil: a module's EMA denoiser, its ``denoiser``, or the module itself."""
    ema = getattr(teacher, "ema", None)
    if ema is not None and hasattr(ema, "averaged"):
        return ema.averaged
    return getattr(teacher, "denoiser", teacher)


# ---------------------------------------------------------------------------------------------------
# Student
# ---------------------------------------------------------------------------------------------------
def add_guidance_embedding(network: nn.Module, name: str = GUIDANCE_KEY) -> nn.Module:
    """Give ``network`` (in place) a zero-initialised scalar input ``name`` (module docstring); returns it.

    Raises ValueError unless the network has exactly one ``ConditionEmbedding``.
    """
    embeddings = [m for m in network.modules() if isinstance(m, ConditionEmbedding)]
    if len(embeddings) != 1:
        raise ValueError(
            f"add_guidance_embedding needs a network with exactly one ConditionEmbedding (UNet, MLP); "
            f"{type(network).__name__} has {len(embeddings)}. Build the student yourself with "
            f"scalar_conditions=['{name}'] and pass it as student="
        )
    embedding = embeddings[0]
    if name not in embedding.scalar_conditions:
        emb_dim = embedding.noise_mlp[-1].out_features
        weight = embedding.noise_mlp[0].weight
        projection = nn.Linear(embedding.scalar_embedding.dim, emb_dim, bias=False)
        nn.init.zeros_(projection.weight)
        embedding.scalar_projections[name] = projection.to(device=weight.device, dtype=weight.dtype)
        embedding.scalar_conditions.append(name)
    listed = getattr(network, "scalar_conditions", None)
    if isinstance(listed, list) and name not in listed:
        listed.append(name)
    return network


def student_from_teacher(denoiser: nn.Module, dropout: float | None = 0.0) -> nn.Module:
    """A trainable copy of a teacher ``Denoiser`` whose backbone also takes ``guidance_w`` (zero-initialised).

    ``dropout`` (if not None) replaces the rate of every ``nn.Dropout`` of the copy (Salimans & Ho distil with 0).
    """
    if not hasattr(denoiser, "network"):
        raise ValueError(
            f"cannot build a student from a {type(denoiser).__name__}: it has no .network backbone; pass student="
        )
    student = copy.deepcopy(denoiser).requires_grad_(True).train()
    add_guidance_embedding(student.network)
    if dropout is not None:
        for module in student.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(dropout)
    return student


def copy_teacher_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Initialise the student from the teacher: every teacher tensor is copied; only the student's guidance
    projection (absent from the teacher) keeps its zero initialisation."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    extra = [k for k in missing if f"scalar_projections.{GUIDANCE_KEY}" not in k]
    if extra or unexpected:
        raise ValueError(
            f"student and teacher architectures differ: missing {extra[:5]}, unexpected {unexpected[:5]}"
        )


# ---------------------------------------------------------------------------------------------------
# Sampling on the distillation grid
# ---------------------------------------------------------------------------------------------------
@dataclass
class DistilledSamplerConfig:
    """How a distilled student samples (YAML ``sampler:`` of ``GuidedDistillation``).

    Args:
        method: ``ddim`` (deterministic N-step DDIM) or ``distilled_stochastic`` (Meng et al.'s N-step stochastic
            sampler); any other sampler of the suite also runs on the grid.
        steps: number of steps N; None = the student's current step count.
        guidance_w: guidance strength ``w`` given to the student (no classifier-free guidance on top: the
            student already outputs the guided prediction).
        options: the sampler's own keywords (e.g. ``eta``).
    """

    method: str = "ddim"
    steps: int | None = None
    guidance_w: float = 2.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(get_sampler(self.method), self.options, f"sampler {self.method!r}", _CONTRACT_ARGS)
        if self.guidance_w < 0:
            raise ValueError(f"guidance_w must be >= 0, got {self.guidance_w}")

    def with_overrides(self, **overrides: Any) -> DistilledSamplerConfig:
        known = {k: v for k, v in overrides.items() if k in self.__dataclass_fields__ and v is not None}
        return replace(self, **known)


@torch.no_grad()
def sample_on_grid(
    denoiser: DenoiserFn,
    schedule: NoiseSchedule,
    steps: int,
    unit_noise: Tensor,
    *,
    method: str = "ddim",
    cond: Mapping[str, Tensor] | None = None,
    guidance: Any = None,
    generator: torch.Generator | None = None,
    options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Run ``method`` from ``sigma_max * unit_noise`` over the N-step grid ``distillation_sigmas(schedule, N)``."""
    sigmas = distillation_sigmas(schedule, steps).to(unit_noise.device)
    dtype = unit_noise.dtype if unit_noise.dtype == torch.float64 else torch.float32
    sigmas = sigmas.to(dtype)
    return sample(
        denoiser,
        unit_noise.to(dtype) * sigmas[0],
        sigmas,
        method=method,
        guidance=guidance,
        generator=generator,
        cond=dict(cond or {}),
        **dict(options or {}),
    )


__all__ = [
    "DistilledSamplerConfig",
    "GUIDANCE_KEY",
    "add_guidance_embedding",
    "copy_teacher_weights",
    "load_teacher",
    "load_teacher_denoiser_weights",
    "load_teacher_weights",
    "resolve_path",
    "sample_on_grid",
    "student_from_teacher",
    "teacher_denoiser",
]
