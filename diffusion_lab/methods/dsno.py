"""DSNO: "Fast Sampling of Diffusion Models via Operator Learning" (Zheng et al., ICML 2023).

A neural operator maps the initial noise ``x_T`` to the teacher's whole probability-flow ODE trajectory at M chosen
levels in one network evaluation (``nets.temporal.TrajectoryOperator``: the teacher's backbone run on the M frames as
one batch, with Fourier temporal convolutions after its blocks); the last frame (level 0) is the sample.

* **Data**: stored teacher trajectories (``data.trajectories``), made by ``tools/make_trajectories.py`` with the
  teacher and the ODE sampler named in this module's ``sampler`` and ``record`` (the grid indices whose states are
  stored); :func:`teacher_trajectories` is the recording function.
* **Initialisation**: the operator's backbone is a copy of the teacher's (EMA) denoiser with the teacher's weights,
  plus a zero-initialised per-frame time embedding; with the temporal layers at zero it is the teacher's 1-step DDIM.
* **Loss** (Zheng et al. 2023, eq. 10 with the per-time weights of the DSNO code): on VP-scaled states
  ``alpha_m x`` (``alpha = 1/sqrt(1 + sigma^2)``), ``L = mean_m lambda_m d(alpha_m x_hat_m, alpha_m x_m)`` with
  ``lambda_m = clamp(exp(logSNR_m / 2), 1, max_weight) = clamp(1/sigma_m, 1, 1e4)`` and ``d`` the per-sample mean
  L1 (ImageNet setting) or squared L2 distance (the CIFAR-10 setting uses LPIPS, not available offline here).
* **Sampling**: ``generate``/``predict`` run the EMA operator once on ``sigma_start * z``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from diffusion_lab.data.trajectories import write_trajectories
from diffusion_lab.methods.data_shape import DataShapeMixin
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.distillation_student import (
    add_guidance_embedding,
    load_teacher,
    load_teacher_for_fit,
    teacher_denoiser,
)
from diffusion_lab.methods.ema import EMA
from diffusion_lab.methods.lr_schedules import optimizer_with_step_schedule
from diffusion_lab.methods.sampling import GuidedSamplerConfig, generate
from diffusion_lab.nets.temporal import FRAME_CONDITION, TemporalBlock, TrajectoryOperator

Distance = Literal["l1", "l2"]


def record_levels(
    sampler: GuidedSamplerConfig, record: list[int] | None
) -> tuple[float, list[float], list[int]]:
    """(sigma_start, recorded levels, grid indices) of ``record`` on the sampler's grid ``sigmas[0..steps]``.

    ``record`` lists increasing indices in ``[1, steps]`` ending with ``steps`` (the sample); None: every step."""
    grid = sampler.sigmas()
    steps = len(grid) - 1
    record = list(range(1, steps + 1)) if record is None else [int(i) for i in record]
    if not record or record[-1] != steps or record[0] < 1 or any(b <= a for a, b in zip(record, record[1:])):
        raise ValueError(
            f"record must be increasing grid indices in [1, {steps}] ending with {steps} (the sample), got {record}"
        )
    return float(grid[0]), [float(grid[i]) for i in record], record


@torch.no_grad()
def teacher_trajectories(
    denoiser: nn.Module,
    unit_noise: Tensor,
    sampler: GuidedSamplerConfig,
    record: list[int],
    *,
    labels: Tensor | None = None,
    null_label: int | None = None,
) -> Tensor:
    """States of the teacher's sampler run from ``sigmas[0] * unit_noise`` at grid indices ``record``, (B, M, ...).

    The sampler's ``callback`` sees the state at ``sigmas[i]`` before step ``i``; the sample (index ``steps``) is
    its output. Classifier-free guidance (``sampler.guidance_w``) applies as in every ``generate`` call."""
    steps = len(sampler.sigmas()) - 1
    seen: dict[int, Tensor] = {}

    def keep(info: dict[str, Any]) -> None:
        if info["i"] in record:
            seen[info["i"]] = info["x"].detach().clone()

    seen[steps] = generate(
        denoiser,
        tuple(unit_noise.shape),
        sampler,
        labels=labels,
        null_label=null_label,
        device=unit_noise.device,
        callback=keep,
        unit_noise=unit_noise,
    )
    return torch.stack([seen[i] for i in record], dim=1)


def trajectory_loss(
    prediction: Tensor, target: Tensor, sigmas: Tensor, distance: Distance = "l1", max_weight: float = 1e4
) -> Tensor:
    """DSNO loss (module docstring): (B, M, ...) predicted and teacher states at ``sigmas`` (M,) -> scalar."""
    if prediction.shape != target.shape or prediction.shape[1] != sigmas.numel():
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be "
            f"(B, M={sigmas.numel()}, ...)"
        )
    shape = (1, -1) + (1,) * (prediction.ndim - 2)
    sigmas = sigmas.to(prediction.device, torch.float32)
    alpha = torch.rsqrt(1 + sigmas**2).reshape(shape)
    weight = (1 / sigmas).clamp(1.0, max_weight)  # exp(logSNR / 2) = 1 / sigma; 1/0 = inf -> max_weight
    error = alpha * (prediction.float() - target.float())
    if distance == "l1":
        per_frame = error.abs().flatten(2).mean(-1)
    elif distance == "l2":
        per_frame = error.square().flatten(2).mean(-1)
    else:
        raise ValueError(f"unknown distance {distance!r}; expected 'l1' or 'l2'")
    return (per_frame * weight).mean()


class DSNO(DataShapeMixin, L.LightningModule):
    """Diffusion sampling with a neural operator (module docstring).

    Args:
        teacher_config: YAML of the trained teacher ``DiffusionModule`` (architecture, classes, data shape).
        teacher_checkpoint: its checkpoint; loaded when a fresh fit starts.
        teacher: instead of the two above, a teacher denoiser with a ``.network`` (Python use and tests).
        sampler: the teacher's ODE sampler that made the training trajectories (method, steps, grid, guidance_w).
        record: grid indices of the stored states (the operator's output frames; last = ``steps``).
        modes: Fourier modes kept along time (the paper: 2).
        init_scale: initial scale of the spectral weights (None: FNO default ``1/(C_in C_out)``; 0: zeros).
        distance, max_weight: the loss (``trajectory_loss``).
        num_classes: classes of a conditional teacher (default: the teacher's); 0 for unconditional.
        data_shape: shape of one sample (default: the teacher config's data).
        ema_decay: EMA of the operator used for sampling.
        optimizer, lr_scheduler: injected by LightningCLI (default Adam, lr 2e-4 as in the paper).
        predict_num_samples, predict_batch_size, predict_seed: what ``predict`` draws (as ``DiffusionModule``).
    """

    def __init__(
        self,
        teacher_config: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher: nn.Module | None = None,
        sampler: GuidedSamplerConfig | None = None,
        record: list[int] | None = None,
        modes: int = 2,
        init_scale: float | None = None,
        distance: Distance = "l1",
        max_weight: float = 1e4,
        num_classes: int | None = None,
        data_shape: list[int] | None = None,
        ema_decay: float = 0.999,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        predict_num_samples: int = 100,
        predict_batch_size: int = 100,
        predict_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "sampler", "optimizer", "lr_scheduler"])
        if (teacher is None) == (teacher_config is None):
            raise ValueError(
                "give exactly one of teacher_config (a DiffusionModule YAML) and teacher (a denoiser)"
            )
        if distance not in ("l1", "l2") or max_weight < 1:
            raise ValueError(
                f"need distance 'l1' or 'l2' and max_weight >= 1, got {distance!r}, {max_weight}"
            )
        null_label = num_classes
        if teacher_config is not None:
            module = load_teacher(teacher_config)  # the architecture; weights at fit start
            teacher = teacher_denoiser(module)
            num_classes = getattr(module, "num_classes", 0) if num_classes is None else num_classes
            null_label = getattr(module, "null_label", num_classes)
            if data_shape is None and getattr(module, "_data_shape", None) is not None:
                data_shape = list(module.data_shape)
        self.num_classes = int(num_classes or 0)
        self.null_label = self.num_classes if null_label is None else int(null_label)
        self._data_shape = tuple(data_shape) if data_shape is not None else None
        self._teacher = (
            teacher.eval().requires_grad_(False),
        )  # a tuple: not a submodule, not in checkpoints
        self.sampler = sampler if sampler is not None else GuidedSamplerConfig(method="dpmpp_2m", steps=32)
        sigma_start, sigmas, self.record = record_levels(self.sampler, record)
        self.register_buffer("sigma_start", torch.tensor(sigma_start), persistent=False)
        self.register_buffer("output_sigmas", torch.tensor(sigmas), persistent=False)
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        add_guidance_embedding(student.network, FRAME_CONDITION)
        self.operator = TrajectoryOperator(student, modes=modes, init_scale=init_scale)
        self.ema = EMA(self.operator, decay=ema_decay)
        self.distance, self.max_weight = distance, max_weight
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.predict_num_samples, self.predict_batch_size = predict_num_samples, predict_batch_size
        self.predict_seed = predict_seed
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    # ------------------------------------------------------------------ initialisation and data
    def init_from_teacher(self) -> None:
        """Copy the teacher's weights into the operator's backbone; only the temporal blocks and the frame-time
        embedding (absent from the teacher) keep their initialisation."""
        missing, unexpected = self.operator.denoiser.load_state_dict(self.teacher.state_dict(), strict=False)
        temporal = {
            f"{n}." for n, m in self.operator.denoiser.named_modules() if isinstance(m, TemporalBlock)
        }
        extra = [
            k
            for k in missing
            if f"scalar_projections.{FRAME_CONDITION}" not in k and not k.startswith(tuple(temporal))
        ]
        if extra or unexpected:
            raise ValueError(
                f"operator and teacher backbones differ: missing {extra[:5]}, unexpected {unexpected[:5]}"
            )
        self.ema.averaged.load_state_dict(self.operator.state_dict())
        self.initialized.fill_(True)

    def prepare_data(self) -> None:
        """fast_dev_run without a complete trajectory set (CI smoke test of every config): make a tiny set."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.trainer.fast_dev_run or datamodule is None or datamodule.is_complete():
            return
        directory = Path(self.trainer.default_root_dir) / "dsno_smoke_trajectories"
        rank_zero_warn(
            f"fast_dev_run: no trajectories at '{datamodule.path}'; smoke-testing with {directory}"
        )
        count = (
            math.ceil(datamodule.batch_size / (1 - datamodule.val_fraction)) + 1
        )  # one batch + a little val
        self.make_trajectories(directory, count, progress=False)
        datamodule.path = str(directory)

    def make_trajectories(self, directory: str | Path, num_trajectories: int, **kwargs: Any) -> Path:
        """Write ``num_trajectories`` teacher trajectories of this module's sampler and record (the tool's job)."""
        cond = self.num_classes > 0

        device = next(self.teacher.parameters()).device

        def sample_fn(noise: Tensor, labels: Tensor) -> Tensor:
            labels = labels.to(device) if cond else None
            return teacher_trajectories(
                self.teacher,
                noise.to(device),
                self.sampler,
                self.record,
                labels=labels,
                null_label=self.null_label,
            )

        return write_trajectories(
            directory,
            sample_fn,
            num_trajectories=num_trajectories,
            data_shape=self.data_shape,
            sigma_start=float(self.sigma_start),
            sigmas=self.output_sigmas.tolist(),
            num_classes=self.num_classes,
            source={"sampler": repr(self.sampler), "record": self.record, **kwargs.pop("source", {})},
            **kwargs,
        )

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for name, mine in (
            ("sigma_start", [float(self.sigma_start)]),
            ("sigmas", self.output_sigmas.tolist()),
        ):
            theirs = getattr(datamodule, name, None)
            theirs = [theirs] if isinstance(theirs, float) else theirs
            if theirs is not None and not torch.allclose(torch.tensor(theirs), torch.tensor(mine), rtol=1e-5):
                raise ValueError(
                    f"the trajectories have {name}={theirs} but this model's sampler and record give {mine}; "
                    "make the trajectories with the same sampler settings (tools/make_trajectories.py --config ...)"
                )
        if bool(self.initialized) or self.trainer.ckpt_path is not None:
            return
        load_teacher_for_fit(
            self.teacher,
            self.hparams.teacher_checkpoint,
            self.hparams.teacher_config,
            bool(self.trainer.fast_dev_run),
        )
        self.init_from_teacher()

    # ------------------------------------------------------------------ training
    def _cond(self, labels: Tensor | None) -> dict[str, Tensor]:
        return {"labels": labels} if self.num_classes and labels is not None else {}

    def trajectory(self, unit_noise: Tensor, labels: Tensor | None = None, *, ema: bool = True) -> Tensor:
        """The operator's whole trajectory (B, M, ...) from unit noise: one network evaluation."""
        operator = self.ema.averaged if ema else self.operator
        x_start = unit_noise * self.sigma_start.to(unit_noise.dtype)
        return operator(x_start, self.sigma_start, self.output_sigmas, **self._cond(labels))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        noise, states, labels = batch
        prediction = self.trajectory(noise, labels, ema=False)
        loss = trajectory_loss(prediction, states, self.output_sigmas, self.distance, self.max_weight)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=noise.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.operator)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        noise, states, labels = batch
        prediction = self.trajectory(noise, labels)
        loss = trajectory_loss(prediction, states, self.output_sigmas, self.distance, self.max_weight)
        sample_rmse = (prediction[:, -1] - states[:, -1]).flatten(1).square().mean(1).sqrt().mean()
        self.log_dict(
            {"val/loss": loss, "val/sample_rmse": sample_rmse}, sync_dist=True, batch_size=noise.shape[0]
        )
        return loss

    def train(self, mode: bool = True) -> DSNO:
        super().train(mode)
        self.ema.averaged.eval()
        return self

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=2e-4))
        return optimizer_with_step_schedule(self.operator.parameters(), factory, self.lr_scheduler_factory)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        unit_noise: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        """Samples (num_samples, *data_shape) with one evaluation of the EMA operator."""
        if unit_noise is None:
            unit_noise = torch.randn((num_samples, *self.data_shape), generator=generator, device=self.device)
        if labels is not None and self.num_classes == 0:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return self.trajectory(
            unit_noise.to(self.device), None if labels is None else labels.to(self.device)
        )[:, -1]

    predict_dataloader = DiffusionModule.predict_dataloader
    predict_step = DiffusionModule.predict_step


__all__ = ["DSNO", "record_levels", "teacher_trajectories", "trajectory_loss"]
