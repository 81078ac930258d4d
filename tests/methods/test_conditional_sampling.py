"""Conditional sampling (predict only): inpainting with an exact Gaussian prior keeps the observed pixels and
fills the hole about as well as an exact posterior sample; `predict` through the CLI writes the result PNGs, the
grid and an .npz whose inputs / conditions match the data and the degradation computed independently; a missing
checkpoint fails at setup naming the file, while the config still instantiates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gaussian_image_prior import GaussianImagePrior
from PIL import Image

from diffusion_lab.cli import main
from diffusion_lab.data.digits import Digits
from diffusion_lab.diffusion.analytic import GaussianMixture
from diffusion_lab.diffusion.samplers import SamplerConfig, sample
from diffusion_lab.methods.conditional_sampling import ConditionalSampling
from diffusion_lab.methods.loading import build_from_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SUPERRES = REPO / "configs" / "split" / "superres_digits.yaml"
TINY_PRIOR = ["--model.init_args.network.init_args.base_channels=8"]
GRID = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def _ar1_prior(n: int = 16, rho: float = 0.9, var: float = 0.25) -> GaussianImagePrior:
    """N(0, S) on 1x4x4 images with S_ij = var rho^|i-j| (well conditioned, strongly correlated pixels)."""
    i = torch.arange(n, dtype=torch.float64)
    return GaussianImagePrior(
        torch.zeros(n, dtype=torch.float64), var * rho ** (i[:, None] - i[None]).abs(), (1, 4, 4)
    )


def _inpaint(prior, images, scale, method="stsp", **kw):
    module = ConditionalSampling(
        task="inpainting", prior=prior, mask_box=(0, 0.5, 1, 0.5), scale=scale, output_dir=None,
        sampler=SamplerConfig(method=method, steps=20, schedule_kwargs=GRID), **kw,
    )  # fmt: skip
    module.setup("predict")
    return module(images)


def test_inpainting_with_exact_gaussian_prior_keeps_observed_pixels_and_fills_the_hole_like_the_posterior():
    prior = _ar1_prior()
    truth = prior.sample(64, torch.Generator().manual_seed(1)).float()
    known = torch.zeros(4, 4, dtype=torch.bool)
    known[:, :2] = True  # mask_box (0, 0.5, 1, 0.5): right half is the hole
    unguided = _inpaint(prior, truth, scale=0.0)
    out = _inpaint(prior, truth, scale=20.0)

    def rms(x: torch.Tensor) -> float:
        return float(x.pow(2).mean().sqrt())

    observed = rms((out - truth)[..., known])
    assert observed < 0.15 and observed < 0.25 * rms((unguided - truth)[..., known])
    # exact posterior of the hole given the observed pixels: C = S_hh - S_ho S_oo^-1 S_oh; a posterior sample
    # is sqrt(2 tr C / n_hole) from the truth in RMS, the prior sample sqrt(2 tr S_hh / n_hole).
    cov = prior.mixture.covs[0]
    o, h = known.flatten(), ~known.flatten()
    cond = cov[h][:, h] - cov[h][:, o] @ torch.linalg.solve(cov[o][:, o], cov[o][:, h])
    posterior_rms = float((2 * torch.diagonal(cond).mean()).sqrt())
    prior_rms = float((2 * torch.diagonal(cov[h][:, h]).mean()).sqrt())
    hole = rms((out - truth)[..., ~known])
    assert hole < 1.25 * posterior_rms < prior_rms
    assert (
        rms((unguided - truth)[..., ~known]) > 0.8 * prior_rms
    )  # the guidance, not the prior, fills the hole


def test_results_do_not_depend_on_the_batch_size():
    """Per-sample noise seeds seed + index: a batch of 4 equals four batches of 1."""
    prior = _ar1_prior()
    images = prior.sample(4, torch.Generator().manual_seed(2)).float()
    module = ConditionalSampling(
        task="super_resolution", prior=prior, scale=5.0, output_dir=None,
        sampler=SamplerConfig(method="ltsp", steps=6, schedule_kwargs=GRID),
    )  # fmt: skip
    module.setup("predict")
    labels = torch.zeros(4, dtype=torch.long)
    together = module.restore(images, labels, torch.arange(4))[0]
    alone = torch.cat([module.restore(images[i : i + 1], labels[:1], torch.tensor([i]))[0] for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_predict_through_the_cli_writes_pngs_grid_and_npz(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model, _ = build_from_config(QUICKSTART, TINY_PRIOR)  # untrained: the wiring, not the quality, is tested
    ckpt = tmp_path / "prior.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    main([
        "predict", "--config", str(SUPERRES),
        f"--model.init_args.prior_config={QUICKSTART}", f"--model.init_args.prior_checkpoint={ckpt}",
        f"--model.init_args.prior_overrides={TINY_PRIOR}", "--model.init_args.sampler.steps=3",
        "--model.init_args.max_images=5", "--model.init_args.predict_batch_size=2",
        "--model.init_args.grid_images=3", f"--model.init_args.output_dir={out}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert sorted(p.name for p in out.glob("result_*.png")) == [f"result_{i:05d}.png" for i in range(5)]
    data = np.load(out / "results.npz")
    assert list(data["indices"]) == [0, 1, 2, 3, 4]
    dm = Digits(batch_size=64, val_fraction=0.1, seed=0)
    dm.setup("predict")
    expected = torch.stack([dm.val_set[i][0] for i in range(5)])
    np.testing.assert_allclose(data["inputs"], expected.numpy(), atol=1e-6)
    low = F.interpolate(F.avg_pool2d(expected, 2), scale_factor=2, mode="nearest")
    np.testing.assert_allclose(data["conditions"], low.numpy(), atol=1e-6)
    png = np.asarray(Image.open(out / "result_00003.png").convert("L"), dtype=np.float64)
    np.testing.assert_allclose(png, np.round((np.clip(data["results"][3, 0], -1, 1) + 1) / 2 * 255), atol=1)
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 8 * 4, 3 * 8 * 4)  # 3 columns (input | condition | result), 3 rows, upscale 4
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_config_instantiates_without_checkpoint_and_setup_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "prior.ckpt"
    with pytest.raises(FileNotFoundError, match=r"prior checkpoint .*nowhere/prior\.ckpt"):
        main([
            "predict", "--config", str(SUPERRES), f"--model.init_args.prior_config={QUICKSTART}",
            f"--model.init_args.prior_checkpoint={missing}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ])  # fmt: skip


def test_bad_options_fail_with_clear_errors():
    prior = _ar1_prior()
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        ConditionalSampling(task="deblur", prior=prior)
    with pytest.raises(ValueError, match="classifier_config"):
        ConditionalSampling(task="classifier", prior=prior)
    with pytest.raises(ValueError, match="factor"):
        ConditionalSampling(task="super_resolution", prior=prior, factor=1)
    with pytest.raises(ValueError, match="box"):
        ConditionalSampling(task="inpainting", prior=prior, mask_box=(0, 0, 2, 1))
    with pytest.raises(RuntimeError, match="predict only"):
        ConditionalSampling(prior=prior).configure_optimizers()


class _ImageMixture(torch.nn.Module):
    """The analytic class-conditional mixture on 1x2x2 images: ``D(x, sigma, labels=None)`` and ``p(c | x, sigma)``."""

    def __init__(self) -> None:
        super().__init__()
        means = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 0.0, -1.0]])
        self.mixture = GaussianMixture(means, 0.1 * torch.eye(4).expand(3, 4, 4), component_labels=[0, 1, 1])

    def forward(self, x, sigma, labels=None, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.mixture(x.double().flatten(1), sigma, labels).reshape(x.shape).to(x.dtype)

    def classify(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.mixture.class_log_posterior(x.double().flatten(1), sigma).to(x.dtype)


def test_classifier_guidance_with_the_exact_classifier_samples_the_conditional_ode():
    """At s = 1 the exact posterior p(c | x, sigma) turns the unconditional denoiser into the conditional one
    (Bayes), so STSP's guided samples match the conditional denoiser's ODE solution from the same noise."""
    model = _ImageMixture()
    labels = torch.arange(40) % 2
    images = torch.zeros(40, 1, 2, 2)  # classifier guidance uses only the inputs' labels
    module = ConditionalSampling(
        task="classifier", prior=model, classifier=model.classify, scale=1.0, output_dir=None,
        sampler=SamplerConfig(method="stsp", steps=40, schedule_kwargs=GRID),
    )  # fmt: skip
    module.setup("predict")
    guided = module.restore(images, labels, torch.arange(40))[0]
    sigmas = SamplerConfig(method="heun", steps=200, schedule_kwargs=GRID).sigmas().float()
    noise = torch.stack([torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(40)])
    reference = sample(model, noise * sigmas[0], sigmas, method="heun", cond={"labels": labels})
    assert float((guided - reference).pow(2).mean().sqrt()) < 0.05

    def nearest_class(x: torch.Tensor) -> torch.Tensor:
        return model.mixture.component_labels[
            torch.cdist(x.flatten(1).double(), model.mixture.means).argmin(1)
        ]

    assert (nearest_class(guided) == nearest_class(reference)).all()
    assert float((nearest_class(guided) == labels).float().mean()) >= 0.9
    module.scale = (
        0.0  # unguided: the same noise ends in the unconditional ODE's solution, far from the reference
    )
    unguided = module.restore(images, labels, torch.arange(40))[0]
    assert float((unguided - reference).pow(2).mean().sqrt()) > 0.3
