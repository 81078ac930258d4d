"""DiffuseIT on real pictures: scikit-image's bundled photographs translated with the project's RGB prior.

    python -m benchmarks diffuseit_pictures [-- --dino PATH --clip PATH --quick]

The diffusion model is the project's own (``benchmarks._rgb_prior.rgb_prior``: unconditional EDM UNet trained on
32x32 crops of scikit-image's colour photographs, modest quality), run by the ``DiffuseIT`` LightningModule
(``methods/translation.py``) at 32x32. Image-guided pairs (``astronaut`` content with ``chelsea`` / ``coffee``
style, ``chelsea`` with ``coffee``) and text-guided pairs (``chelsea`` -> "a photo of a tiger", ``coffee`` ->
"a watercolor painting") are translated with: no losses (SDEdit: the same noising and reverse steps) and the
paper's weights times overall scales (they are tuned for 3x256x256; the pixel-averaged terms have 64x larger
per-pixel gradients at 32x32).

**No pretrained DINO or CLIP weights exist on this machine**: unless ``--dino`` / ``--clip`` name local weight
files (DINO ViT-B/8 ``dino_vitbase8_pretrain.pth``, CLIP ViT-B/32 ``open_clip_model.safetensors``), the losses
use seeded **random-weight** tiny versions of those architectures (``random_pretrained_models``): their keys are
random features (the structure losses still compare spatial layouts), their [CLS] and CLIP embeddings carry no
semantics, so the text-guided rows are not a test of text guidance. Reported per pair, before (the source
image) and after (the result): content = key self-similarity (structure) loss and pixel MSE to the source;
style = [CLS] loss and pixel MSE to the target image (image-guided) or the CLIP global loss to the target
direction (text-guided).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, write_results
from benchmarks._rgb_prior import rgb_prior
from diffusion_lab.data.pairs import TranslationPairs
from diffusion_lab.diffusion.translation import DiffuseITObjective, TranslationConfig
from diffusion_lab.diffusion.translation_losses import cls_loss, pixel_mse, structure_loss
from diffusion_lab.methods.conditional_sampling import prior_denoiser
from diffusion_lab.methods.translation import DiffuseIT, PretrainedSpec, random_pretrained_models

PAIRS = [
    {"source": "skimage:astronaut", "target": "skimage:chelsea", "name": "astronaut_to_chelsea"},
    {"source": "skimage:astronaut", "target": "skimage:coffee", "name": "astronaut_to_coffee"},
    {"source": "skimage:chelsea", "target": "skimage:coffee", "name": "chelsea_to_coffee"},
    {"source": "skimage:chelsea", "prompt": "a photo of a tiger", "source_prompt": "a photo of a cat",
     "name": "chelsea_tiger"},
    {"source": "skimage:coffee", "prompt": "a watercolor painting of a cup", "source_prompt": "a photo of a cup",
     "name": "coffee_watercolor"},
]  # fmt: skip
RESOLUTION = 32


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino", help="local DINO ViT-B/8 weights (default: a random-weight tiny ViT)")
    parser.add_argument("--clip", help="local CLIP ViT-B/32 weights (default: a random-weight tiny CLIP)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1 / 64, 1 / 8], help="weight scales")
    parser.add_argument("--respacing", type=int, default=50)
    parser.add_argument(
        "--skip", type=int, default=20, help="skipped respaced steps (start 0.6 as 40 of 100)"
    )
    parser.add_argument("--resample", type=int, default=10, help="repeats of the first reverse step")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 3-step prior and 6 steps")
    args = parser.parse_args()
    if args.quick:
        args.respacing, args.skip, args.resample, args.scales = 10, 4, 2, args.scales[:1]
    return args


def loss_models(dino: str | None, clip: str | None) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(ViT, CLIP, description): local real weights where given, else the seeded random tiny models."""
    _, vit, clip_model = random_pretrained_models("tiny", RESOLUTION, seed=0)
    kinds = ["DINO ViT: random-weight tiny ViT-B/8 (2 blocks, width 32)"]
    if dino:
        vit, kinds[0] = (
            PretrainedSpec("dino/vit_base_patch8_224.dino", dino).load(),
            f"DINO ViT-B/8 from {dino}",
        )
    kinds.append("CLIP: random-weight tiny ViT CLIP (1 layer, width 32)")
    if clip:
        clip_model, kinds[1] = PretrainedSpec("clip/ViT-B-32", clip).load(), f"CLIP ViT-B/32 from {clip}"
    return vit.eval().requires_grad_(False), clip_model.eval().requires_grad_(False), "; ".join(kinds)


def scaled_config(args: argparse.Namespace, scale: float) -> TranslationConfig:
    """The paper's text- and image-guided weights (TranslationConfig defaults) times ``scale``."""
    defaults = TranslationConfig()
    weights = {f.name: getattr(defaults, f.name) * scale for f in dataclasses.fields(defaults)
               if f.name.endswith("_weight")}  # fmt: skip
    return TranslationConfig(respacing=args.respacing, skip=args.skip, resample_steps=1,
                             resample_count=args.resample, semantic_min_index=args.respacing // 2,
                             source_mse_min_index=args.respacing // 2, clip_crops=4, **weights)  # fmt: skip


@torch.no_grad()
def measure(images: torch.Tensor, batch: dict, vit, clip) -> list[dict[str, float]]:
    """Content and style losses of ``images`` for each pair (unweighted; see the module docstring)."""
    source, target, has_target = batch["source"], batch["target"], batch["has_target"].bool()
    probe = DiffuseITObjective(TranslationConfig(), vit, source, target_image=target, image_mask=has_target,
                               clips=[clip], prompts=list(batch["prompt"]),
                               source_prompts=list(batch["source_prompt"]))  # fmt: skip
    feats = vit(images, blocks=probe.blocks)
    keys, cls = feats.keys[-1], feats.cls(-1)
    rows = []
    clip_emb = clip.encode_image(images).float()
    for i in range(len(images)):
        row = {
            "structure": float(structure_loss(keys[i : i + 1], probe.source_keys[i : i + 1])),
            "mse_source": float(pixel_mse(images[i : i + 1], source[i : i + 1])),
        }
        if has_target[i]:
            row["cls"] = float(cls_loss(cls[i : i + 1], probe.target_cls[i : i + 1]))
            row["mse_target"] = float(pixel_mse(images[i : i + 1], target[i : i + 1]))
        else:
            j = int((probe.text_rows == i).nonzero())
            row["clip"] = float(-(clip_emb[i] * probe.clip_state[0]["target"][j]).sum())
        rows.append(row)
    return rows


def main() -> None:
    args = _options()
    torch.set_num_threads(1)
    trained = rgb_prior("rgb_prior_quick", ["--trainer.max_steps=3"]) if args.quick else rgb_prior()
    denoiser = prior_denoiser(trained).eval().requires_grad_(False)
    vit, clip, models = loss_models(args.dino, args.clip)
    data = TranslationPairs(PAIRS, resolution=RESOLUTION, batch_size=len(PAIRS))
    batch = next(iter(data.predict_dataloader()))
    source, target, has_target = batch["source"], batch["target"], batch["has_target"].bool()

    settings = [("SDEdit (no losses)", 0.0)] + [(f"DiffuseIT x{s:.3g}", s) for s in args.scales]
    before = measure(source, batch, vit, clip)
    results, rows, timings = {}, [], {}
    for name, scale in settings:
        cfg = scaled_config(args, scale)
        module = DiffuseIT(denoiser=denoiser, vit_model=vit, clip_models=[clip], translation=cfg,
                           text_templates="single", output_dir=None, progress=False)  # fmt: skip
        start = time.perf_counter()
        out = module.translate(
            source, target, has_target, list(batch["prompt"]), list(batch["source_prompt"])
        )
        timings[name] = (time.perf_counter() - start) / len(source)
        results[name] = out
        for pair, b, a in zip(PAIRS, before, measure(out, batch, vit, clip)):
            rows.append({"pair": pair["name"], "setting": name, "scale": scale, "before": b, "after": a})
        print(f"  {name}: {timings[name]:.2f} s / image", flush=True)

    from diffusion_lab.metrics.sample_grid import save_image_grid

    shown_target = torch.where(has_target[:, None, None, None], target, torch.zeros_like(target))
    columns = [source, shown_target] + [results[name] for name, _ in settings]
    save_image_grid(
        torch.stack(columns, 1).flatten(0, 1), RESULTS_DIR / "diffuseit_pictures.png", len(columns), 4
    )

    def style(r: dict) -> str:
        return f"[CLS] {r['cls']:.3g}, MSE {r['mse_target']:.3f}" if "cls" in r else f"CLIP {r['clip']:.3f}"

    table = markdown_table(
        ["pair", "setting", "content after: structure / MSE to source", "style before", "style after"],
        [[r["pair"], r["setting"], f"{r['after']['structure']:.3g} / {r['after']['mse_source']:.3f}",
          style(r["before"]), style(r["after"])] for r in rows],
    )  # fmt: skip
    cfg = scaled_config(args, 1.0)
    markdown = f"""# DiffuseIT on scikit-image pictures{" **(quick smoke run: untrained prior)**" if args.quick else ""}

`python -m benchmarks diffuseit_pictures` (docs/diffuseit.md). CPU, one thread, 32x32.

- Diffusion model: the project's RGB prior (configs/diffusion/skimage_rgb.yaml, `benchmarks/_rgb_prior.py`;
  unconditional EDM, trained {"3 steps (smoke)" if args.quick else "400 steps at batch 16 on one CPU core"}), run on
  the DDPM grid of the 1000-step linear schedule respaced to {args.respacing} steps, the first {args.skip}
  skipped ({cfg.steps} reverse steps), the first reverse step resampled {args.resample} times:
  {cfg.evaluations} guided evaluations per image.
- Loss networks: {models}. **Random-weight ViTs unless weight paths are given**: [CLS] and CLIP values then
  measure agreement in a random feature space, and the text-guided rows do not test text guidance.
- Weights: the paper's (structure 1000, contrastive 200, [CLS] 2000, target pixel MSE 3000, CLIP 2000,
  semantic divergence 100, range 200) times the scale; SDEdit has every weight 0. 4 CLIP crops, single prompt
  template, no colour transfer.
- Seconds per image: {", ".join(f"{k} {v:.2f}" for k, v in timings.items())}.

![grid](diffuseit_pictures.png)

Rows: {", ".join(p["name"] for p in PAIRS)}. Columns: source | target image (grey for a text prompt) |
{" | ".join(name for name, _ in settings)}; upscaled 4x.

Losses (unweighted). Content before = 0 by definition (the source itself); style before = the source's.

{table}
"""
    headline = {"settings": dict(settings), "seconds_per_image": timings, "losses": rows, "models": models,
                "respacing": args.respacing, "skip": args.skip, "resample": args.resample}  # fmt: skip
    print(write_results("diffuseit_pictures", markdown, headline).read_text())


if __name__ == "__main__":
    main()
