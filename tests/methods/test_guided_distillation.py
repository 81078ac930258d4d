"""GuidedDistillation on the analytic class-conditional mixture, whose exact guided denoiser is the teacher.

Checks: stage 1 makes an MLP student match ``(1 + w) x_c - w x_u`` across w; one stage-2 phase makes the 1-step
student land on the 2-step teacher's DDIM result far closer than the teacher's own single step; the default
student starts exactly as the teacher's conditional model; checkpoints record the phase and a run resumed
mid-phase keeps the frozen phase teacher and the optimiser state; bad schedules and missing files fail clearly.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from diffusion_lab.cli import main
from diffusion_lab.data.digits import Digits
from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.distillation import KarrasTime, guided_teacher
from diffusion_lab.methods.distillation_student import (
    add_guidance_embedding,
    copy_teacher_weights,
    sample_on_grid,
    student_from_teacher,
)
from diffusion_lab.methods.guided_distillation import GuidedDistillation
from diffusion_lab.nets.mlp import MLP

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DIGITS_CONFIG = REPO / "configs" / "distillation" / "digits.yaml"
SCHEDULE = KarrasTime(0.01, 20.0, 7.0)
MIXTURE = toy_mixture_2d()
NULL = MIXTURE.null_label  # 3


pytestmark = pytest.mark.usefixtures("quiet_lightning")


def _loader(n: int = 20000, batch_size: int = 256, seed: int = 0) -> torch.utils.data.DataLoader:
    x0, labels = MIXTURE.sample(n, generator=torch.Generator().manual_seed(seed))
    dataset = torch.utils.data.TensorDataset(x0.float(), labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)


def _student(hidden: int = 64, depth: int = 3) -> Denoiser:
    network = MLP(dim=2, hidden=hidden, depth=depth, num_classes=3, scalar_conditions=["guidance_w"])
    return Denoiser(network, parametrization="edm", sigma_data=1.0)


def _trainer(**kwargs) -> L.Trainer:
    options = dict(
        max_steps=-1,
        max_epochs=10_000,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(options | kwargs))


def _module(**kwargs) -> GuidedDistillation:
    options = dict(
        teacher=MIXTURE,
        student=_student(),
        schedule=SCHEDULE,
        num_classes=3,
        null_label=NULL,
        w_min=0.0,
        w_max=4.0,
        optimizer=partial(torch.optim.Adam, lr=5e-3),
    )
    model = GuidedDistillation(**(options | kwargs))
    model.data_shape = (2,)
    return model


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum(-1).mean().sqrt())


@pytest.fixture(scope="module")
def distilled() -> GuidedDistillation:
    """Stage 1 (700 steps) then one stage-2 phase to a 1-step student (200 steps); ~10 s on one idle core
    (its users are marked slow)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(0, verbose=False)
        model = _module(stage1_iterations=700, steps=[1], phase_iterations=200)
        trainer = _trainer()
        trainer.fit(model, _loader())
    assert model.global_step == 900 and int(model.phase_index) == 1
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Stage 1 and stage 2 on the analytic mixture
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0, 2.0, 4.0])
def test_stage1_student_matches_the_exact_guided_teacher_across_w(distilled, w):
    """The stage-1 student (frozen as the phase teacher) vs (1 + w) D_c - w D_u of the exact mixture, over noise
    levels 0.05..5 of data-plus-noise inputs. Bound: RMS error < 0.35 x the size of the guidance effect
    RMS(x_w - x_u) and < 0.25 in absolute terms (data radius ~1.2, component std 0.15). Measured: ratios
    0.24 (w = 0), 0.15 (0.3), 0.09 (1), 0.09 (4); errors 0.07-0.18."""
    gen = torch.Generator().manual_seed(5)
    x0, labels = MIXTURE.sample(2000, generator=gen)
    errors, effects = [], []
    for s in [0.05, 0.2, 0.5, 1.0, 2.0, 5.0]:
        x = x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        sigma = torch.full((2000,), s, dtype=torch.float64)
        with torch.no_grad():
            target = guided_teacher(MIXTURE, w, null_label=NULL)(x, sigma, labels=labels)
            uncond = MIXTURE(x, sigma, labels=torch.full_like(labels, NULL))
            student = distilled.phase_teacher(
                x.float(), sigma.float(), labels=labels, guidance_w=torch.full((2000,), w)
            ).double()
        errors.append(((student - target) ** 2).sum(-1))
        effects.append(((target - uncond) ** 2).sum(-1))
    error, effect = float(torch.cat(errors).mean().sqrt()), float(torch.cat(effects).mean().sqrt())
    assert error < 0.35 * effect and error < 0.25, (w, error, effect)


@pytest.mark.slow
@pytest.mark.parametrize("w", [0.0, 2.0, 4.0])
def test_one_stage2_phase_makes_the_one_step_student_match_the_two_step_teacher(distilled, w):
    noise = torch.randn(3000, 2, generator=torch.Generator().manual_seed(7))
    cond = {"labels": torch.arange(3000) % 3, "guidance_w": torch.full((3000,), w)}
    teacher_two = sample_on_grid(distilled.phase_teacher, SCHEDULE, 2, noise, cond=cond)
    teacher_one = sample_on_grid(distilled.phase_teacher, SCHEDULE, 1, noise, cond=cond)
    student_one = sample_on_grid(distilled.student, SCHEDULE, 1, noise, cond=cond)
    gap_student, gap_teacher = _rms(student_one, teacher_two), _rms(teacher_one, teacher_two)
    assert gap_student < 0.25 * gap_teacher, (gap_student, gap_teacher)


@pytest.mark.slow
def test_generate_runs_the_student_on_its_grid_with_w(distilled):
    labels = torch.arange(12) % 3
    noise = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    out = distilled.generate(12, labels=labels, unit_noise=noise, sampler={"guidance_w": 2.0})
    cond = {"labels": labels, "guidance_w": torch.full((12,), 2.0)}
    torch.testing.assert_close(out, sample_on_grid(distilled.student, SCHEDULE, 1, noise, cond=cond))
    assert distilled.student_steps() == 1
    stochastic = distilled.generate(
        12, labels=labels, unit_noise=noise, sampler={"method": "distilled_stochastic", "guidance_w": 2.0}
    )
    torch.testing.assert_close(stochastic, out)  # one step: the stochastic sampler adds no noise
    other_w = distilled.generate(12, labels=labels, unit_noise=noise, sampler={"guidance_w": 0.0})
    assert (other_w - out).abs().max() > 1e-3  # w reaches the student


# ---------------------------------------------------------------------------------------------------
# Student construction
# ---------------------------------------------------------------------------------------------------
def test_default_student_starts_as_the_conditional_teacher_for_every_w():
    torch.manual_seed(0)
    teacher = Denoiser(MLP(dim=2, hidden=32, depth=2, num_classes=3), parametrization="edm")
    for p in teacher.parameters():  # a non-trivial teacher
        p.data.normal_(0, 0.3)
    student = student_from_teacher(teacher)
    torch.manual_seed(1)
    for name, p in student.named_parameters():  # scramble the copied weights, then initialise as a fit does
        if "guidance_w" not in name:
            p.data.normal_()
    copy_teacher_weights(student, teacher)
    x, sigma, labels = torch.randn(8, 2), torch.rand(8) * 3, torch.arange(8) % 4
    for w in [0.0, 1.0, 3.5]:
        out = student(x, sigma, labels=labels, guidance_w=torch.full((8,), w))
        torch.testing.assert_close(out, teacher(x, sigma, labels=labels), rtol=0, atol=0)
    assert "guidance_w" not in teacher.network.scalar_conditions  # the teacher is untouched


def test_guidance_embedding_needs_a_condition_embedding():
    with pytest.raises(ValueError, match="exactly one ConditionEmbedding.*Linear has 0"):
        add_guidance_embedding(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------
# Phases, checkpoints, resume
# ---------------------------------------------------------------------------------------------------
class _Recorder(Callback):
    """After every optimiser step: global step, phase, a phase-teacher and a student tensor, Adam's step count."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        first = next(iter(pl_module.student.parameters()))
        self.rows.append(
            {
                "step": trainer.global_step,
                "phase": int(pl_module.phase_index),
                "teacher": next(iter(pl_module.phase_teacher.parameters())).detach().clone(),
                "student": first.detach().clone(),
                "adam_steps": int(state[first]["step"]) if first in state else 0,
            }
        )


def test_checkpoint_records_the_phase_and_resume_mid_phase_continues_it(tmp_path):
    """Schedule: stage 1 steps 0-5, 2-step phase 6-10, 1-step phase 11-15. Stop after step 8 (mid phase), resume."""
    kwargs = dict(student=_student(16, 1), stage1_iterations=6, steps=[2, 1], phase_iterations=5)
    L.seed_everything(0, verbose=False)
    first = _module(**kwargs)
    trainer = _trainer(max_steps=8)
    trainer.fit(first, _loader(2000, 64))
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["guided_distillation"] == {
        "phase": 1,
        "phase_name": "stage2_2_steps",
        "student_steps": 2,
        "phase_start_step": 6,
    }
    frozen_at_checkpoint = next(iter(first.phase_teacher.parameters())).detach().clone()

    resumed, recorder = _module(**kwargs), _Recorder()
    _trainer(callbacks=[recorder]).fit(resumed, _loader(2000, 64), ckpt_path=str(path))
    rows = {r["step"]: r for r in recorder.rows}
    assert sorted(rows) == list(range(9, 17)) and resumed.global_step == 16  # stopped by itself
    for step in (9, 10, 11):  # the rest of the 2-step phase: same frozen teacher, Adam state continued
        assert rows[step]["phase"] == 1
        assert torch.equal(rows[step]["teacher"], frozen_at_checkpoint)
        assert rows[step]["adam_steps"] == step - 6
    assert rows[12]["phase"] == 2 and rows[12]["adam_steps"] == 1  # new phase: fresh optimiser state
    assert torch.equal(rows[12]["teacher"], rows[11]["student"])  # teacher = student at the end of phase 1
    assert not torch.equal(rows[12]["teacher"], frozen_at_checkpoint)


def test_bad_schedules_and_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="halve"):
        _module(steps=[8, 2])
    with pytest.raises(ValueError, match="one per phase"):
        _module(steps=[4, 2, 1], phase_iterations=[10, 10])
    with pytest.raises(ValueError, match="exactly one of teacher_config"):
        GuidedDistillation(student=_student())
    with pytest.raises(ValueError, match="w_min=2.0, w_max=1.0"):
        _module(w_min=2.0, w_max=1.0)
    model = _module(stage1_iterations=10, steps=[1], phase_iterations=10)
    with pytest.warns(UserWarning, match="max_steps=5 stops before the schedule ends \\(20 steps"):
        _trainer(max_steps=5).fit(model, _loader(512, 64))


def test_missing_teacher_checkpoint_names_the_file(tmp_path):
    model = GuidedDistillation(
        teacher_config="configs/quickstart.yaml",
        teacher_checkpoint=str(tmp_path / "nowhere.ckpt"),
        stage1_iterations=1,
        steps=[1],
        phase_iterations=1,
    )
    assert model.null_label == 10  # the teacher's null label
    images = torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        FileNotFoundError, match="nowhere.ckpt.*diffusion-lab fit --config configs/quickstart.yaml"
    ):
        _trainer().fit(model, torch.utils.data.DataLoader(images, batch_size=4))


# ---------------------------------------------------------------------------------------------------
# The real CLI: configs/distillation/digits.yaml, fit (all phases) then predict
# ---------------------------------------------------------------------------------------------------
def _tiny_teacher(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The quickstart teacher's YAML with an 8-channel UNet, and a random checkpoint of it (safetensors)."""
    from safetensors.torch import save_file

    from diffusion_lab.methods.loading import build_from_config

    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"]["network"]["init_args"]["base_channels"] = 8
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    module, _ = build_from_config(teacher_yaml)
    for p in module.parameters():  # a teacher whose zero-initialised layers are not zero
        p.data.add_(0.05 * torch.randn_like(p))
    module.ema.averaged.load_state_dict(module.denoiser.state_dict())
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    checkpoint = tmp_path / "teacher.safetensors"
    save_file(state, str(checkpoint))
    ema = {k.removeprefix("ema.averaged."): v for k, v in state.items() if k.startswith("ema.averaged.")}
    return teacher_yaml, checkpoint, ema


@pytest.mark.slow
def test_cli_fit_runs_every_phase_then_predict_samples_the_student(tmp_path, monkeypatch):
    """digits.yaml through the CLI with a tiny random teacher: stage 1 (2 steps) + phases 2 and 1 steps (2 each);
    the checkpoint holds the teacher's EMA weights, a trained student and the last phase; predict draws with the
    1-step student (the same images as ``generate`` from each index's seed), and the ``inpaint`` task fills the
    right half of the held-out digits keeping the left half exactly."""
    monkeypatch.chdir(tmp_path)
    teacher_yaml, teacher_ckpt, teacher_ema = _tiny_teacher(tmp_path)
    common = [
        "--config",
        str(DIGITS_CONFIG),
        f"--model.init_args.teacher_config={teacher_yaml}",
        f"--model.init_args.teacher_checkpoint={teacher_ckpt}",
        "--model.init_args.stage1_iterations=2",
        "--model.init_args.steps=[2, 1]",
        "--model.init_args.phase_iterations=[2, 2]",
        "--data.init_args.batch_size=16",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        "--trainer.enable_progress_bar=false",
    ]
    main(["fit", *common])
    ckpt_path = tmp_path / "runs" / "guided_distillation_digits" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6
    assert saved["guided_distillation"] == {
        "phase": 2,
        "phase_name": "stage2_1_steps",
        "student_steps": 1,
        "phase_start_step": 4,
    }
    state = saved["state_dict"]
    for name, value in teacher_ema.items():  # the teacher is the checkpoint's EMA denoiser, loaded exactly
        assert torch.equal(state[f"teacher.{name}"], value), name
    changed = [n for n in teacher_ema if not torch.equal(state[f"student.{n}"], teacher_ema[n])]
    assert changed, "the student was not trained"
    for name, step in [("stage1", 2), ("stage2_2_steps", 4), ("stage2_1_steps", 6)]:  # PhaseCheckpoint
        phase = torch.load(ckpt_path.parent / f"{name}.ckpt", map_location="cpu", weights_only=True)
        assert phase["global_step"] == step and phase["guided_distillation"]["phase_name"] == name
    assert torch.equal(
        phase["state_dict"]["student.network.out_conv.weight"], state["student.network.out_conv.weight"]
    )

    out = tmp_path / "pred"
    main(
        [
            "predict",
            *common,
            f"--ckpt_path={ckpt_path}",
            "--model.init_args.sampler.steps=1",
            "--model.init_args.predict_num_samples=12",
            "--model.init_args.predict_batch_size=5",
            "--trainer.callbacks+=diffusion_lab.metrics.sample_grid.SampleWriter",
            f"--trainer.callbacks.init_args.output_dir={out}",
        ]
    )
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].shape == (12, 1, 8, 8) and list(arrays["labels"]) == [*range(10), 0, 1]
    student = GuidedDistillation(teacher_config=str(teacher_yaml), schedule=KarrasTime(0.002, 80.0, 7.0),
                                 stage1_iterations=2, steps=[2, 1], phase_iterations=[2, 2])  # fmt: skip
    student.load_state_dict(state)
    for i in (0, 7, 11):  # sample i: noise seeded predict_seed (0) + i, label i % 10, the 1-step student
        noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(i))
        expected = student.eval().generate(
            1, labels=torch.tensor([i % 10]), unit_noise=noise, sampler={"steps": 1, "guidance_w": 1.0}
        )
        np.testing.assert_allclose(arrays["samples"][i], expected[0].numpy(), rtol=0, atol=1e-5)

    edits = tmp_path / "edits"  # inpainting task: the held-out digits, right half filled in
    main(["predict", *common, f"--ckpt_path={ckpt_path}", "--model.init_args.predict_task=inpaint",
          "--model.init_args.inpaint_mask=left", "--trainer.callbacks+=diffusion_lab.metrics.sample_grid.SampleWriter",
          f"--trainer.callbacks.init_args.output_dir={edits}"])  # fmt: skip
    inpainted = np.load(edits / "samples.npz")["samples"]
    data = Digits(batch_size=16, val_fraction=0.1, seed=0)
    data.setup("test")
    originals = torch.cat([x for x, _ in data.test_dataloader()]).numpy()
    assert inpainted.shape == originals.shape
    assert np.array_equal(inpainted[..., :4], originals[..., :4])  # the known half is the input, exactly
    assert np.abs(inpainted[..., 4:] - originals[..., 4:]).mean() > 1e-3


# ---------------------------------------------------------------------------------------------------
# Latent space: a tiny random AutoencoderKL over the digits, latents cached once
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=8, layers_per_block=1,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def test_latents_are_encoded_once_and_served_from_the_cache(tiny_vae, tmp_path, monkeypatch):
    """Latents equal the codec's encoding of the images in order; a second DataModule reads the file without
    building the image data or calling the encoder; another data split means another file."""
    from diffusion_lab.data.distill_latents import CachedLatents
    from diffusion_lab.pretrained.diffusers import LatentCodec

    lazy = dict(vae_path=str(tiny_vae), data_class="diffusion_lab.data.digits.Digits", num_classes=10,
                latent_shape=[4, 4, 4], cache_dir=str(tmp_path), batch_size=32)  # fmt: skip
    data = CachedLatents(**lazy, data_args={"seed": 0})
    assert (data.num_channels, data.resolution, data.num_classes) == (4, 4, 10)
    data.setup("fit")
    images = torch.stack([data.data.train_set[i][0] for i in range(len(data.data.train_set))])
    with torch.no_grad():
        expected = data.codec.encode(images)
    latents, labels = data.train_set.tensors
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, torch.tensor([int(data.data.train_set[i][1]) for i in range(len(labels))]))

    def refuse(*args, **kwargs):
        raise AssertionError("built the images or encoded again instead of reading the cache")

    monkeypatch.setattr(LatentCodec, "encode", refuse)
    monkeypatch.setattr(Digits, "setup", refuse)
    again = CachedLatents(**lazy, data_args={"seed": 0})
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], latents) and len(again.val_set) == len(data.val_set)
    assert CachedLatents(**lazy, data_args={"seed": 1}).cache_path("train") != data.cache_path("train")
    eager = CachedLatents(vae_path=str(tiny_vae), data=Digits(), cache_dir=str(tmp_path))
    assert eager.data_shape == (4, 4, 4) and eager.num_classes == 10  # shape read from the VAE config


def test_both_stages_run_on_latents_and_predict_decodes_images(tiny_vae, tmp_path):
    from diffusion_lab.data.distill_latents import CachedLatents
    from diffusion_lab.nets.unet import UNet

    data = CachedLatents(vae_path=str(tiny_vae), data=Digits(), cache_dir=str(tmp_path), batch_size=32)
    torch.manual_seed(0)
    network = UNet(in_channels=4, resolution=4, num_classes=10, base_channels=8, channel_mult=[1],
                   attention_resolutions=[], norm_groups=4)  # fmt: skip
    teacher = Denoiser(network, parametrization="edm", sigma_data=1.0)
    model = GuidedDistillation(teacher=teacher, schedule=KarrasTime(0.002, 80.0, 7.0), num_classes=10,
                               null_label=10, stage1_iterations=2, steps=[2, 1], phase_iterations=2,
                               predict_num_samples=20)  # fmt: skip
    trainer = _trainer()
    trainer.fit(model, datamodule=data)
    assert model.global_step == 6 and int(model.phase_index) == 2
    outputs = trainer.predict(model, datamodule=data)
    latents = torch.cat([o["latents"] for o in outputs])
    images = torch.cat([o["samples"] for o in outputs])
    assert latents.shape == (20, 4, 4, 4) and images.shape == (20, 1, 8, 8)
    torch.testing.assert_close(images, data.decode(latents), rtol=0, atol=1e-5)
