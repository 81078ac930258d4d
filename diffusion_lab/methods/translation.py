"""DiffuseIT image translation (Kwon & Ye, ICLR 2023) as a predict-only LightningModule.

Thin wiring: the math is :mod:`diffusion_lab.diffusion.translation` (objective and reverse loop) and
:mod:`diffusion_lab.diffusion.translation_losses`; the models come from local files through the pretrained
registry (``adm/256x256_diffusion_uncond``, ``dino/vit_base_patch8_224.dino``, ``clip/ViT-B-32``) or, for the
diffusion model, from a project config + checkpoint; the pairs from :class:`~diffusion_lab.data.pairs.TranslationPairs`.
Nothing is trained: ``diffusion-lab predict --config configs/translation/imagenet256_text.yaml``.

``predict`` writes each result as ``output_dir/results/<name>.png``, and after the last batch a grid with one
row per pair, source | target | result (a grey tile where the target is a prompt), as
``output_dir/grid.png`` with the prompts in ``output_dir/prompts.txt``; with a TensorBoard logger the grid,
the prompts and every evaluation's loss terms are logged too. A progress bar counts the guided evaluations.

The guidance needs autograd: ``predict`` leaves Lightning's inference mode for the translation itself, so no
trainer flag is needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.translation import (
    DiffuseITObjective,
    TranslationConfig,
    color_transfer_mkl,
    diffuseit_translate,
)

TemplateSet = Literal["imagenet", "single"]


@dataclass
class PretrainedSpec:
    """A model of the pretrained registry (:func:`diffusion_lab.pretrained.load`): name, local file, loader options."""

    name: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> nn.Module:
        from diffusion_lab.pretrained import load

        return load(self.name, self.path, **self.kwargs)

    def check_file(self) -> None:
        """Fail now, before any data or model is loaded, when the weights file is missing."""
        from diffusion_lab.pretrained import require_file

        require_file(self.name, self.path)


def prompt_templates(which: TemplateSet) -> list[str]:
    """``imagenet``: CLIP's 80 ImageNet prompt templates (as the public DiffuseIT code); ``single``: the prompt."""
    if which == "single":
        return ["{}"]
    if which != "imagenet":
        raise ValueError(f"text_templates must be 'imagenet' or 'single', got {which!r}")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


class DiffuseIT(L.LightningModule):
    """Text- and image-guided translation with DiffuseIT (predict only).

    Args:
        diffusion: the unconditional diffusion model from the registry (``adm/256x256_diffusion_uncond``).
        diffusion_config, diffusion_checkpoint: instead, a model trained by this project (its YAML and
            checkpoint; the EMA weights, run with the null label when the model is class-conditional).
        vit: the DINO ViT from the registry (``dino/vit_base_patch8_224.dino``).
        clip: CLIP models from the registry (text-guided pairs; losses averaged over them).
        translation: DiffuseIT's steps and loss weights (:class:`TranslationConfig`).
        text_templates: ``imagenet`` (80 templates, averaged) or ``single``.
        color_match: Monge-Kantorovich colour transfer of image-guided results to the target's colours.
        output_dir: where results and the grid go (None: nowhere).
        seed: batch ``i`` (first pair index ``k``) draws all its noise from seed ``seed + k``.
        progress: show a progress bar over the guided evaluations.
        grid_upscale: nearest-neighbour upscaling of the grid.
        random_models: ``tiny`` or ``full``: seeded random-weight models of the real architectures instead of
            the specs (:func:`random_pretrained_models`; smoke runs and timing only: the results are noise).
        resolution: image size of the random models (the CLI links it from the data).
        denoiser, vit_model, clip_models: already built models (Python use and tests); they replace the specs.

    The models load in ``setup``; every weights file is checked first, so a missing one fails before any
    model loads (the config itself instantiates without the files).
    """

    def __init__(
        self,
        diffusion: PretrainedSpec | None = None,
        diffusion_config: str | None = None,
        diffusion_checkpoint: str | None = None,
        vit: PretrainedSpec | None = None,
        clip: list[PretrainedSpec] | None = None,
        translation: TranslationConfig | None = None,
        text_templates: TemplateSet = "imagenet",
        color_match: bool = False,
        output_dir: str | None = "outputs/diffuseit",
        seed: int = 0,
        progress: bool = True,
        grid_upscale: int = 1,
        random_models: Literal["tiny", "full"] | None = None,
        resolution: int | None = None,
        denoiser: nn.Module | None = None,
        vit_model: nn.Module | None = None,
        clip_models: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if random_models not in (None, "tiny", "full"):
            raise ValueError(f"random_models must be None, 'tiny' or 'full', got {random_models!r}")
        if random_models is not None:  # replaces the specs and any models passed
            denoiser, vit_model, clip_model = random_pretrained_models(random_models, resolution or 256, seed)
            clip_models = [clip_model]
        if denoiser is None and diffusion is None and not (diffusion_config and diffusion_checkpoint):
            raise ValueError(
                "give the diffusion model as diffusion=, diffusion_config + diffusion_checkpoint, or denoiser="
            )
        if vit_model is None and vit is None:
            raise ValueError("give the DINO ViT as vit= (a registry spec) or vit_model=")
        if grid_upscale < 1:
            raise ValueError(f"grid_upscale must be >= 1, got {grid_upscale}")
        self.save_hyperparameters(
            ignore=["denoiser", "vit_model", "clip_models", "translation", "diffusion", "vit", "clip"]
        )
        self.diffusion_spec, self.vit_spec, self.clip_specs = diffusion, vit, list(clip or [])
        self.diffusion_config, self.diffusion_checkpoint = diffusion_config, diffusion_checkpoint
        self.translation = translation if translation is not None else TranslationConfig()
        self.templates = prompt_templates(text_templates)
        self.color_match, self.seed, self.progress, self.grid_upscale = (
            color_match,
            seed,
            progress,
            grid_upscale,
        )
        self.output_dir = Path(output_dir) if output_dir else None
        self.denoiser = denoiser
        self.vit_model = vit_model
        self.clip_models = nn.ModuleList(clip_models or [])
        self._rows: list[tuple[str, str, Tensor]] = []
        self._evaluations = 0
        self.null_label: int | None = None

    # ------------------------------------------------------------------ models
    def _check_files(self) -> None:
        """Every weights file still to load exists (fails before the first, possibly large, model loads)."""
        specs = [self.diffusion_spec] if self.denoiser is None else []
        specs += [self.vit_spec] if self.vit_model is None else []
        specs += self.clip_specs if not len(self.clip_models) else []
        for spec in specs:
            if spec is not None:
                spec.check_file()
        if self.denoiser is None and self.diffusion_spec is None:
            for path in (self.diffusion_config, self.diffusion_checkpoint):
                if not Path(path).expanduser().is_file():
                    raise FileNotFoundError(f"diffusion model file '{path}' does not exist")

    def setup(self, stage: str) -> None:
        self._check_files()
        if self.denoiser is None:
            if self.diffusion_spec is not None:
                self.denoiser = self.diffusion_spec.load()
            else:
                from diffusion_lab.methods.loading import load_module

                trained = load_module(self.diffusion_config, self.diffusion_checkpoint)
                self.denoiser = trained.ema.averaged
                # a class-conditional model of this project is run unconditionally, with its null label
                self.null_label = trained.null_label if getattr(trained, "num_classes", 0) else None
        if self.vit_model is None:
            self.vit_model = self.vit_spec.load()
        if not len(self.clip_models) and self.clip_specs:
            self.clip_models = nn.ModuleList(spec.load() for spec in self.clip_specs)
        for model in (self.denoiser, self.vit_model, *self.clip_models):
            model.eval().requires_grad_(False)

    def configure_optimizers(self) -> None:
        raise RuntimeError("DiffuseIT is predict-only: it guides a pretrained model and trains nothing")

    # ------------------------------------------------------------------ translation
    def translate(
        self,
        source: Tensor,
        target: Tensor | None = None,
        has_target: Tensor | None = None,
        prompts: list[str] | None = None,
        source_prompts: list[str] | None = None,
        seed: int | None = None,
        desc: str = "DiffuseIT",
    ) -> Tensor:
        """Translate a batch (B, 3, H, W) in [-1, 1]; image-guided rows have ``has_target`` True, text-guided
        rows a non-empty prompt. Returns results in [-1, 1]."""
        if self.denoiser is None:
            self.setup("predict")
        cfg = self.translation
        generator = torch.Generator(source.device).manual_seed(self.seed if seed is None else seed)
        # Lightning predicts in inference mode; the guidance needs autograd, and fresh (non-inference) tensors.
        with torch.inference_mode(False), torch.no_grad():
            source = source.clone()
            target = target.clone() if target is not None else None
            if has_target is None:
                has_target = torch.full((source.shape[0],), target is not None, device=source.device)
            objective = DiffuseITObjective(
                cfg,
                self.vit_model,
                source,
                target_image=target if bool(has_target.any()) else None,
                image_mask=has_target,
                clips=list(self.clip_models),
                prompts=prompts,
                source_prompts=source_prompts,
                templates=self.templates,
                generator=generator,
            )
            with self._progress_bar(cfg.evaluations, desc) as bar:
                out = diffuseit_translate(
                    self.denoiser,
                    source,
                    objective,
                    cfg,
                    generator=generator,
                    callback=self._on_evaluation(bar),
                    cond=self._cond(source),
                )
            if self.color_match and bool(has_target.any()):
                rows = has_target.nonzero().flatten()
                out[rows] = color_transfer_mkl(out[rows], target[rows])
        return out.clamp(-1, 1)

    def _cond(self, source: Tensor) -> dict[str, Tensor]:
        """Denoiser conditioning: the null label for a class-conditional model, else nothing."""
        if self.null_label is None:
            return {}
        return {"labels": torch.full((source.shape[0],), self.null_label, device=source.device)}

    def forward(
        self, source: Tensor, target: Tensor | None = None, prompts: list[str] | None = None
    ) -> Tensor:
        return self.translate(source, target, prompts=prompts)

    def _progress_bar(self, total: int, desc: str) -> Any:
        if not self.progress:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, unit="eval")

    def _on_evaluation(self, bar: Any) -> Any:
        experiment = (
            getattr(self.logger, "experiment", None) if self._trainer is not None and self.logger else None
        )
        last_attempt = [0]

        def callback(info: dict[str, Any]) -> None:
            if bar is not None:
                if info["attempt"] != last_attempt[0]:  # a range restart: the run starts over
                    last_attempt[0] = info["attempt"]
                    bar.reset()
                    bar.set_postfix(restart=info["attempt"])
                bar.update(1)
            if hasattr(experiment, "add_scalar"):
                for name, value in info["terms"].items():
                    experiment.add_scalar(f"diffuseit/{name}", float(value.mean()), self._evaluations)
            self._evaluations += 1

        return callback

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        self._rows, self._evaluations = [], 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        index = batch["index"]
        first = int(index[0]) if isinstance(index, Tensor) else int(index)
        has_target = torch.as_tensor(batch["has_target"], device=batch["source"].device).bool()
        names = list(batch["name"])
        out = self.translate(
            batch["source"],
            batch["target"],
            has_target,
            list(batch["prompt"]),
            list(batch["source_prompt"]),
            seed=self.seed + first,
            desc=names[0] if len(names) == 1 else f"batch {batch_idx}",
        )
        for i, name in enumerate(names):
            target = batch["target"][i] if has_target[i] else torch.zeros_like(batch["source"][i])
            row = torch.stack([batch["source"][i], target, out[i]]).float().cpu()
            self._rows.append((name, batch["prompt"][i], row))
        if self.output_dir is not None:
            self._write_results(out, names)
        return {"name": names, "result": out.float().cpu()}

    def _write_results(self, out: Tensor, names: list[str]) -> None:
        from torchvision.utils import save_image

        folder = self.output_dir / "results"
        folder.mkdir(parents=True, exist_ok=True)
        for image, name in zip(out.float().cpu(), names):
            save_image((image + 1) / 2, folder / f"{name}.png")

    def on_predict_epoch_end(self) -> None:
        if not self._rows:
            return
        from diffusion_lab.metrics.sample_grid import image_grid, save_image_grid

        images = torch.cat([row for _, _, row in self._rows])  # (3 n, C, H, W): source, target, result
        prompts = "\n".join(f"{name}: {prompt or '(target image)'}" for name, prompt, _ in self._rows)
        if self.output_dir is not None:
            save_image_grid(images, self.output_dir / "grid.png", nrow=3, upscale=self.grid_upscale)
            (self.output_dir / "prompts.txt").write_text(prompts + "\n")
        experiment = getattr(self.logger, "experiment", None) if self.logger else None
        if hasattr(experiment, "add_image"):
            experiment.add_image("diffuseit/grid", image_grid(images, 3, self.grid_upscale), 0)
            experiment.add_text("diffuseit/prompts", prompts.replace("\n", "  \n"), 0)


# ---------------------------------------------------------------------------------------------------
# Randomly initialised models of the real architectures (tests, timing benchmarks, smoke runs)
# ---------------------------------------------------------------------------------------------------
def tiny_adm_flags(resolution: int) -> dict[str, Any]:
    """guided-diffusion flags of a tiny ``256x256_diffusion_uncond`` (same blocks, 2 levels, width 32)."""
    return dict(
        image_size=resolution,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions=str(max(resolution // 2, 1)),
        num_head_channels=32,
    )


def tiny_dino_kwargs(resolution: int) -> dict[str, Any]:
    """timm kwargs of a tiny ``vit_base_patch8_224.dino`` (patch 8, 2 blocks, width 32)."""
    return dict(img_size=resolution, embed_dim=32, depth=2, num_heads=2)


def tiny_clip_config(resolution: int) -> dict[str, Any]:
    """open_clip config of a tiny ViT CLIP (patch 8, one layer each, embedding 16, CLIP's BPE vocabulary)."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": resolution, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def random_pretrained_models(
    size: Literal["tiny", "full"] = "tiny", resolution: int = 16, seed: int = 0
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(ADM denoiser, DINO ViT, CLIP) with seeded random weights: ``tiny`` (see the ``tiny_*`` settings) or
    ``full`` (``256x256_diffusion_uncond``, ViT-B/8, CLIP ViT-B/32: the paper's models without their weights).

    The ADM output layers, zero at initialisation, get small random values so that the denoiser is not the
    identity. The global random state is left untouched.
    """
    import open_clip
    import timm

    from diffusion_lab.nets.adm import from_preset
    from diffusion_lab.pretrained.clip import ClipEncoder
    from diffusion_lab.pretrained.dino import DinoViT
    from diffusion_lab.pretrained.guided_diffusion import adm_denoiser

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    tiny = size == "tiny"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = from_preset(
            "256x256_diffusion_uncond", **(tiny_adm_flags(resolution) if tiny else {}), use_fp16=False
        )
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
        vit_kwargs = tiny_dino_kwargs(resolution) if tiny else {}
        vit = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0, **vit_kwargs)
        cfg = tiny_clip_config(resolution) if tiny else dict(open_clip.get_model_config("ViT-B-32"))
        clip_model = open_clip.CLIP(**cfg, quick_gelu=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    return adm_denoiser(net.eval()), DinoViT(vit), ClipEncoder(clip_model, tokenizer)


__all__ = [
    "DiffuseIT",
    "PretrainedSpec",
    "prompt_templates",
    "random_pretrained_models",
    "tiny_adm_flags",
    "tiny_clip_config",
    "tiny_dino_kwargs",
]
