"""Latent guided distillation with text: cached CLIP text embeddings, the text-conditioned student, the latent
text config through the CLI, and SDEdit / inpainting through a latent student with a tiny random AutoencoderKL.

Truths: the cached embeddings equal open_clip's own ``normalize(encode_text(tokenize(caption)))`` for each
image's caption (looked up independently from the CSV); a second DataModule reads the cache without the images,
the VAE or the text encoder; the student starts as the teacher's conditional model for every ``w`` (zero
guidance embedding) and ignores a zero (null) text embedding exactly; in latent inpainting the known latent cells
are the encoder's latents bit for bit; strength 0 is ``D(E(x))`` exactly; a strength-s edit makes
``ceil(s N)`` student calls on the last levels of the N-step grid.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from diffusion_lab.data.captions import read_captions
from diffusion_lab.data.image_folder import ImageFolder
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.distill_editing import edit_latents, edit_sigmas, latent_mask, named_mask
from diffusion_lab.diffusion.distillation import KarrasTime, distillation_sigmas
from diffusion_lab.methods.distill_text import TextConditioned
from diffusion_lab.methods.distillation_student import copy_teacher_weights
from diffusion_lab.methods.guided_distillation import GuidedDistillation
from diffusion_lab.nets.unet import UNet
from diffusion_lab.pretrained.safe_load import MissingWeightsError

diffusers = pytest.importorskip("diffusers")
open_clip = pytest.importorskip("open_clip")

REPO = Path(__file__).resolve().parents[2]
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SCHEDULE = KarrasTime(0.002, 80.0, 7.0)
NUM_IMAGES = 10


pytestmark = pytest.mark.usefixtures("quiet_lightning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A flat folder of 10 random 8 x 8 RGB images, captions.csv next to it, a tiny random RGB AutoencoderKL
    (latents 4 x 4 x 4) and a tiny random open_clip model (E = 16) as safetensors."""
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("latent_text")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with (base / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(NUM_IMAGES):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(images / f"{i}.png")
            writer.writerow([f"{i}.png", f"a photo of {['a cat', 'a dog', 'two birds'][i % 3]} number {i}"])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=8, layers_per_block=1,
    )  # fmt: skip
    vae.save_pretrained(base / "vae")
    clip = open_clip.CLIP(**TINY_CLIP, quick_gelu=True)
    save_file(clip.state_dict(), str(base / "clip.safetensors"))
    return {"base": base, "images": images, "vae": base / "vae", "clip": base / "clip.safetensors"}


def _data(assets: dict[str, Path], cache: Path, **kwargs):
    from diffusion_lab.data.distill_latents import CachedLatents

    options = dict(
        vae_path=str(assets["vae"]),
        data_class="diffusion_lab.data.image_folder.ImageFolder",
        data_args={"root": str(assets["images"]), "resolution": 8, "random_flip": False, "val_fraction": 0.2},
        latent_shape=[4, 4, 4],
        captions="captions.csv",
        text_encoder_path=str(assets["clip"]),
        text_encoder_cfg=TINY_CLIP,
        cache_dir=str(cache),
        batch_size=4,
    )
    return CachedLatents(**(options | kwargs))


def _direct_clip_embeddings(assets: dict[str, Path], captions: list[str]) -> torch.Tensor:
    from safetensors.torch import load_file

    model = open_clip.CLIP(**TINY_CLIP, quick_gelu=True).eval()
    model.load_state_dict(load_file(str(assets["clip"])))
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=77)(captions)
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


# ---------------------------------------------------------------------------------------------------
# Text embeddings cached with the latents
# ---------------------------------------------------------------------------------------------------
def test_text_embeddings_match_clip_and_are_cached_once(assets, tmp_path, monkeypatch):
    from diffusion_lab.pretrained import clip as clip_module
    from diffusion_lab.pretrained.diffusers import LatentCodec

    data = _data(assets, tmp_path)
    assert (data.num_classes, data.text_dim, data.data_shape) == (0, 16, (4, 4, 4))
    data.setup("fit")
    table = {row["file"]: row["caption"] for row in csv.DictReader((assets["base"] / "captions.csv").open())}
    for split, dataset in (("train", data.train_set), ("val", data.val_set)):
        files = data.data.split_files(split)
        latents, text_emb = dataset.tensors
        assert len(files) == len(text_emb) == len(latents) and text_emb.shape[1] == 16
        expected = _direct_clip_embeddings(assets, [table[f.name] for f in files])
        torch.testing.assert_close(text_emb, expected, rtol=1e-5, atol=1e-6)
        images = getattr(data.data, f"{split}_set")
        images = torch.stack([images[i][0] for i in range(len(images))])
        # the latents are the VAE's posterior means of the same images, in order
        torch.testing.assert_close(latents, data.codec.encode(images), rtol=1e-5, atol=1e-6)
    assert len(data.train_set) + len(data.val_set) == NUM_IMAGES

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(LatentCodec, "encode", refuse)
    monkeypatch.setattr(ImageFolder, "setup", refuse)
    monkeypatch.setattr(clip_module, "load_clip", refuse)
    again = _data(assets, tmp_path)
    again.setup("fit")
    for a, b in zip(again.train_set.tensors, data.train_set.tensors):
        assert torch.equal(a, b)
    # other captions or another text encoder are another cache file, never a stale one
    other = assets["base"] / "other.csv"
    other.write_text((assets["base"] / "captions.csv").read_text().replace("cat", "fox"))
    assert _data(assets, tmp_path, captions="other.csv").cache_path("train") != data.cache_path("train")
    assert _data(assets, tmp_path, captions=None, num_classes=1).cache_path("train") != data.cache_path(
        "train"
    )


def test_missing_text_encoder_and_captions_fail_clearly(assets, tmp_path):
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(MissingWeightsError, match=rf"'{missing}' does not exist.*vit_base_patch32_clip_224"):
        _data(assets, tmp_path, text_encoder_path=str(missing), text_encoder_cfg=None).setup("fit")
    with pytest.raises(ValueError, match="needs text_encoder_path"):
        _data(assets, tmp_path, text_encoder_path=None)
    with pytest.raises(FileNotFoundError, match="captions file 'nope.csv' not found"):
        _data(assets, tmp_path, captions="nope.csv").setup("fit")
    files = sorted(assets["images"].glob("*.png"))
    with pytest.raises(FileNotFoundError, match=r"no caption for image .*0\.png.*0\.txt"):
        read_captions(assets["images"], files, "txt")


def test_per_image_txt_and_json_captions(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    files = [folder / "a" / "x.png", folder / "y.png"]
    for file, text in zip(files, ["first", "second"]):
        file.with_suffix(".txt").write_text(f"  {text}\n")
    assert read_captions(folder, files, "txt") == ["first", "second"]
    (tmp_path / "c.json").write_text('{"a/x.png": "one", "y.png": "two"}')
    assert read_captions(folder, files, "c.json") == ["one", "two"]
    (tmp_path / "bad.csv").write_text("name,text\nx.png,one\n")
    with pytest.raises(ValueError, match="columns 'file' and 'caption'"):
        read_captions(folder, files, "bad.csv")


# ---------------------------------------------------------------------------------------------------
# The w-conditioned student takes the text embedding as cond
# ---------------------------------------------------------------------------------------------------
def _text_unet(text_dim: int = 16) -> TextConditioned:
    unet = UNet(in_channels=4, resolution=4, base_channels=8, channel_mult=[1], attention_resolutions=[],
                norm_groups=4)  # fmt: skip
    network = TextConditioned(unet, text_dim)
    with torch.no_grad():  # random weights everywhere (the UNet zero-initialises its output layer)
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.2)
    return network


def test_text_student_starts_as_the_conditional_teacher_and_null_text_is_zero():
    torch.manual_seed(0)
    teacher = Denoiser(_text_unet(), parametrization="edm", sigma_data=1.0)
    model = GuidedDistillation(teacher=teacher, condition="text_emb", stage1_iterations=1, steps=[1])
    copy_teacher_weights(model.student, model.teacher)
    x, sigma = torch.randn(3, 4, 4, 4), torch.tensor([0.5, 2.0, 10.0])
    text = F.normalize(torch.randn(3, 16), dim=-1)
    with torch.no_grad():
        expected = teacher(x, sigma, text_emb=text)
        for w in (0.0, 2.0, 7.5):
            got = model.student(x, sigma, text_emb=text, guidance_w=torch.full((3,), w))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert not torch.allclose(teacher(x, sigma, text_emb=text.flip(0)), expected)  # the text matters
        torch.testing.assert_close(
            teacher(x, sigma, text_emb=torch.zeros(3, 16)), teacher(x, sigma), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match=r"text_emb must have shape \(3, 16\)"):
        teacher(x, sigma, text_emb=torch.zeros(3, 8))


@pytest.mark.slow
def test_cli_fast_dev_run_of_the_latent_text_config(assets, tmp_path, monkeypatch):
    """configs/distillation/latent_text.yaml with the tiny assets and a tiny text teacher: one stage-1 step."""
    from diffusion_lab.cli import main

    monkeypatch.chdir(tmp_path)
    data_args = {
        "vae_path": str(assets["vae"]),
        "data_args": {
            "root": str(assets["images"]),
            "resolution": 8,
            "random_flip": False,
            "val_fraction": 0.2,
        },
        "latent_shape": [4, 4, 4],
        "text_encoder_path": str(assets["clip"]),
        "text_encoder_cfg": TINY_CLIP,
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
        "batch_size": 4,
        "num_workers": 0,
    }
    teacher = yaml.safe_load((REPO / "configs/distillation/latent_text_teacher.yaml").read_text())
    teacher["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False}
    teacher["model"]["init_args"]["network"]["init_args"] = {
        "text_dim": 16,
        "network": {"class_path": "diffusion_lab.nets.unet.UNet", "init_args": {
            "in_channels": 4, "resolution": 4, "base_channels": 8, "channel_mult": [1],
            "attention_resolutions": [], "norm_groups": 4}},
    }  # fmt: skip
    teacher["data"]["init_args"].update(data_args)
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    config = yaml.safe_load((REPO / "configs/distillation/latent_text.yaml").read_text())
    config["trainer"].update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", logger=False)
    config["model"]["init_args"].update(teacher_config=str(tmp_path / "teacher.yaml"),
                                        teacher_checkpoint=str(tmp_path / "missing.ckpt"))  # fmt: skip
    config["data"]["init_args"].update(data_args)
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(tmp_path / "distill.yaml"), "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert cli.trainer.state.finished and cli.model.global_step == 1 and int(cli.model.phase_index) == 0
    assert (
        cli.model.condition == "text_emb"
        and len(list((tmp_path / "cache").glob("*-train-*.safetensors"))) == 1
    )


# ---------------------------------------------------------------------------------------------------
# SDEdit and inpainting through a latent student
# ---------------------------------------------------------------------------------------------------
class Counting(torch.nn.Module):
    """A denoiser wrapper that records the noise levels it is called at."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser, self.levels = denoiser, []

    def forward(self, x, sigma, **cond):
        self.levels.append(float(sigma.reshape(-1)[0]))
        return self.denoiser(x, sigma, **cond)


@pytest.fixture(scope="module")
def latent_student(assets):
    from diffusion_lab.pretrained.diffusers import load_diffusers_vae

    torch.manual_seed(1)
    teacher = Denoiser(_text_unet(), parametrization="edm", sigma_data=1.0)
    model = GuidedDistillation(teacher=teacher, condition="text_emb", stage1_iterations=1, steps=[4])
    copy_teacher_weights(model.student, model.teacher)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cond = {"text_emb": F.normalize(torch.randn(3, 16), dim=-1), "guidance_w": torch.full((3,), 2.0)}
    return model.student.eval(), load_diffusers_vae(str(assets["vae"])), images, cond


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_latent_sdedit_runs_ceil_sN_student_steps_from_the_noised_encoding(latent_student, strength):
    student, codec, images, cond = latent_student
    counting, sigmas = Counting(student), edit_sigmas(SCHEDULE, 4, strength).float()
    generator = torch.Generator().manual_seed(3)
    decoded, latents = edit_latents(counting, codec, images, sigmas, generator=generator, **cond)
    k = int(np.ceil(strength * 4))
    grid = distillation_sigmas(SCHEDULE, 4)
    assert counting.levels == pytest.approx(grid[4 - k : 4].tolist(), rel=1e-6)  # the last k levels
    torch.testing.assert_close(decoded, codec.decode(latents), rtol=0, atol=0)
    assert latents.shape == (3, 4, 4, 4) and decoded.shape == images.shape
    assert not torch.allclose(latents, codec.encode(images), atol=1e-3)  # it did edit


def test_latent_sdedit_at_strength_zero_returns_the_vae_reconstruction(latent_student):
    student, codec, images, cond = latent_student
    counting = Counting(student)
    decoded, latents = edit_latents(counting, codec, images, edit_sigmas(SCHEDULE, 4, 0.0).float(), **cond)
    assert counting.levels == []
    with torch.no_grad():
        z0 = codec.encode(images)
        torch.testing.assert_close(latents, z0, rtol=0, atol=0)
        torch.testing.assert_close(decoded, codec.decode(z0), rtol=0, atol=0)


@pytest.mark.parametrize("mask_name", ["left", "center", "border"])
def test_latent_inpainting_keeps_the_known_latents_exactly(latent_student, mask_name):
    student, codec, images, cond = latent_student
    pixel_mask = named_mask(mask_name, images.shape)
    known = latent_mask(pixel_mask, (4, 4))
    # min-pool by hand: a latent cell is known iff its 2 x 2 pixel patch is all known
    by_hand = pixel_mask[0, 0].reshape(4, 2, 4, 2).all(dim=3).all(dim=1)
    assert torch.equal(known[0, 0], by_hand) and known.any() and (~known).any()
    sigmas = distillation_sigmas(SCHEDULE, 4).float()
    counting = Counting(student)
    _, latents = edit_latents(counting, codec, images, sigmas, mask=pixel_mask,
                              generator=torch.Generator().manual_seed(4), **cond)  # fmt: skip
    assert len(counting.levels) == 4
    z0 = codec.encode(images)
    region = known.expand_as(latents)
    assert torch.equal(latents[region], z0[region])
    assert not torch.allclose(latents[~region], z0[~region], atol=1e-3)  # the hole was filled anew
    with pytest.raises(ValueError, match="not a multiple of the latent size 3x3"):
        latent_mask(pixel_mask, (3, 3))


def test_predict_inpaints_text_conditioned_latents_and_decodes(assets, tmp_path):
    """``predict`` with ``predict_task=inpaint`` on the cached text latents: the known latent cells of every output
    are the cached latents of the input split exactly, and the images written are their decodings."""
    import lightning as L

    data = _data(assets, tmp_path)
    torch.manual_seed(1)
    teacher = Denoiser(_text_unet(), parametrization="edm", sigma_data=1.0)
    model = GuidedDistillation(teacher=teacher, condition="text_emb", schedule=SCHEDULE, stage1_iterations=1,
                               steps=[2], predict_task="inpaint", inpaint_mask="left")  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    outputs = trainer.predict(model, datamodule=data)
    inputs = torch.cat([o["inputs"] for o in outputs])
    latents = torch.cat([o["latents"] for o in outputs])
    torch.testing.assert_close(inputs, data.val_set.tensors[0], rtol=0, atol=0)
    known = named_mask("left", latents.shape).expand_as(latents)
    assert torch.equal(latents[known], inputs[known]) and not torch.allclose(latents[~known], inputs[~known])
    torch.testing.assert_close(
        torch.cat([o["samples"] for o in outputs]), data.decode(latents), rtol=0, atol=1e-6
    )
