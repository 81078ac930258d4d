"""YAML-selectable models of conditional sampling: the ADM 256x256 classifier from the pretrained registry
(a tiny randomly initialised network of the same architecture, saved as a guided-diffusion checkpoint) gives the
guidance term ``-s sigma grad_x log p(y | x, sigma)`` computed independently by autograd through the raw network;
guided sampling with it runs and raises the target's log-probability; the project's noise-aware classifier chosen
by ``class_path`` in YAML drives the same guided sampler as a hand-built one; missing weights fail before any
model loads, naming the file and where to get it; the ImageNet configs run end to end on tiny models."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.cli import main
from diffusion_lab.data.digits import Digits
from diffusion_lab.diffusion.guidance import ClassifierGuidance
from diffusion_lab.diffusion.samplers import SamplerConfig, sample
from diffusion_lab.methods.conditional_sampling import (
    ClassLabels,
    ConditionalSampling,
    PretrainedModel,
    TrainedModel,
    prior_denoiser,
)
from diffusion_lab.methods.loading import build_from_config, load_module
from diffusion_lab.nets.adm import from_preset
from diffusion_lab.pretrained import MissingWeightsError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CLASSIFIER_CONFIG = REPO / "configs" / "split" / "digits_classifier.yaml"
CLASSIFIER_GUIDED = REPO / "configs" / "split" / "classifier_guided_digits.yaml"
IMAGENET_COND = REPO / "configs" / "split" / "imagenet256_classifier_stsp.yaml"
TINY_PRIOR = ["--model.init_args.network.init_args.base_channels=8"]
TINY_CLASSIFIER = {"classifier_width": 32}  # every flag of the 256x256 preset kept, only narrower
TINY_UNET = {"num_channels": 32}


def _tiny_adm_file(
    tmp_path: Path, preset: str, flags: dict, seed: int, std: float = 0.05, out_gain: float = 1.0
) -> Path:
    """A guided-diffusion-style checkpoint (a plain state dict) of a seeded random ``preset`` at ``flags``.

    Every parameter, including the zero-initialised output layers, is N(0, std^2) (so gradients are not zero);
    the output head is multiplied by ``out_gain`` (a random classifier is otherwise almost flat in x).
    """
    fp16 = "classifier_use_fp16" if "classifier" in preset else "use_fp16"
    net = from_preset(preset, **flags, **{fp16: False})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for p in net.out.parameters():
            p.mul_(out_gain)
    path = tmp_path / f"{preset}.pt"
    torch.save(net.state_dict(), path)
    return path


def _adm_classifier(tmp_path: Path) -> tuple[PretrainedModel, Path]:
    path = _tiny_adm_file(tmp_path, "256x256_classifier", TINY_CLASSIFIER, seed=3, std=0.2, out_gain=4.0)
    return PretrainedModel("adm/256x256_classifier", str(path), {"flag_overrides": TINY_CLASSIFIER}), path


def _guided_diffusion_log_prob(state: dict, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor):
    """log p(y | x, sigma) by hand: the raw classifier on guided-diffusion's x_t at the fractional timestep.

    ``x_t = x / sqrt(1 + sigma^2)``; t interpolates the index k linearly in log sigma between the knots
    ``sigma_k = sqrt((1 - abar_k) / abar_k)`` of the linear schedule (betas 1e-4..0.02, 1000 steps).
    """
    net = from_preset("256x256_classifier", **TINY_CLASSIFIER, classifier_use_fp16=False)
    net.load_state_dict(state)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    log_sigmas = np.log(np.sqrt((1 - abar) / abar))
    t = torch.tensor(np.interp(np.log(sigma.numpy()), log_sigmas, np.arange(1000)), dtype=torch.float32)
    x_t = x / torch.sqrt(1 + sigma**2).reshape(-1, 1, 1, 1)
    return torch.log_softmax(net.eval()(x_t, t), -1)[torch.arange(len(y)), y]


class _StandardNormalPrior(torch.nn.Module):
    """Exact denoiser of x0 ~ N(0, I): ``D(x, sigma) = x / (1 + sigma^2)``; records the conditioning it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def forward(self, x, sigma, **cond):
        self.seen |= set(cond)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + sigma**2)


@pytest.mark.slow
def test_adm_256_classifier_guidance_term_is_the_scale_times_the_autograd_gradient(tmp_path):
    source, path = _adm_classifier(tmp_path)
    scale = 2.5
    module = ConditionalSampling(
        task="classifier", prior=_StandardNormalPrior(), classifier=source, scale=scale, output_dir=None
    )
    module.setup("predict")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    # one level between the schedule's knots, one on a knot (t = 600)
    abar600 = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[600])
    sigma = torch.tensor([0.37, ((1 - abar600) / abar600) ** 0.5])
    labels = torch.tensor([7, 912])
    factory, cond, _ = module.guidance(torch.zeros(2, 3, 256, 256), labels)
    g = factory(module.prior).ode_term(x, sigma, **cond)

    x_in = x.clone().requires_grad_(True)
    log_p = _guided_diffusion_log_prob(torch.load(path, weights_only=True), x_in, sigma, labels)
    (grad,) = torch.autograd.grad(log_p.sum(), x_in)
    expected = -scale * sigma.reshape(-1, 1, 1, 1) * grad  # dx/dsigma term g = -s sigma grad_x log p(y | x)
    assert grad.abs().max() > 0
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.slow
def test_guided_sampling_with_the_adm_classifier_raises_the_target_log_probability(tmp_path):
    """Prior N(0, I): the unguided probability-flow ODE ends exactly at ``noise * s_max / sqrt(1 + s_max^2)``;
    STSP with the classifier ends where the classifier prefers the target class much more."""
    source, path = _adm_classifier(tmp_path)
    prior = _StandardNormalPrior()
    module = ConditionalSampling(
        task="classifier", prior=prior, classifier=source, scale=10.0, output_dir=None, pass_labels=True,
        sampler=SamplerConfig(method="stsp", steps=3, schedule_kwargs={"sigma_min": 0.5, "sigma_max": 10.0}),
    )  # fmt: skip
    module.setup("predict")
    labels = torch.tensor([5])
    guided = module.restore(torch.zeros(1, 3, 256, 256), labels, torch.arange(1))[0]
    assert torch.isfinite(guided).all() and "labels" in prior.seen  # pass_labels gives the prior the labels
    noise = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(0))[None]
    unguided = noise * 10.0 / (1 + 10.0**2) ** 0.5
    state = torch.load(path, weights_only=True)
    end = torch.tensor([0.5])
    with torch.no_grad():
        gain = _guided_diffusion_log_prob(state, guided, end, labels) - _guided_diffusion_log_prob(
            state, unguided, end, labels
        )
    assert float(gain) > 2.0  # nats (measured: +12 at s = 10, +5 at s = 3)


def test_missing_adm_classifier_fails_before_any_model_loads_naming_the_file_and_its_source(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the CLI writes config.yaml in the working directory
    prior_file = tmp_path / "256x256_diffusion.pt"
    prior_file.write_bytes(b"not a checkpoint: it must not even be read")
    missing = tmp_path / "nowhere" / "256x256_classifier.pt"
    with pytest.raises(MissingWeightsError) as err:
        main([
            "predict", "--config", str(IMAGENET_COND), "--trainer.accelerator=cpu", "--trainer.logger=false",
            f"--model.init_args.prior.init_args.path={prior_file}",
            f"--model.init_args.classifier.init_args.path={missing}", "--trainer.enable_progress_bar=false",
        ])  # fmt: skip
    message = str(err.value)
    assert str(missing) in message and "classifier" in message
    assert (
        "256x256_classifier.pt" in message.replace(str(missing), "") and "openai/guided-diffusion" in message
    )


@pytest.mark.slow
def test_imagenet_config_runs_end_to_end_on_tiny_adm_models(tmp_path, monkeypatch):
    """The c256 config (conditional ADM + ADM classifier, STSP on the respaced grid) with tiny random models."""
    monkeypatch.chdir(tmp_path)
    unet = _tiny_adm_file(tmp_path, "256x256_diffusion", TINY_UNET, seed=1)
    _, clf = _adm_classifier(tmp_path)
    out = tmp_path / "out"
    main([
        "predict", "--config", str(IMAGENET_COND), "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.prior.init_args.path={unet}",
        '--model.init_args.prior.init_args.kwargs={"flag_overrides": {"num_channels": 32}, "clip_denoised": true}',
        f"--model.init_args.classifier.init_args.path={clf}",
        '--model.init_args.classifier.init_args.kwargs={"flag_overrides": {"classifier_width": 32}}',
        "--model.init_args.sampler.steps=2", "--model.init_args.predict_batch_size=1",
        f"--model.init_args.output_dir={out}", "--data.init_args.num_samples=1",
    ])  # fmt: skip
    data = np.load(out / "results.npz")
    assert data["results"].shape == (1, 3, 256, 256) and np.isfinite(data["results"]).all()
    assert list(data["labels"]) == ClassLabels(num_samples=1, seed=10).labels.tolist()
    assert (out / "result_00000.png").is_file() and (out / "grid.png").is_file()


def test_yaml_selected_noise_aware_classifier_drives_the_same_guided_sampler(tmp_path, monkeypatch):
    """classifier_guided_digits.yaml (prior and classifier as TrainedModel class_paths) through the CLI equals
    STSP with ClassifierGuidance built by hand from the same checkpoints."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    prior_model, _ = build_from_config(QUICKSTART, TINY_PRIOR)  # untrained: the wiring is tested
    classifier_model, _ = build_from_config(CLASSIFIER_CONFIG)
    with torch.no_grad():  # the ADM classifier's output layer starts at zero: make the gradient non-zero
        for p in classifier_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    paths = {}
    for name, model in (("prior", prior_model), ("classifier", classifier_model)):
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": model.state_dict()}, paths[name])
    out = tmp_path / "out"
    main([
        "predict", "--config", str(CLASSIFIER_GUIDED),
        f"--model.init_args.prior.init_args.config={QUICKSTART}",
        f"--model.init_args.prior.init_args.checkpoint={paths['prior']}",
        f"--model.init_args.prior.init_args.overrides={TINY_PRIOR}",
        f"--model.init_args.classifier.init_args.config={CLASSIFIER_CONFIG}",
        f"--model.init_args.classifier.init_args.checkpoint={paths['classifier']}",
        "--model.init_args.sampler.steps=4", "--model.init_args.max_images=3", "--model.init_args.scale=20.0",
        f"--model.init_args.output_dir={out}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    data = np.load(out / "results.npz")
    dm = Digits(batch_size=64, val_fraction=0.1, seed=0)
    dm.setup("predict")
    labels = torch.stack([dm.val_set[i][1] for i in range(3)])
    np.testing.assert_array_equal(data["labels"], labels.numpy())

    prior = prior_denoiser(load_module(QUICKSTART, paths["prior"], TINY_PRIOR))
    classifier = load_module(CLASSIFIER_CONFIG, paths["classifier"]).requires_grad_(False)
    sigmas = SamplerConfig(
        method="stsp", steps=4, schedule_kwargs={"sigma_min": 0.002, "sigma_max": 80.0}
    ).sigmas()
    sigmas = sigmas.float()
    noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)])

    def run(scale: float) -> torch.Tensor:
        guidance = partial(ClassifierGuidance, classifier=classifier, scale=scale)
        with torch.no_grad():
            return sample(
                prior, noise * sigmas[0], sigmas, method="stsp", guidance=guidance, cond={"labels": labels},
                scheme="paper",
            )  # fmt: skip

    expected = run(20.0)
    np.testing.assert_allclose(data["results"], expected.numpy(), atol=1e-4)
    assert float((expected - run(0.0)).abs().max()) > 1e-2  # the classifier did change the samples


def test_model_sources_and_class_labels_reject_bad_input(tmp_path):
    with pytest.raises(
        ValueError, match="unknown pretrained model 'adm/256x256_clasifier'.*adm/256x256_classifier"
    ):
        PretrainedModel("adm/256x256_clasifier", "x.pt")
    with pytest.raises(FileNotFoundError, match=r"classifier checkpoint .*nowhere\.ckpt.*diffusion-lab fit"):
        TrainedModel(str(CLASSIFIER_CONFIG), str(tmp_path / "nowhere.ckpt")).check("classifier")
    prior = _StandardNormalPrior()
    with pytest.raises(ValueError, match="not both"):
        ConditionalSampling(prior=prior, prior_config="a.yaml", prior_checkpoint="b.ckpt")
    with pytest.raises(ValueError, match="prior_config and prior_checkpoint"):
        ConditionalSampling(prior_config="a.yaml")
    with pytest.raises(ValueError, match=r"labels must be .* \[0, 10\), got \[10\]"):
        ClassLabels(num_classes=10, labels=[3, 10])
    a, b = (
        ClassLabels(num_classes=1000, num_samples=64, seed=1),
        ClassLabels(num_classes=1000, num_samples=64, seed=1),
    )
    assert torch.equal(a.labels, b.labels) and a.labels.min() >= 0 and a.labels.max() < 1000
    assert len(a.labels.unique()) > 50  # uniformly random classes, not one repeated
    dm = ClassLabels(num_classes=5, labels=[4, 0], resolution=16)
    dm.setup("predict")
    image, label = dm.val_set[0]
    assert image.shape == (3, 16, 16) and int(label) == 4 and len(dm.val_set) == 2


@pytest.mark.parametrize("pass_labels", [False, True])
def test_pass_labels_decides_whether_the_prior_sees_the_target_labels(pass_labels):
    prior = _StandardNormalPrior()
    module = ConditionalSampling(
        task="classifier", prior=prior, classifier=lambda x, sigma: x.flatten(1)[:, :3], scale=1.0,
        output_dir=None, pass_labels=pass_labels, sampler=SamplerConfig(method="ddim", steps=2),
    )  # fmt: skip
    module.setup("predict")
    module.restore(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), torch.arange(2))
    assert ("labels" in prior.seen) == pass_labels
