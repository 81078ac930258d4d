"""GuidedDistillation: both stages of "On Distillation of Guided Diffusion Models" (Meng et al., CVPR 2023) in one fit.

* **Stage 1** (``stage1_iterations`` steps): a student ``x_eta(z_t, w, c)``, initialised from the teacher with a
  zero-initialised guidance-strength embedding, regresses the classifier-free-guided teacher
  ``(1 + w) x_c - w x_u`` at ``w ~ U[w_min, w_max]``, ``t ~ U[0, 1]`` (``diffusion.distillation``, loss ``L_1``).
* **Stage 2** (one phase per entry of ``steps``): progressive distillation (Salimans & Ho 2022) of the
  w-conditioned student. In the phase with N student steps the teacher is a frozen copy of the student as it was
  when the phase began, sampled with 2N DDIM steps; the student learns ``x_tilde`` so that one of its DDIM steps
  equals two of the teacher's. Each phase starts from the previous student with a fresh optimiser state and (by
  default) a learning rate annealed linearly to 0 over the phase, as in Salimans & Ho.

The phase is a function of the global step (``phase_at``), and the phase in progress is a buffer of the module, so
a checkpoint records it (also under ``checkpoint["guided_distillation"]``) and resuming mid-phase continues the
same phase with the same frozen teacher; resuming at a boundary starts the next one. Training stops by itself
after the last phase. Optimisation is manual (per-phase optimiser reset and learning-rate ramp); gradient
clipping is ``grad_clip``, not ``trainer.gradient_clip_val``. A non-finite loss is handled as under automatic
optimisation (``reliability.nan_guard``): with a ``NaNGuard`` the update is skipped (weights, Adam state and EMA
unchanged), counted, and K skips in a row stop the run; without one it raises ``FloatingPointError``.

Sampling (``generate``, ``predict``) runs the student on its N-step grid ``sigma_ve(i/N)`` with deterministic
DDIM or the paper's stochastic sampler (``samplers/distilled.py``), passing ``guidance_w``; no classifier-free
guidance is applied on top (the student is already guided).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from diffusion_lab.diffusion.distill_editing import (
    MaskName,
    edit_sigmas,
    edit_start,
    inpaint,
    named_mask,
    sdedit,
)
from diffusion_lab.diffusion.distillation import (
    check_halving,
    distillation_sigmas,
    guided_teacher,
    progressive_target,
    sample_guidance_weights,
    student_step_levels,
    weighted_error,
)
from diffusion_lab.diffusion.losses import UniformTimeSigma, Weighting, loss_weight
from diffusion_lab.diffusion.schedules import NoiseSchedule, VPCosine
from diffusion_lab.methods.data_shape import DataShapeMixin
from diffusion_lab.methods.diffusion import DiffusionModule
from diffusion_lab.methods.distillation_student import (
    GUIDANCE_KEY,
    DistilledSamplerConfig,
    copy_teacher_weights,
    load_teacher,
    load_teacher_for_fit,
    sample_on_grid,
    student_from_teacher,
    teacher_denoiser,
)
from diffusion_lab.methods.ema import EMA
from diffusion_lab.reliability.nan_guard import nonfinite_loss, update_skipped

Condition = Literal["labels", "text_emb"]


class GuidedDistillation(DataShapeMixin, L.LightningModule):
    """Guided distillation, stage 1 then progressive halving, in one ``fit`` (module docstring).

    Args:
        teacher_config: YAML of the trained class-conditional ``DiffusionModule`` (with label dropout).
        teacher_checkpoint: its checkpoint; loaded when a fresh fit starts (not needed to resume or to predict).
        teacher: instead of the two above, a denoiser ``D(x, sigma, labels=...)`` given directly (Python, tests).
        student: the student denoiser (taking ``guidance_w=``); default: a copy of the teacher's denoiser with a
            zero-initialised guidance embedding, initialised from the teacher's weights.
        schedule: ``t -> sigma_ve(t)`` of the time grid (default the paper's ``VPCosine()``; ``KarrasTime`` for
            teachers trained on EDM's noise range).
        stage1_iterations: optimiser steps of stage 1 (0 skips it).
        steps: student step counts of the stage-2 phases, each half the previous (``[64, 32, ..., 1]``); the
            first phase's teacher is the stage-1 student at ``2 * steps[0]`` steps. Empty: stage 1 only.
        phase_iterations: optimiser steps per stage-2 phase (one number or one per phase).
        w_min, w_max: range of the guidance strength w (the paper: [0, 4] in pixel space).
        weighting: ``omega(sigma)`` of both losses (``snr_trunc`` = max(SNR, 1); ``v`` = v-MSE; see ``loss_weight``).
        sigma_data: data standard deviation of the ``edm`` weighting (use the teacher's).
        condition: conditioning keyword of the data's second field: ``labels`` or ``text_emb``.
        num_classes: classes of the data (linked from the DataModule).
        null_label: unconditional label (default: the teacher's, else ``num_classes``).
        null_text_emb: unconditional embedding (E,) for ``condition="text_emb"`` (default zeros of the batch's E).
        label_dropout: probability of training on the unconditional input (its guided target is ``x_u``).
        student_dropout: dropout rate set in the default student (None keeps the teacher's).
        optimizer: optimiser factory (default Adam, lr 1e-4).
        lr_anneal: anneal the learning rate linearly to 0 over each phase (stage 1 included).
        grad_clip: clip the gradient norm to this value (None: no clipping).
        ema_decay: EMA of the student used for sampling and as the next phase's teacher (0: none, as in S&H).
        sampler: how ``generate``/``predict`` sample (``DistilledSamplerConfig``).
        predict_num_samples, predict_batch_size, predict_seed: what ``predict`` draws (as ``DiffusionModule``).
        predict_task: ``sample`` (generate), ``edit`` (SDEdit of the predict split's images) or ``inpaint`` (fill
            the region outside ``inpaint_mask``), all with the student's sampler steps and ``guidance_w``.
        edit_strength: SDEdit strength in [0, 1]: ``ceil(strength * N)`` of the N distilled steps are run (0: the
            input unchanged; on latents its VAE reconstruction).
        edit_label: class the edit steers towards (None: each image's own label).
        inpaint_mask: the known region (``distill_editing.named_mask``: left, right, top, bottom, center, border).
    """

    def __init__(
        self,
        teacher_config: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher: nn.Module | None = None,
        student: nn.Module | None = None,
        schedule: NoiseSchedule | None = None,
        stage1_iterations: int = 1000,
        steps: list[int] | None = None,
        phase_iterations: int | list[int] = 1000,
        w_min: float = 0.0,
        w_max: float = 4.0,
        weighting: Weighting = "snr_trunc",
        sigma_data: float = 0.5,
        condition: Condition = "labels",
        num_classes: int = 0,
        null_label: int | None = None,
        null_text_emb: list[float] | None = None,
        label_dropout: float = 0.0,
        student_dropout: float | None = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_anneal: bool = True,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.0,
        sampler: DistilledSamplerConfig | None = None,
        predict_num_samples: int = 100,
        predict_batch_size: int = 100,
        predict_seed: int = 0,
        predict_task: Literal["sample", "edit", "inpaint"] = "sample",
        edit_strength: float = 0.5,
        edit_label: int | None = None,
        inpaint_mask: MaskName = "right",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "student", "schedule", "sampler", "optimizer"])
        self.automatic_optimization = False
        if (teacher is None) == (teacher_config is None):
            raise ValueError(
                "give exactly one of teacher_config (a DiffusionModule YAML) and teacher (a denoiser)"
            )
        if condition not in ("labels", "text_emb"):
            raise ValueError(f"condition must be 'labels' or 'text_emb', got {condition!r}")
        if not 0.0 <= label_dropout < 1.0 or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"need label_dropout and ema_decay in [0, 1), got {label_dropout}, {ema_decay}")
        if stage1_iterations < 0:
            raise ValueError(f"stage1_iterations must be >= 0, got {stage1_iterations}")
        steps = check_halving(steps) if steps else []
        per_phase = (
            phase_iterations if isinstance(phase_iterations, list) else [phase_iterations] * len(steps)
        )
        if len(per_phase) != len(steps) or any(int(n) < 1 for n in per_phase):
            raise ValueError(
                f"phase_iterations must be a positive number or one per phase ({len(steps)}), got {phase_iterations}"
            )
        self.phases: list[dict[str, Any]] = [
            {"name": "stage1", "iterations": stage1_iterations, "steps": None}
        ]
        self.phases += [
            {"name": f"stage2_{n}_steps", "iterations": int(k), "steps": n} for n, k in zip(steps, per_phase)
        ]
        if self.total_iterations == 0:
            raise ValueError("nothing to train: stage1_iterations is 0 and there are no stage-2 phases")

        # Teacher and student
        if teacher_config is not None:
            teacher_module = load_teacher(teacher_config)  # the architecture; weights at fit start
            teacher = teacher_denoiser(teacher_module)
            null_label = getattr(teacher_module, "null_label", None) if null_label is None else null_label
            if getattr(teacher_module, "_data_shape", None) is not None:
                self._data_shape = teacher_module.data_shape
        self.teacher = teacher.eval().requires_grad_(False)
        self.derived_student = student is None
        self.student = student_from_teacher(self.teacher, student_dropout) if student is None else student
        self.phase_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.ema = EMA(self.student, decay=ema_decay) if ema_decay > 0 else None
        self.schedule = schedule if schedule is not None else VPCosine()
        self.stage1_sigmas = UniformTimeSigma(self.schedule, t_min=0.0)
        loss_weight(weighting, torch.ones(1))  # validate the name early
        self.steps, self.weighting, self.sigma_data = steps, weighting, float(sigma_data)
        self.w_min, self.w_max = float(w_min), float(w_max)
        sample_guidance_weights(1, self.w_min, self.w_max)  # validate the range early
        self.condition, self.num_classes = condition, num_classes
        self.null_label = null_label if null_label is not None else num_classes
        self.register_buffer(
            "null_text_emb", torch.tensor(null_text_emb or [], dtype=torch.float32), persistent=False
        )
        self.label_dropout = label_dropout
        self.optimizer_factory = optimizer
        self.lr_anneal, self.grad_clip = lr_anneal, grad_clip
        self.sampler = sampler if sampler is not None else DistilledSamplerConfig()
        self.predict_num_samples, self.predict_batch_size = predict_num_samples, predict_batch_size
        self.predict_seed = predict_seed
        if predict_task not in ("sample", "edit", "inpaint"):
            raise ValueError(f"predict_task must be 'sample', 'edit' or 'inpaint', got {predict_task!r}")
        edit_start(1, edit_strength)  # validate the strength early
        named_mask(inpaint_mask, (1, 1))  # validate the mask name early
        self.predict_task, self.edit_strength, self.edit_label = predict_task, edit_strength, edit_label
        self.inpaint_mask = inpaint_mask
        # The phase in progress (-1: not started) and whether the student was initialised from the teacher;
        # buffers, so checkpoints carry them.
        self.register_buffer("phase_index", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    # ------------------------------------------------------------------ phases
    @property
    def total_iterations(self) -> int:
        return sum(p["iterations"] for p in self.phases)

    def phase_at(self, step: int) -> int:
        """Index into ``self.phases`` of the phase that global step ``step`` belongs to (0 = stage 1)."""
        end = 0
        for index, phase in enumerate(self.phases):
            end += phase["iterations"]
            if step < end:
                return index
        return len(self.phases) - 1

    def phase_start(self, index: int) -> int:
        return sum(p["iterations"] for p in self.phases[:index])

    def student_steps(self, index: int | None = None) -> int:
        """Sampling steps of the student in phase ``index`` (default: the phase in progress or last run).

        During stage 1 this is the first stage-2 teacher's step count ``2 * steps[0]`` (64 without a stage 2)."""
        index = max(int(self.phase_index), 0) if index is None else index
        if self.phases[index]["steps"] is not None:
            return self.phases[index]["steps"]
        return 2 * self.steps[0] if self.steps else 64

    def _enter_phase(self, index: int) -> None:
        """Start phase ``index`` unless it is already in progress (resume mid-phase keeps the frozen teacher)."""
        if int(self.phase_index) == index:
            return
        current = self.sampling_student
        if (
            self.phases[index]["steps"] is not None
        ):  # stage 2: freeze the current student as the 2N-step teacher
            self.phase_teacher.load_state_dict(current.state_dict())
        if self.ema is not None and current is not self.student:
            self.student.load_state_dict(current.state_dict())
        if self.ema is not None:
            self.ema.averaged.load_state_dict(self.student.state_dict())
            self.ema.num_updates.zero_()
        if int(self.phase_index) >= 0:  # a new phase starts with a fresh optimiser state
            self.optimizers().optimizer.state.clear()
        self.phase_index.fill_(index)

    @property
    def sampling_student(self) -> nn.Module:
        return self.ema.averaged if self.ema is not None else self.student

    # ------------------------------------------------------------------ conditioning
    def _null_cond(self, cond_value: Tensor) -> dict[str, Any]:
        if self.condition == "labels":
            return {"null_label": self.null_label}
        null = (
            self.null_text_emb if self.null_text_emb.numel() else cond_value.new_zeros(cond_value.shape[1:])
        )
        return {"null_cond": {"text_emb": null}}

    def _drop(self, value: Tensor) -> Tensor:
        if self.label_dropout == 0:
            return value
        drop = torch.rand(value.shape[0], device=value.device) < self.label_dropout
        if self.condition == "labels":
            return torch.where(drop, torch.full_like(value, self.null_label), value)
        null = self._null_cond(value)["null_cond"]["text_emb"].to(value)
        return torch.where(drop.reshape(-1, *([1] * (value.ndim - 1))), null.expand_as(value), value)

    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        x0, value = DiffusionModule._split_batch(batch)
        if value is None:
            raise ValueError(f"guided distillation needs conditional data: batches of (x, {self.condition})")
        return x0, value

    # ------------------------------------------------------------------ losses
    def stage1_loss(self, x0: Tensor, value: Tensor) -> Tensor:
        """L_1 = E omega(sigma) ||x_eta(x, sigma, w, c) - ((1 + w) x_c - w x_u)||^2, t ~ U[0, 1], w ~ U[w_min, w_max]
        (Meng et al. 2023, eq. 5)."""
        sigma = self.stage1_sigmas(x0.shape[0], device=x0.device)
        x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) * torch.randn_like(x0)
        w = sample_guidance_weights(x0.shape[0], self.w_min, self.w_max, device=x0.device)
        cond = {self.condition: value}
        with torch.no_grad():
            target = guided_teacher(self.teacher, w, **self._null_cond(value))(x, sigma, **cond)
        prediction = self.student(x, sigma, **cond, **{GUIDANCE_KEY: w})
        return weighted_error(prediction, target, sigma, self.weighting, self.sigma_data).mean()

    def stage2_loss(self, x0: Tensor, value: Tensor, steps: int) -> Tensor:
        """omega(sigma) ||x_eta(x, sigma, w, c) - x_tilde||^2 at a random step of the ``steps``-step grid, where
        x_tilde makes one student DDIM step equal two DDIM steps of the frozen phase teacher."""
        sigma, sigma_mid, sigma_next = student_step_levels(
            self.schedule, steps, x0.shape[0], device=x0.device
        )
        x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) * torch.randn_like(x0)
        w = sample_guidance_weights(x0.shape[0], self.w_min, self.w_max, device=x0.device)
        cond = {self.condition: value, GUIDANCE_KEY: w}
        target = progressive_target(self.phase_teacher, x, sigma, sigma_mid, sigma_next, **cond)
        prediction = self.student(x, sigma, **cond)
        return weighted_error(prediction, target, sigma, self.weighting, self.sigma_data).mean()

    # ------------------------------------------------------------------ training
    def train(self, mode: bool = True) -> GuidedDistillation:
        """Frozen teachers (and the EMA copy) stay in eval mode (no dropout) whatever Lightning asks."""
        super().train(mode)
        self.teacher.eval()
        self.phase_teacher.eval()
        if self.ema is not None:
            self.ema.averaged.eval()
        return self

    def on_fit_start(self) -> None:
        """A fresh run loads the teacher's weights and initialises the student from them (a resumed run has them)."""
        if bool(self.initialized) or self.trainer.ckpt_path is not None:
            return
        checkpoint = self.hparams.teacher_checkpoint
        if checkpoint is None and self.hparams.teacher_config is not None:
            raise FileNotFoundError(
                "teacher_checkpoint is not set: distilling an untrained teacher is meaningless; set "
                f"model.init_args.teacher_checkpoint to a checkpoint of {self.hparams.teacher_config}"
            )
        load_teacher_for_fit(
            self.teacher, checkpoint, self.hparams.teacher_config, bool(self.trainer.fast_dev_run)
        )
        if self.derived_student:
            copy_teacher_weights(self.student, self.teacher)
        if self.ema is not None:
            self.ema.averaged.load_state_dict(self.student.state_dict())
        self.initialized.fill_(True)
        max_steps = self.trainer.max_steps
        if (
            max_steps not in (-1, None)
            and max_steps < self.total_iterations
            and not self.trainer.fast_dev_run
        ):
            rank_zero_warn(
                f"trainer.max_steps={max_steps} stops before the schedule ends ({self.total_iterations} steps: "
                f"{[(p['name'], p['iterations']) for p in self.phases]}); resume from the last checkpoint to "
                f"finish, or set max_steps to -1 or {self.total_iterations}"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = self.optimizer_factory
        optimizer = (
            factory(self.student.parameters())
            if factory
            else torch.optim.Adam(self.student.parameters(), 1e-4)
        )
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    def _set_learning_rate(self, optimizer: torch.optim.Optimizer, index: int, step: int) -> float:
        fraction = 1.0
        if self.lr_anneal:
            fraction = 1.0 - (step - self.phase_start(index)) / self.phases[index]["iterations"]
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * fraction
        return optimizer.param_groups[0]["lr"]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        step = self.global_step
        if step >= self.total_iterations:
            self.trainer.should_stop = True
            return None
        index = self.phase_at(step)
        self._enter_phase(index)
        x0, value = self._split_batch(batch)
        value = self._drop(value)
        steps = self.phases[index]["steps"]
        loss = self.stage1_loss(x0, value) if steps is None else self.stage2_loss(x0, value, steps)
        # A NaN/Inf loss goes the automatic-optimisation way: with a NaNGuard the backward and the step still run
        # (DDP needs every rank to), the guard drops the gradients inside ``optimizer.step()`` so weights and
        # Adam state stay as they were, counts the skip and stops the run after K in a row; without a guard,
        # FloatingPointError naming the step.
        nonfinite = nonfinite_loss(self, loss)
        optimizer = self.optimizers()
        lr = self._set_learning_rate(optimizer.optimizer, index, step)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.ema is not None and not update_skipped(self):
            self.ema.update(self.student)
        batch_size = x0.shape[0]
        if not nonfinite:
            self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch_size)
        self.log("train/phase", float(index), prog_bar=True, on_step=True, batch_size=batch_size)
        self.log("train/lr", lr, on_step=True, batch_size=batch_size)
        if self.global_step >= self.total_iterations:
            self.trainer.should_stop = True
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        index = max(int(self.phase_index), 0)
        checkpoint["guided_distillation"] = {
            "phase": index,
            "phase_name": self.phases[index]["name"],
            "student_steps": self.student_steps(index),
            "phase_start_step": self.phase_start(index),
        }

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: DistilledSamplerConfig | dict | None = None,
        data_shape: tuple[int, ...] | None = None,
        unit_noise: Tensor | None = None,
        text_emb: Tensor | None = None,
    ) -> Tensor:
        """Samples of the (EMA) student with its sampler: N-step DDIM or the stochastic sampler, guidance ``w``."""
        config = self.sampler if sampler is None else sampler
        if isinstance(config, dict):
            config = self.sampler.with_overrides(**config)
        shape = (num_samples, *(data_shape or self.data_shape))
        if unit_noise is None:
            unit_noise = torch.randn(shape, generator=generator, device=self.device)
        value = labels if self.condition == "labels" else text_emb
        if value is None:
            raise ValueError(f"the student is conditional: pass {self.condition}= to generate")
        cond = {
            self.condition: value.to(self.device),
            GUIDANCE_KEY: torch.full((num_samples,), float(config.guidance_w), device=self.device),
        }
        steps = config.steps if config.steps is not None else self.student_steps()
        return sample_on_grid(
            self.sampling_student,
            self.schedule,
            steps,
            unit_noise.to(self.device),
            method=config.method,
            cond=cond,
            generator=generator,
            options=config.options,
        )

    # ------------------------------------------------------------------ predict
    # ``sample``: ``predict_num_samples`` draws like DiffusionModule (per-index seeds, labels cycling over the
    # classes). ``edit`` / ``inpaint``: the DataModule's test split (the validation split where there is none; an
    # ImageFolder for your own images), each image transformed with its own label and the seed ``predict_seed +
    # position`` (``distill_editing``). A batch of images in ``sample`` mode (a DataModule whose predict hook
    # Lightning prefers) draws one sample per item, with the item's label.
    def predict_dataloader(self) -> Any:
        if self.predict_task == "sample":
            return DiffusionModule.predict_dataloader(self)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise ValueError(
                f"predict_task={self.predict_task!r} needs a DataModule that serves the input images"
            )
        return datamodule.test_dataloader()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        out = self._predict(batch, batch_idx)
        decode = getattr(getattr(self._trainer, "datamodule", None), "decode", None)
        if decode is not None:  # latent data (``data.distill_latents.CachedLatents``): write images too
            out["latents"] = out["samples"]
            out["samples"] = decode(out["samples"].to(self.device)).float().cpu()
        return out

    def _predict(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        first, value = DiffusionModule._split_batch(batch)
        if first.ndim == 1 and not first.is_floating_point():  # the module's own loader: (index, labels)
            return DiffusionModule.predict_step(self, (first, value), batch_idx)
        if value is None:
            raise ValueError(f"predict needs labelled data: batches of (images, {self.condition})")
        loader = self.trainer.predict_dataloaders if self._trainer is not None else None
        size = getattr(loader, "batch_size", None) or first.shape[0]
        index = batch_idx * size + torch.arange(first.shape[0])
        if self.predict_task == "sample":
            return DiffusionModule.predict_step(self, (index, value.cpu()), batch_idx)
        generator = torch.Generator(first.device).manual_seed(self.predict_seed + int(index[0]))
        outputs = self.transform_images(first, value, generator)
        return {
            "index": index,
            "labels": value.cpu(),
            "samples": outputs.float().cpu(),
            "inputs": first.cpu(),
        }

    @torch.no_grad()
    def transform_images(
        self,
        images: Tensor,
        value: Tensor,
        generator: torch.Generator | None = None,
        task: Literal["edit", "inpaint"] | None = None,
    ) -> Tensor:
        """SDEdit (``edit``) or inpainting (``inpaint``) of ``images`` (B, C, H, W) with the student, conditioned on
        ``value`` (labels or text embeddings; ``edit_label`` replaces labels in an edit), at ``sampler.steps``
        (default the student's) and ``sampler.guidance_w``."""
        task = task or self.predict_task
        steps = self.sampler.steps if self.sampler.steps is not None else self.student_steps()
        if task == "edit" and self.edit_label is not None and self.condition == "labels":
            value = torch.full_like(value, self.edit_label)
        cond = {
            self.condition: value.to(self.device),
            GUIDANCE_KEY: torch.full((images.shape[0],), float(self.sampler.guidance_w), device=self.device),
        }
        images = images.to(self.device)
        if task == "edit":
            sigmas = edit_sigmas(self.schedule, steps, self.edit_strength).to(images.dtype)
            return sdedit(self.sampling_student, images, sigmas, generator=generator, **cond)
        if task == "inpaint":
            sigmas = distillation_sigmas(self.schedule, steps).to(images.dtype)
            mask = named_mask(self.inpaint_mask, images.shape, images.device)
            return inpaint(self.sampling_student, images, mask, sigmas, generator=generator, **cond)
        raise ValueError(f"transform_images does 'edit' or 'inpaint', got {task!r}")


__all__ = ["GuidedDistillation"]
