"""DiffuseIT (Kwon & Ye, ICLR 2023): image translation by loss-guided reverse diffusion from the noised source.

The source ``x_src`` is noised to the start level of a respaced discrete grid (``respacing`` steps, the first
``skip`` skipped), ``x = x_src + sigma_start eps``, and then reversed with DDPM ancestral steps of an
unconditional model. At every step the gradient of the total loss :class:`DiffuseITObjective` on the denoised
estimate ``x0_hat = D(x, sigma)`` (taken through the denoiser) moves the posterior mean, scaled by the
posterior variance (guided-diffusion's ``condition_mean``, Dhariwal & Nichol 2021 Alg. 1)::

    mu_vp' = mu_vp - Var_vp * grad_{x_vp} L(x0_hat)

In the VE view (``x = x_vp / sqrt(abar)``, ``sigma^2 = (1 - abar) / abar``) with ``g = grad_x L``::

    x_next = mean + sigma_up z - c g,      c = Var_vp * sqrt((1 + sigma^2)(1 + sigma_next^2))

which :class:`~diffusion_lab.diffusion.guidance.LossGuidance` realises with the scale
``c / ((1 - sigma_down / sigma) sigma^2)`` inside the DDPM step of
:func:`~diffusion_lab.diffusion.samplers.ddpm_levels`. So the paper's loss weights keep their meaning. The
variance is the DDPM posterior's (``small``) or ``beta`` (``large``); at the last step (``sigma_next = 0``)
guided-diffusion's clipped log-variance uses the previous step's posterior variance, and so does this code.
(The ADM checkpoints learn the variance between these two; the denoiser contract does not expose it.)

Resampling (sec. 3.4): at each of the first ``resample_steps`` reverse steps the guided step is taken
``resample_count`` times, the result re-noised in between by the exact forward transition
``x <- x_next + sqrt(sigma^2 - sigma_next^2) z`` (``sqrt(1 - beta) x + sqrt(beta) eps`` in the VP view; the
public code uses the beta of the following step). The semantic divergence term is active while the respaced
step index ``respacing - 1 - position`` is above ``semantic_min_index``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.denoiser import DenoiserFn
from diffusion_lab.diffusion.guidance import LossGuidance
from diffusion_lab.diffusion.samplers import ddpm_levels
from diffusion_lab.diffusion.samplers._base import randn_like
from diffusion_lab.diffusion.schedules import DiscreteVP, Spacing
from diffusion_lab.diffusion.translation_losses import (
    augment_crops,
    clip_directional_loss,
    clip_global_loss,
    clip_target_embedding,
    cls_loss,
    noisy_mix,
    patch_contrastive_loss,
    pixel_mse,
    range_loss,
    semantic_divergence_loss,
    structure_loss,
)

Variance = Literal["small", "large"]


@dataclass
class TranslationConfig:
    """DiffuseIT's settings (YAML ``translation:``). Defaults: the public code's ImageNet 256 text-guided run.

    Steps: ``respacing`` respaced steps of the 1000-step model, the first ``skip`` skipped (60 reverse steps);
    ``resample_steps`` first reverse steps are each taken ``resample_count`` times. ``variance``: DDPM
    posterior (``small``) or ``beta`` (``large``).

    Weights: ``structure`` (key self-similarity, 1000), ``contrastive`` (patch InfoNCE, 200, temperature 0.07),
    ``cls`` ([CLS] to the target image, 2000), ``target_mse`` (pixels to the target image, 3000), ``clip``
    (global CLIP to the combined target, 2000; ``clip_lambda_source_text`` 0.4 and
    ``clip_lambda_source_image`` 0.2 form it), ``clip_directional`` (NADA directional loss, 0 in the paper's
    runs), ``semantic`` (semantic divergence, 100, while the step index > ``semantic_min_index``), ``range``
    (200), ``source_mse`` (pixels to the source while the step index > ``source_mse_min_index``; 0).

    ViT: keys of block ``key_block`` and [CLS] of block ``cls_block`` (-1: the last); ``vit_noisy_mix`` /
    ``clip_noisy_mix`` feed :func:`noisy_mix` of ``x0_hat`` and ``x_t`` instead of ``x0_hat`` to the ViT
    losses / CLIP (the public code's ``--use_noise_aug_all`` / always). ``clip_crops`` augmented crops.

    Public-code options: ``contrastive_boost`` multiplies the contrastive weight while the last CLIP loss is
    below ``contrastive_boost_below`` (``--regularize_content``: 2 below -0.5; None: off);
    ``restart_range_threshold``: restart the run from fresh noise when a weighted range term exceeds it after
    the first step (``--use_range_restart``: 0.01), at most ``max_restarts`` times.
    """

    respacing: int = 100
    skip: int = 40
    spacing: Spacing = "linspace"
    variance: Variance = "small"
    resample_steps: int = 1
    resample_count: int = 10
    structure_weight: float = 1000.0
    contrastive_weight: float = 200.0
    contrastive_temperature: float = 0.07
    cls_weight: float = 2000.0
    target_mse_weight: float = 3000.0
    clip_weight: float = 2000.0
    clip_directional_weight: float = 0.0
    clip_lambda_source_text: float = 0.4
    clip_lambda_source_image: float = 0.2
    clip_crops: int = 8
    semantic_weight: float = 100.0
    semantic_min_index: int = 50
    range_weight: float = 200.0
    source_mse_weight: float = 0.0
    source_mse_min_index: int = 50
    key_block: int = -1
    cls_block: int = -1
    vit_noisy_mix: bool = True
    clip_noisy_mix: bool = True
    contrastive_boost: float = 2.0
    contrastive_boost_below: float | None = None
    restart_range_threshold: float | None = None
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.respacing, int) or self.respacing < 1:
            raise ValueError(f"respacing must be an integer >= 1, got {self.respacing!r}")
        if not isinstance(self.skip, int) or not 0 <= self.skip < self.respacing:
            raise ValueError(f"skip must be an integer in [0, respacing={self.respacing}), got {self.skip!r}")
        if self.variance not in ("small", "large"):
            raise ValueError(f"variance must be 'small' or 'large', got {self.variance!r}")
        if self.resample_steps < 0 or self.resample_count < 1:
            raise ValueError(
                f"need resample_steps >= 0 and resample_count >= 1, got {self.resample_steps}, {self.resample_count}"
            )
        if self.clip_crops < 1 or self.max_restarts < 0 or not self.contrastive_temperature > 0:
            raise ValueError(
                f"need clip_crops >= 1, max_restarts >= 0, contrastive_temperature > 0; got {self.clip_crops}, "
                f"{self.max_restarts}, {self.contrastive_temperature}"
            )
        for name, value in vars(self).items():
            if name.endswith("_weight") and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def steps(self) -> int:
        """Reverse steps of one run: ``respacing - skip``."""
        return self.respacing - self.skip

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations (each with one backward) of one run without restarts."""
        return self.steps + min(self.resample_steps, self.steps) * (self.resample_count - 1)


# ---------------------------------------------------------------------------------------------------
# Grid and step coefficients
# ---------------------------------------------------------------------------------------------------
def translation_sigmas(denoiser: DenoiserFn, respacing: int, spacing: Spacing = "linspace") -> Tensor:
    """The respaced grid (descending, float64, ending with 0) of a discrete model (its own ``respaced_sigmas``),
    else of guided-diffusion's linear 1000-step schedule (betas 1e-4..0.02)."""
    if hasattr(denoiser, "respaced_sigmas"):
        return denoiser.respaced_sigmas(respacing, spacing).double()
    return DiscreteVP().respaced_sigmas(respacing, spacing)


def guidance_variances(sigmas: Sequence[float], variance: Variance = "small") -> list[float]:
    """VP variance ``Var_vp`` that scales the guidance at each step ``sigmas[i] -> sigmas[i + 1]``.

    ``beta = (s^2 - s'^2) / (1 + s^2)`` (large) or the posterior ``beta (1 - abar') / (1 - abar) =
    (s^2 - s'^2) s'^2 / (s^2 (1 + s'^2))`` (small); the last step of the small variance reuses the step
    before (guided-diffusion's clipped log-variance).
    """
    out = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        beta = (s**2 - s_next**2) / (1 + s**2)
        out.append(beta if variance == "large" else beta * s_next**2 / s**2 * (1 + s**2) / (1 + s_next**2))
    if variance == "small" and len(out) > 1 and sigmas[-1] == 0:
        out[-1] = out[-2]
    return out


# ---------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------
def encode_prompts(clip: Any, prompts: Sequence[str], templates: Sequence[str] = ("{}",)) -> Tensor:
    """Unit text embeddings (B, E): each prompt formatted with every template, embeddings averaged, renormalised
    (CLIP's prompt ensembling). ``clip.encode_text(list[str]) -> (N, E)`` unit vectors."""
    texts = [template.format(prompt) for prompt in prompts for template in templates]
    emb = clip.encode_text(texts).float().reshape(len(prompts), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def _image_size(encoder: Any) -> tuple[int, int]:
    size = encoder.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


class DiffuseITObjective:
    """The total DiffuseIT loss on ``x0_hat`` for a batch of sources, per sample (B,).

    Call :meth:`reset` at the start of a run and :meth:`begin_step` (the respaced step index) before each
    evaluation; the object is the ``loss_fn`` of :class:`~diffusion_lab.diffusion.guidance.LossGuidance`.
    After each call, ``terms`` holds the weighted per-sample terms (detached) and ``x0_hat`` the estimate.

    Args:
        config: weights and switches.
        vit: ``vit(images in [-1, 1], blocks=...) -> features`` with ``.keys[block]`` (B, T, D) and
            ``.cls(block)`` (B, D) (:class:`~diffusion_lab.pretrained.dino.DinoViT`).
        source: (B, C, H, W) source images in [-1, 1].
        target_image: (B, C, H, W) style targets (image-guided); rows with ``image_mask`` False are ignored.
        image_mask: (B,) which rows are image-guided (default: all when ``target_image`` is given).
        clips: CLIP encoders (``encode_image``, ``encode_text``, ``image_size``); losses are averaged over them.
        prompts, source_prompts: target / source text per row ("" = not text-guided).
        templates: prompt templates with ``{}`` (e.g. the 80 ImageNet templates).
        generator: random source of the CLIP crops.
    """

    def __init__(
        self,
        config: TranslationConfig,
        vit: Callable[..., Any],
        source: Tensor,
        *,
        target_image: Tensor | None = None,
        image_mask: Tensor | None = None,
        clips: Sequence[Any] = (),
        prompts: Sequence[str] | None = None,
        source_prompts: Sequence[str] | None = None,
        templates: Sequence[str] = ("{}",),
        generator: torch.Generator | None = None,
    ) -> None:
        b = source.shape[0]
        self.config, self.vit, self.clips, self.generator = config, vit, list(clips), generator
        self.source = source.detach()
        self.blocks = tuple(sorted({config.key_block, config.cls_block}))
        device = source.device
        self.image_mask = torch.zeros(b, dtype=torch.bool, device=device)
        if target_image is not None:
            if target_image.shape != source.shape:
                raise ValueError(
                    f"target_image {tuple(target_image.shape)} must match source {tuple(source.shape)}"
                )
            self.image_mask = (
                torch.ones_like(self.image_mask) if image_mask is None else image_mask.to(device).bool()
            )
        self.target_image = (
            target_image.detach() if target_image is not None else torch.zeros_like(self.source)
        )
        prompts = list(prompts) if prompts is not None else [""] * b
        source_prompts = list(source_prompts) if source_prompts is not None else [""] * b
        if len(prompts) != b or len(source_prompts) != b:
            raise ValueError(
                f"need one prompt and one source prompt per image ({b}), got {len(prompts)}, {len(source_prompts)}"
            )
        self.text_rows = torch.tensor(
            [i for i, p in enumerate(prompts) if p], dtype=torch.long, device=device
        )
        if len(self.text_rows) and not self.clips:
            raise ValueError("text prompts were given but no CLIP encoder: pass clips=[...]")
        with torch.no_grad():
            feats = vit(self.source, blocks=self.blocks)
            self.source_keys = feats.keys[config.key_block].detach()
            self.source_cls = feats.cls(config.cls_block).detach()
            self.target_cls = torch.zeros_like(self.source_cls)
            if self.image_mask.any():
                rows = self.image_mask.nonzero().flatten()
                self.target_cls[rows] = vit(self.target_image[rows], blocks=self.blocks).cls(config.cls_block)
            self._clip_setup([prompts[i] for i in self.text_rows.tolist()],
                             [source_prompts[i] for i in self.text_rows.tolist()], templates)  # fmt: skip
        self.reset()

    def _clip_setup(self, prompts: list[str], source_prompts: list[str], templates: Sequence[str]) -> None:
        """Per CLIP model: target text, source text, source image embeddings and the combined target (text rows)."""
        self.clip_state: list[dict[str, Tensor]] = []
        if not prompts:
            return
        sources = self.source[self.text_rows]
        for clip in self.clips:
            target_text = encode_prompts(clip, prompts, templates)
            has_source = torch.tensor([bool(p) for p in source_prompts], device=target_text.device)[:, None]
            source_text = (
                encode_prompts(clip, [p or "a photo" for p in source_prompts], templates) * has_source
            )
            source_image = clip.encode_image(sources).float()
            target = clip_target_embedding(
                target_text,
                source_text,
                source_image,
                self.config.clip_lambda_source_text,
                self.config.clip_lambda_source_image,
            )
            state = dict(
                target_text=target_text, source_text=source_text, source_image=source_image, target=target
            )
            self.clip_state.append(state)

    def reset(self) -> None:
        """Start of a run: the previous [CLS] is the source's, the previous CLIP loss that of the source image."""
        self.index = self.config.respacing - 1
        self.previous_cls = self.source_cls.clone()
        self.last_clip_loss = torch.zeros(self.source.shape[0], device=self.source.device)
        if self.clip_state:
            raw = torch.stack([-(s["source_image"] * s["target"]).sum(-1) for s in self.clip_state]).mean(0)
            self.last_clip_loss[self.text_rows] = raw
        self.terms: dict[str, Tensor] = {}
        self.x0_hat: Tensor | None = None

    def begin_step(self, index: int) -> None:
        """The respaced step index (``respacing - 1`` at the noisiest level) of the next evaluation."""
        self.index = index

    def _clip_terms(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(global, directional) CLIP losses of the text rows, averaged over the CLIP models."""
        global_loss, directional = [], []
        for clip, state in zip(self.clips, self.clip_state):
            crops = augment_crops(images, self.config.clip_crops, _image_size(clip), self.generator)
            emb = clip.encode_image(crops).float().reshape(images.shape[0], self.config.clip_crops, -1)
            global_loss.append(clip_global_loss(emb, state["target"]))
            if self.config.clip_directional_weight > 0:
                directional.append(
                    clip_directional_loss(
                        emb, state["source_image"], state["target_text"], state["source_text"]
                    )
                )
        zero = torch.zeros_like(global_loss[0])
        return torch.stack(global_loss).mean(0), torch.stack(directional).mean(0) if directional else zero

    def __call__(self, x0_hat: Tensor, *, x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        cfg, b = self.config, x0_hat.shape[0]
        self.x0_hat = x0_hat.detach()
        terms: dict[str, Tensor] = {}
        vit_in = noisy_mix(x0_hat, x, sigma) if cfg.vit_noisy_mix else x0_hat
        feats = self.vit(vit_in, blocks=self.blocks)
        keys, cls = feats.keys[cfg.key_block], feats.cls(cfg.cls_block)
        if cfg.structure_weight:
            terms["structure"] = cfg.structure_weight * structure_loss(keys, self.source_keys)
        if cfg.contrastive_weight:
            boost = torch.ones_like(self.last_clip_loss)
            if cfg.contrastive_boost_below is not None:
                boost[self.last_clip_loss < cfg.contrastive_boost_below] = cfg.contrastive_boost
            contrastive = patch_contrastive_loss(keys, self.source_keys, cfg.contrastive_temperature)
            terms["contrastive"] = cfg.contrastive_weight * boost * contrastive
        if cfg.semantic_weight and self.index > cfg.semantic_min_index:
            terms["semantic"] = cfg.semantic_weight * semantic_divergence_loss(cls, self.previous_cls)
        if self.image_mask.any():
            mask = self.image_mask.to(x0_hat.dtype)
            if cfg.cls_weight:
                terms["cls"] = cfg.cls_weight * mask * cls_loss(cls, self.target_cls)
            if cfg.target_mse_weight:
                terms["target_mse"] = cfg.target_mse_weight * mask * pixel_mse(vit_in, self.target_image)
        if len(self.text_rows):
            clip_in = noisy_mix(x0_hat, x, sigma) if cfg.clip_noisy_mix else x0_hat
            global_loss, directional = self._clip_terms(clip_in[self.text_rows])
            self.last_clip_loss = self.last_clip_loss.clone()
            self.last_clip_loss[self.text_rows] = global_loss.detach()
            if cfg.clip_weight:
                terms["clip"] = x0_hat.new_zeros(b).index_put(
                    (self.text_rows,), cfg.clip_weight * global_loss
                )
            if cfg.clip_directional_weight:
                weighted = cfg.clip_directional_weight * directional
                terms["clip_directional"] = x0_hat.new_zeros(b).index_put((self.text_rows,), weighted)
        if cfg.range_weight:
            terms["range"] = cfg.range_weight * range_loss(x0_hat)
        if cfg.source_mse_weight and self.index > cfg.source_mse_min_index:
            terms["source_mse"] = cfg.source_mse_weight * pixel_mse(x0_hat, self.source)
        self.previous_cls = cls.detach()
        self.terms = {k: v.detach() for k, v in terms.items()}
        # no active term: a zero that is still a function of x0_hat (a zero gradient, not an autograd error)
        return sum(terms.values()) if terms else x0_hat.flatten(1).sum(1) * 0


# ---------------------------------------------------------------------------------------------------
# The reverse loop
# ---------------------------------------------------------------------------------------------------
def _reverse_run(
    guided: LossGuidance,
    source: Tensor,
    grid: list[float],
    config: TranslationConfig,
    attempt: int,
    generator: torch.Generator | None,
    callback: Callable[[dict[str, Any]], None] | None,
    cond: dict[str, Any],
) -> tuple[Tensor, bool]:
    """One run from the noised source to sigma = 0; returns (x, restart requested)."""
    objective: DiffuseITObjective = guided.loss_fn  # type: ignore[assignment]
    objective.reset()
    variances = guidance_variances(grid, config.variance)
    b, n = source.shape[0], config.respacing
    x = source + grid[config.skip] * randn_like(source, generator)
    for position in range(config.skip, n):
        sigma, sigma_next = grid[position], grid[position + 1]
        down, up = ddpm_levels(sigma, sigma_next, config.variance)
        # LossGuidance returns D - scale sigma^2 g and the step keeps (1 - down / sigma) of D: shift = -c g
        c = variances[position] * math.sqrt((1 + sigma**2) * (1 + sigma_next**2))
        guided.scale = c / ((1 - down / sigma) * sigma**2)
        level = torch.full((b,), sigma, device=source.device, dtype=torch.float32)
        repeats = config.resample_count if position - config.skip < config.resample_steps else 1
        for repeat in range(repeats):
            objective.begin_step(n - 1 - position)
            denoised = guided(x, level, **cond)
            x_next = denoised + (down / sigma) * (x - denoised)
            if up > 0:
                x_next = x_next + up * randn_like(x, generator)
            if callback is not None:
                callback(
                    dict(position=position, index=n - 1 - position, repeat=repeat, attempt=attempt, x=x_next,
                         x0=objective.x0_hat, sigma=sigma, sigma_next=sigma_next, terms=objective.terms)
                )  # fmt: skip
            if repeat < repeats - 1:  # RePaint-style: back to this step's level, then the step again
                x_next = x_next + math.sqrt(sigma**2 - sigma_next**2) * randn_like(x, generator)
            x = x_next
        threshold = config.restart_range_threshold
        if threshold is not None and position > config.skip and attempt < config.max_restarts:
            if (objective.terms.get("range", torch.zeros(())) > threshold).any():
                return x, True
    return x, False


@torch.no_grad()
def diffuseit_translate(
    denoiser: DenoiserFn,
    source: Tensor,
    objective: DiffuseITObjective,
    config: TranslationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Translate ``source`` (B, C, H, W) in [-1, 1] with DiffuseIT; returns the final sample (B, C, H, W).

    ``callback(dict(position, index, repeat, attempt, x, x0, sigma, sigma_next, terms))`` runs after every
    guided evaluation (``config.evaluations`` per run). ``generator`` draws the start, step and re-noising
    noise (pass the objective's crop generator too, so that one seed fixes the whole run). With
    ``restart_range_threshold`` a run whose weighted range term exceeds it after the first step starts over
    from fresh noise, at most ``max_restarts`` times (the last run always finishes).
    """
    config = objective.config if config is None else config
    if source.ndim != 4 or not source.is_floating_point():
        raise ValueError(
            f"source must be a float tensor (B, C, H, W), got {getattr(source, 'shape', type(source))}"
        )
    grid = translation_sigmas(denoiser, config.respacing, config.spacing).tolist()
    guided = LossGuidance(denoiser, objective, scale=0.0)
    for attempt in range(config.max_restarts + 1):
        x, restart = _reverse_run(
            guided, source, grid, config, attempt, generator, callback, dict(cond or {})
        )
        if not restart:
            break
    return x


# ---------------------------------------------------------------------------------------------------
# Optional colour transfer (the public code's image-guided post-processing)
# ---------------------------------------------------------------------------------------------------
def _sqrtm_psd(matrix: Tensor, inverse: bool = False) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(1e-10)
    power = values.rsqrt() if inverse else values.sqrt()
    return (vectors * power[..., None, :]) @ vectors.transpose(-1, -2)


def color_transfer_mkl(images: Tensor, references: Tensor, eps: float = 1e-6) -> Tensor:
    """Monge-Kantorovich linear colour transfer (Pitie & Kokaram 2007): per image, the affine map of the
    pixel colours ``y = mu_r + T (x - mu_x)`` with ``T = C_x^{-1/2} (C_x^{1/2} C_r C_x^{1/2})^{1/2} C_x^{-1/2}``,
    which gives the output the reference's colour mean and covariance. (B, C, H, W) -> (B, C, H, W)."""
    if images.ndim != 4 or references.shape[:2] != images.shape[:2]:
        raise ValueError(
            f"expected (B, C, H, W) images and references, got {tuple(images.shape)}, {tuple(references.shape)}"
        )
    x = images.double().flatten(2)  # (B, C, N)
    r = references.double().flatten(2)
    eye = eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    mu_x, mu_r = x.mean(-1, keepdim=True), r.mean(-1, keepdim=True)
    xc, rc = x - mu_x, r - mu_r
    cov_x = xc @ xc.transpose(1, 2) / x.shape[-1] + eye
    cov_r = rc @ rc.transpose(1, 2) / r.shape[-1] + eye
    half = _sqrtm_psd(cov_x)
    inv_half = _sqrtm_psd(cov_x, inverse=True)
    transfer = inv_half @ _sqrtm_psd(half @ cov_r @ half) @ inv_half
    return (transfer @ xc + mu_r).reshape(images.shape).to(images.dtype)


__all__ = [
    "DiffuseITObjective",
    "TranslationConfig",
    "color_transfer_mkl",
    "diffuseit_translate",
    "encode_prompts",
    "guidance_variances",
    "translation_sigmas",
]
