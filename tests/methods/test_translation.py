"""The DiffuseIT LightningModule: predict writes results, grid, prompts and TensorBoard logs; the CLI runs the
CPU config; real-scale configs fail at once on missing weights; registry specs load local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lab.cli import main
from diffusion_lab.data.pairs import TranslationPairs
from diffusion_lab.diffusion.translation import TranslationConfig
from diffusion_lab.methods.translation import (
    DiffuseIT,
    PretrainedSpec,
    random_pretrained_models,
    tiny_adm_flags,
    tiny_clip_config,
    tiny_dino_kwargs,
)
from diffusion_lab.pretrained import MissingWeightsError

REPO = Path(__file__).resolve().parents[2]
RES = 16
FAST = TranslationConfig(
    respacing=6, skip=2, resample_steps=1, resample_count=2, clip_crops=2, semantic_min_index=2
)
PAIRS = [
    {"source": "skimage:chelsea", "prompt": "a photo of a tiger", "source_prompt": "a photo of a cat"},
    {"source": "skimage:astronaut", "target": "skimage:coffee"},
]


@pytest.fixture(scope="module")
def models():
    return random_pretrained_models("tiny", RES, seed=0)


def _module(models, tmp_path, **kw) -> DiffuseIT:
    denoiser, vit, clip = models
    return DiffuseIT(
        denoiser=denoiser,
        vit_model=vit,
        clip_models=[clip],
        translation=FAST,
        text_templates="single",
        output_dir=str(tmp_path / "out"),
        progress=False,
        **{"grid_upscale": 2, **kw},
    )


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_predict_writes_results_grid_prompts_and_tensorboard(models, tmp_path):
    module = _module(models, tmp_path)
    data = TranslationPairs(PAIRS, resolution=RES)
    logger = TensorBoardLogger(tmp_path / "runs", name="dit")
    trainer = Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_checkpointing=False)
    out = trainer.predict(module, datamodule=data)
    names = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert names == ["0000_chelsea.png", "0001_astronaut.png"]
    # the saved image is the returned result (8-bit rounding)
    saved = _png(tmp_path / "out" / "results" / "0001_astronaut.png").astype(np.float64) / 255
    returned = ((out[1]["result"][0] + 1) / 2).permute(1, 2, 0).numpy()
    assert np.abs(saved - returned).max() <= 1 / 255 + 1e-6
    grid = _png(tmp_path / "out" / "grid.png")
    assert grid.shape[1] > grid.shape[0]  # 3 columns (source | target | result), 2 rows
    assert (tmp_path / "out" / "prompts.txt").read_text().splitlines() == [
        "0000_chelsea: a photo of a tiger",
        "0001_astronaut: (target image)",
    ]
    acc = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "diffuseit/grid" in acc.Tags()["images"]
    scalars = acc.Tags()["scalars"]
    assert {"diffuseit/structure", "diffuseit/clip", "diffuseit/cls"} <= set(scalars)
    assert len(acc.Scalars("diffuseit/structure")) == 2 * FAST.evaluations  # one value per guided evaluation
    # the result is the same translation as a direct call with the pair's seed
    batch = data.dataset[1]
    direct = module.translate(
        batch["source"][None], batch["target"][None], torch.tensor([True]), [""], [""], seed=1
    )
    torch.testing.assert_close(direct, out[1]["result"])


def test_fit_is_refused_and_bad_settings_are_named(models, tmp_path):
    module = _module(models, tmp_path)
    with pytest.raises(RuntimeError, match="predict-only"):
        module.configure_optimizers()
    with pytest.raises(ValueError, match="grid_upscale"):
        _module(models, tmp_path, grid_upscale=0)
    with pytest.raises(ValueError, match="random_models"):
        DiffuseIT(random_models="huge")
    with pytest.raises(ValueError, match="diffusion model"):
        DiffuseIT(vit_model=models[1])


def test_missing_weights_fail_before_anything_loads(tmp_path):
    spec = PretrainedSpec("adm/256x256_diffusion_uncond", str(tmp_path / "nope.pt"))
    vit = PretrainedSpec("dino/vit_base_patch8_224.dino", str(tmp_path / "dino.pth"))
    module = DiffuseIT(diffusion=spec, vit=vit)  # instantiates (config checks); loads nothing yet
    with pytest.raises(MissingWeightsError, match=r"nope\.pt.*256x256_diffusion_uncond\.pt"):
        module.setup("predict")


@pytest.mark.parametrize("name", ["imagenet256_text.yaml", "imagenet256_image.yaml"])
def test_real_scale_configs_name_the_missing_weights_file(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as err:
        main(["predict", "--config", str(REPO / "configs" / "translation" / name)])
    text = str(err.value) + capsys.readouterr().err
    assert "weights/256x256_diffusion_uncond.pt" in text and "does not exist" in text


def test_registry_specs_load_local_weight_files(models, tmp_path):
    denoiser, vit, clip = models
    save_file(denoiser.model.state_dict(), str(tmp_path / "adm.safetensors"))
    save_file(vit.vit.state_dict(), str(tmp_path / "dino.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(tmp_path / "clip.safetensors")
    )
    module = DiffuseIT(
        diffusion=PretrainedSpec(
            "adm/256x256_diffusion_uncond",
            str(tmp_path / "adm.safetensors"),
            {"flag_overrides": tiny_adm_flags(RES)},
        ),
        vit=PretrainedSpec(
            "dino/vit_base_patch8_224.dino", str(tmp_path / "dino.safetensors"), tiny_dino_kwargs(RES)
        ),
        clip=[
            PretrainedSpec(
                "clip/ViT-B-32", str(tmp_path / "clip.safetensors"), {"model_cfg": tiny_clip_config(RES)}
            )
        ],
        translation=FAST,
        text_templates="single",
        output_dir=None,
        progress=False,
    )
    module.setup("predict")
    x, sigma = torch.randn(1, 3, RES, RES), torch.full((1,), 3.0)
    torch.testing.assert_close(module.denoiser(x, sigma), denoiser(x, sigma))
    torch.testing.assert_close(module.vit_model(x).keys[-1], vit(x).keys[-1])
    torch.testing.assert_close(module.clip_models[0].encode_text(["a cat"]), clip.encode_text(["a cat"]))


def test_cli_predict_with_the_cpu_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "predict",
            "--config",
            str(REPO / "configs" / "translation" / "tiny_random.yaml"),
            "--trainer.enable_progress_bar=false",
        ]
    )
    out = tmp_path / "outputs" / "diffuseit_tiny"
    assert sorted(p.name for p in (out / "results").iterdir()) == ["0000_chelsea.png", "0001_astronaut.png"]
    assert _png(out / "results" / "0000_chelsea.png").shape == (RES, RES, 3)
    assert (out / "grid.png").is_file() and (out / "prompts.txt").is_file()
    assert list((tmp_path / "runs" / "diffuseit_tiny").rglob("events.out.tfevents.*"))


def test_a_class_conditional_project_model_runs_with_its_null_label(models, tmp_path):
    from diffusion_lab.diffusion.translation import DiffuseITObjective, diffuseit_translate
    from diffusion_lab.methods.loading import build_from_config

    config = str(REPO / "configs" / "quickstart.yaml")  # class-conditional digits model, 1 x 8 x 8
    trained, _ = build_from_config(config)
    with torch.no_grad():  # zero-initialised output layers would make the network (and its labels) invisible
        for p in trained.parameters():
            if not p.any():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    checkpoint = tmp_path / "digits.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in trained.state_dict().items()}, str(checkpoint))
    module = DiffuseIT(diffusion_config=config, diffusion_checkpoint=str(checkpoint), vit_model=models[1],
                       translation=FAST, output_dir=None, progress=False)  # fmt: skip
    module.setup("predict")
    assert module.null_label == trained.null_label == 10
    source = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = module.translate(source, seed=3)
    objective = DiffuseITObjective(FAST, models[1], source, generator=torch.Generator().manual_seed(3))
    expected = diffuseit_translate(
        trained.ema.averaged, source, objective, generator=objective.generator,
        cond={"labels": torch.full((2,), 10)},
    ).clamp(-1, 1)  # fmt: skip
    torch.testing.assert_close(out, expected)
    objective.reset()
    class_three = diffuseit_translate(
        trained.ema.averaged, source, objective, generator=torch.Generator().manual_seed(3),
        cond={"labels": torch.full((2,), 3)},
    ).clamp(-1, 1)  # fmt: skip
    assert not torch.allclose(out, class_three)  # the label matters: the check above is discriminating
