"""Noise-aware classifier: it learns the exact posterior p(c | x, sigma) of the analytic mixture, guides like it,
rejects bad input, and trains through the CLI on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.guidance import ClassifierGuidance
from diffusion_lab.diffusion.losses import LogUniformSigma
from diffusion_lab.methods.classifier import NoiseAwareClassifier

REPO = Path(__file__).resolve().parents[2]


class PointNet(nn.Module):
    """net(x_in, t) -> logits for 2-D points: an MLP on (x_in, ln sigma)."""

    def __init__(self, num_classes: int = 3, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x_in, t):
        return self.body(torch.cat([x_in, (t / 250.0)[:, None]], dim=1))


@pytest.fixture(scope="module")
def trained():
    """600 Adam steps on fresh mixture samples through the module's own training_step."""
    torch.manual_seed(0)
    mixture = toy_mixture_2d(std=0.3)
    module = NoiseAwareClassifier(
        PointNet(), num_classes=3, sigma_data=1.0, sigma_sampler=LogUniformSigma(0.05, 3.0)
    )
    module.log = lambda *a, **k: None  # no Trainer attached
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        x0, labels = mixture.sample(256, generator=g)
        loss = module.training_step((x0.float(), labels), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mixture, module.eval()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.5])
def test_learns_the_exact_posterior(trained, sigma):
    """Mean KL(exact posterior || learned) is small and the accuracy is within 2 points of Bayes-optimal."""
    mixture, module = trained
    g = torch.Generator().manual_seed(2)
    x0, labels = mixture.sample(4000, generator=g)
    x = (x0 + sigma * torch.randn(x0.shape, generator=g, dtype=x0.dtype)).float()
    s = torch.full((len(x),), sigma)
    exact = mixture.class_log_posterior(x.double(), s.double()).float()
    with torch.no_grad():
        learned = torch.log_softmax(module(x, s), -1)
    kl = (exact.exp() * (exact - learned)).sum(-1).mean()
    bayes = (exact.argmax(-1) == labels).float().mean()
    acc = (learned.argmax(-1) == labels).float().mean()
    assert kl < 0.03, float(kl)
    assert acc > bayes - 0.02, (float(acc), float(bayes))


def test_guidance_with_the_learned_classifier_matches_the_exact_one(trained):
    """The guidance term s sigma grad log p(c | x) with the learned classifier is close to the exact one (input
    gradients are learned less precisely than the probabilities: 0 guidance would have relative error 1)."""
    mixture, module = trained
    g = torch.Generator().manual_seed(3)
    x0, labels = mixture.sample(512, generator=g)
    sigma = torch.full((512,), 0.8)
    x = x0.float() + 0.8 * torch.randn(x0.shape, generator=g)
    learned = ClassifierGuidance(mixture, module, 2.0).ode_term(x, sigma, labels=labels)
    exact = ClassifierGuidance(mixture, lambda y, s: mixture.class_log_posterior(y.double(), s.double()), 2.0)
    reference = exact.ode_term(x, sigma, labels=labels)
    relative = (learned - reference).norm() / reference.norm()
    assert relative < 0.4, float(relative)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_classes >= 2, got 1"):
        NoiseAwareClassifier(PointNet(), num_classes=1)
    with pytest.raises(ValueError, match="val_sigmas must be >= 0"):
        NoiseAwareClassifier(PointNet(), num_classes=3, val_sigmas=[-1.0])
    with pytest.raises(ValueError, match="returns 3 logits but num_classes=10"):
        NoiseAwareClassifier(PointNet(), num_classes=10)(torch.zeros(2, 2), 0.5)


@pytest.mark.slow
def test_digits_classifier_config_trains_through_the_cli(cli_runner, tmp_path):
    config = REPO / "configs" / "split" / "digits_classifier.yaml"
    result = cli_runner(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/acc" in result.stdout + result.stderr
