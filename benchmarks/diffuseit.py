"""DiffuseIT (docs/diffuseit.md): cost per translated image vs steps and resampling, and the content / style
trade-off of its losses on the project's digits model.

    python -m benchmarks diffuseit [-- --quick]

1. Cost: the real architectures (ADM ``256x256_diffusion_uncond``, DINO ViT-B/8, CLIP ViT-B/32) shrunk to a few
   layers with random weights (:func:`~diffusion_lab.methods.translation.random_pretrained_models`), text-guided
   translation of scikit-image's ``chelsea`` at 32x32 with every loss on: seconds per image, per guided
   evaluation, and the peak resident-memory increase, vs reverse steps and resampling repeats. Random weights
   cost the same as trained ones; the pictures they make are noise, so none is shown.
2. Content vs style: image-guided translation of 8x8 digits with the trained digits teacher (``digits_teacher``,
   run unconditionally) and a tiny random-weight DINO ViT (its keys and [CLS] are random features, not DINO's):
   pixel MSE and key-structure loss to the source (content) and pixel MSE and [CLS] loss to the target (style)
   for no losses (SDEdit: the same noising and reverse steps), content losses only, style losses only, and the
   paper's weights, at three overall weight scales; plus a picture grid. Quality at 256x256 needs the real
   weights (configs/translation/).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS_DIR, markdown_table, write_results
from diffusion_lab.diffusion.translation import DiffuseITObjective, TranslationConfig, diffuseit_translate
from diffusion_lab.diffusion.translation_losses import cls_loss, structure_loss


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cost_one(steps: int, repeats: int) -> dict:
    """One text-guided translation in this (fresh) process, after a one-evaluation warm-up: seconds, and the
    increase of the peak RSS over the warm-up and the run."""
    from diffusion_lab.data.pairs import TranslationPairs
    from diffusion_lab.methods.translation import random_pretrained_models

    res = 32
    denoiser, vit, clip = random_pretrained_models("tiny", res, seed=0)
    source = TranslationPairs([{"source": "skimage:chelsea", "prompt": "x"}], resolution=res).dataset[0][
        "source"
    ]
    cfg = TranslationConfig(respacing=100, skip=100 - steps, resample_steps=1, resample_count=repeats)
    generator = torch.Generator().manual_seed(0)
    objective = DiffuseITObjective(
        cfg,
        vit,
        source[None],
        clips=[clip],
        prompts=["a photo of a tiger"],
        source_prompts=["a photo of a cat"],
        generator=generator,
    )
    before = _max_rss_mib()
    warm = TranslationConfig(respacing=100, skip=99, resample_count=1)  # first-call costs out of the timing
    diffuseit_translate(denoiser, source[None], objective, warm, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    diffuseit_translate(denoiser, source[None], objective, generator=generator)
    seconds = time.perf_counter() - start
    return dict(
        steps=steps,
        resample=repeats,
        evaluations=cfg.evaluations,
        seconds=seconds,
        ms_per_evaluation=1000 * seconds / cfg.evaluations,
        peak_rss_mib=_max_rss_mib() - before,
    )


def cost_rows(quick: bool) -> list[dict]:
    """:func:`cost_one` per setting, each in a fresh process (the peak RSS of a process only grows)."""
    settings = [(6, 1), (12, 1), (24, 1), (12, 5), (12, 10)] if not quick else [(3, 1), (3, 3)]
    rows = []
    for steps, repeats in settings:
        code = f"import json, torch; torch.set_num_threads(1); from benchmarks.diffuseit import cost_one; " \
               f"print('RESULT', json.dumps(cost_one({steps}, {repeats})))"  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        row = json.loads(done.stdout.split("RESULT", 1)[1])
        rows.append(row)
        print(
            f"  steps={steps:<3} resample={repeats:<3} {row['seconds']:.2f} s/image, {row['peak_rss_mib']:.0f} MiB"
        )
    return rows


DIGIT_SETTINGS = {  # switched-off terms; the rest keep the paper's image-guided weights
    "content only": dict(cls_weight=0.0, target_mse_weight=0.0),
    "style only": dict(structure_weight=0.0, contrastive_weight=0.0),
    "DiffuseIT (paper weights)": {},
}
# The paper's weights are tuned for 3 x 256 x 256 images: a pixel-averaged loss has 3072x larger per-pixel
# gradients on a 1 x 8 x 8 digit, so the weights are scaled down (1/3072 ~ 3e-4 matches the pixel MSE terms).
SCALES = (3e-4, 3e-3, 3e-2)


def paper_weights(off: dict[str, float]) -> dict[str, float]:
    """The image-guided weights of TranslationConfig (structure 1000, contrastive 200, [CLS] 2000, target MSE
    3000, semantic 100, range 200), with the terms in ``off`` set to 0."""
    names = ("structure", "contrastive", "cls", "target_mse", "semantic", "range")
    defaults = TranslationConfig()
    return {f"{n}_weight": getattr(defaults, f"{n}_weight") for n in names} | off  # fmt: skip


def digit_rows(quick: bool) -> tuple[list[dict], torch.Tensor]:
    import timm

    from benchmarks._models import digits_teacher
    from diffusion_lab.data.digits import load_digits_tensors
    from diffusion_lab.methods.translation import tiny_dino_kwargs
    from diffusion_lab.pretrained.dino import DinoViT

    teacher = digits_teacher()
    denoiser = teacher.ema.averaged.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = DinoViT(
            timm.create_model(
                "vit_base_patch8_224.dino", pretrained=False, num_classes=0, **tiny_dino_kwargs(32)
            )
        ).requires_grad_(False)
    images, labels = load_digits_tensors()
    first = [int((labels == d).nonzero()[0]) for d in range(10)]
    pairs = [(0, 8), (1, 7), (3, 5), (4, 9)] if not quick else [(0, 8)]
    source = torch.stack([images[first[a]] for a, _ in pairs])
    target = torch.stack([images[first[b]] for _, b in pairs])
    cond = {"labels": torch.full((len(pairs),), teacher.null_label)}
    with torch.no_grad():
        src_feats, trg_feats = vit(source), vit(target)
    respacing, start = (25, 0.6) if not quick else (10, 0.6)
    skip = round(respacing * (1 - start))
    rows, results = [], {}
    runs = [("SDEdit (no losses)", 0.0)] + [(name, scale) for scale in SCALES for name in DIGIT_SETTINGS]
    for name, scale in runs:
        weights = {k: v * scale for k, v in paper_weights(DIGIT_SETTINGS.get(name, {})).items()}
        cfg = TranslationConfig(respacing=respacing, skip=skip, resample_steps=1, resample_count=10,
                                semantic_min_index=respacing // 2, **weights)  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        objective = DiffuseITObjective(cfg, vit, source, target_image=target, generator=generator)
        begin = time.perf_counter()
        out = diffuseit_translate(denoiser, source, objective, generator=generator, cond=cond)
        out = out.clamp(-1, 1)
        seconds = (time.perf_counter() - begin) / len(pairs)
        with torch.no_grad():
            feats = vit(out)
        row = dict(
            setting=name,
            weight_scale=scale,
            seconds_per_image=seconds,
            content_mse=float((out - source).pow(2).mean()),
            content_structure=float(structure_loss(feats.keys[-1], src_feats.keys[-1]).mean()),
            style_mse=float((out - target).pow(2).mean()),
            style_cls=float(cls_loss(feats.cls(-1), trg_feats.cls(-1)).mean()),
        )
        rows.append(row)
        results[(name, scale)] = out
        print(
            f"  {name:26s} x{scale:<6g} content mse {row['content_mse']:.3f} style mse {row['style_mse']:.3f}"
        )
    columns = [source, target, results[("SDEdit (no losses)", 0.0)]]
    columns += [results[("DiffuseIT (paper weights)", scale)] for scale in SCALES]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # rows: pairs; columns: source, target, results
    return rows, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("cost vs steps and resampling (tiny random architectures, 32x32)")
    cost = cost_rows(args.quick)
    print("content vs style (digits teacher, tiny random DINO)")
    digits, grid = digit_rows(args.quick)

    from diffusion_lab.metrics.sample_grid import save_image_grid

    save_image_grid(grid, RESULTS_DIR / "diffuseit.png", nrow=3 + len(SCALES), upscale=8)
    base = next(r for r in cost if r["resample"] == 1)
    ten = [r for r in cost if r["resample"] == max(c["resample"] for c in cost)][0]
    markdown = "\n\n".join(
        [
            "# DiffuseIT benchmark\n\n`python -m benchmarks diffuseit` (docs/diffuseit.md). CPU, one thread."
            + (" **Quick run.**" if args.quick else ""),
            "## Cost per translated image\n\nTiny random-weight versions of the paper's architectures (ADM "
            "256x256_diffusion_uncond, DINO ViT-B/8, CLIP ViT-B/32) at 32x32, text-guided, all losses on, 8 CLIP "
            "crops. One guided evaluation = one UNet forward and backward plus the ViT and CLIP losses. Peak "
            "memory: the increase of the process's peak resident set during the run (each setting in a fresh "
            "process, models already built).",
            markdown_table(
                [
                    "reverse steps",
                    "resample (1st step)",
                    "evaluations",
                    "s / image",
                    "ms / evaluation",
                    "peak RSS increase (MiB)",
                ],
                [
                    [
                        r["steps"],
                        r["resample"],
                        r["evaluations"],
                        r["seconds"],
                        r["ms_per_evaluation"],
                        r["peak_rss_mib"],
                    ]
                    for r in cost
                ],
            ),  # fmt: skip
            f"Time grows with the evaluations (steps + (repeats - 1) for the resampled first step): "
            f"{ten['evaluations']} vs {base['evaluations']} evaluations cost "
            f"{ten['seconds'] / base['seconds']:.2f}x. The paper's setting (60 steps, 10 repeats: 69 "
            "evaluations) at 256x256 with the real models needs a GPU (the paper: about 40 s per image on an "
            "RTX 3090 with five CLIP models); no GPU was available for this run."
            " The 2 CPU cores were shared with other jobs during the run: the spread of ms / evaluation between "
            "rows is timing noise; the cost of one evaluation does not depend on the setting.",
            "## Content vs style on the digits model\n\nImage-guided translation of four 8x8 digit pairs "
            "(source -> target: 0->8, 1->7, 3->5, 4->9) with the trained digits teacher (unconditional, null "
            "label) and a tiny **random-weight** DINO ViT (keys and [CLS] are random features), 25 respaced "
            "steps with the first 10 skipped (start 0.6, as the paper's 40 of 100), the first reverse step "
            "resampled 10 times. Weights: the paper's image-guided ones (structure 1000, contrastive 200, [CLS] "
            "2000, target MSE 3000, semantic 100, range 200) times the scale, with the named terms switched off. "
            "The paper's weights are tuned for 3x256x256 images; a pixel-averaged loss has 3072x larger "
            "per-pixel gradients on 1x8x8, hence the scales. Content: pixel MSE and key self-similarity "
            "(structure) loss to the source; style: pixel MSE and [CLS] loss to the target (lower is closer). "
            "SDEdit: the same noising and reverse steps without any loss. A random-weight ViT's [CLS] token "
            "hardly depends on the input (values ~1e-6): that column is not informative; the pixel MSEs are.",
            markdown_table(
                [
                    "setting",
                    "weight scale",
                    "content MSE",
                    "content structure",
                    "style MSE",
                    "style [CLS]",
                    "s / image",
                ],
                [
                    [
                        r["setting"],
                        r["weight_scale"],
                        r["content_mse"],
                        r["content_structure"],
                        r["style_mse"],
                        r["style_cls"],
                        r["seconds_per_image"],
                    ]
                    for r in digits
                ],
            ),  # fmt: skip
            "![grid](diffuseit.png)\n\nRows: the four pairs; columns: source | target | SDEdit | DiffuseIT "
            f"(paper weights) at scales {', '.join(f'{x:g}' for x in SCALES)}; upscaled 8x.",
        ]
    )
    headline = {
        "cost": cost,
        "digits": digits,
        "resample_time_ratio": ten["seconds"] / base["seconds"],
    }
    print(write_results("diffuseit", markdown, headline))


if __name__ == "__main__":
    main()
