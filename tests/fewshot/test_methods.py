"""Few-shot LightningModules: exact accuracy on separable classes, training lowers the SSL losses, weights
move from pretraining to ProtoNet unchanged, and the fast frozen evaluation equals the Lightning test loop."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from diffusion_lab.data.episodes import EpisodeCollate, EpisodeSampler
from diffusion_lab.data.fewshot import ClassSplitDataset, FewShotDataModule, GlyphClasses
from diffusion_lab.methods.fewshot import (
    AMDIMPretraining,
    EpisodicModule,
    ProtoNet,
    SimCLRPretraining,
    SupervisedPretraining,
    embed_dataset,
    frozen_episode_accuracies,
)
from diffusion_lab.methods.fewshot_losses import amdim_infomax
from diffusion_lab.nets.encoders import AmdimEncoder, Conv4


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


class _EpisodeData(L.LightningDataModule):
    def __init__(self, dataset, way, shot, query, episodes):
        super().__init__()
        self.dataset, self.args = dataset, (way, shot, query, episodes)

    def test_dataloader(self):
        way, shot, query, episodes = self.args
        sampler = EpisodeSampler(self.dataset.labels, way, shot, query, episodes, seed=0, fixed=True)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=EpisodeCollate(way, shot, query))


def _clusters(n_classes, per_class, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(n_classes, 1, 4, 4, generator=g)
    images = means.repeat_interleave(per_class, 0) + spread * torch.randn(
        n_classes * per_class, 1, 4, 4, generator=g
    )
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return ClassSplitDataset(images, labels, [str(c) for c in range(n_classes)])


def test_fixed_embedding_on_separable_classes_is_exact():
    module = EpisodicModule(nn.Flatten())
    _trainer().test(module, _EpisodeData(_clusters(8, 10, spread=0.01), 5, 1, 5, 30), verbose=False)
    mean, ci, episodes = module.results["test"]["5way1shot"]
    assert (mean, ci, episodes) == (1.0, 0.0, 30)


def test_fast_frozen_evaluation_equals_the_test_loop():
    dataset = _clusters(8, 12, spread=3.0)  # overlapping classes: accuracies vary per episode
    module = EpisodicModule(nn.Flatten())
    _trainer().test(module, _EpisodeData(dataset, 5, 2, 4, 40), verbose=False)
    fast = frozen_episode_accuracies(
        embed_dataset(nn.Flatten(), dataset), EpisodeSampler(dataset.labels, 5, 2, 4, 40, fixed=True)
    )
    mean, ci, _ = module.results["test"]["5way2shot"]
    assert 0.3 < mean < 0.99
    assert mean == pytest.approx(fast.mean().item(), abs=1e-6)
    assert ci == pytest.approx(1.96 * fast.double().std(correction=0).item() / 40**0.5, abs=1e-6)


def _glyph_data(**kwargs):
    source = GlyphClasses(n_train_classes=12, n_val_classes=5, n_test_classes=5, instances_per_class=20)
    args = dict(batch_size=24, val_episodes=2, test_episodes=4, eval_shots=[1], eval_query=3, **kwargs)
    return FewShotDataModule(source, **args)


class _Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _tiny_amdim():
    return AmdimEncoder(1, 32, ndf=8, n_rkhs=32, depth=1, use_bn=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AMDIMPretraining(_tiny_amdim(), optimizer=functools.partial(torch.optim.Adam, lr=2e-3)),
        lambda: SimCLRPretraining(
            Conv4(1, hidden=16), optimizer=functools.partial(torch.optim.Adam, lr=2e-3)
        ),
        lambda: SupervisedPretraining(
            Conv4(1, hidden=16), 12, optimizer=functools.partial(torch.optim.Adam, lr=2e-3)
        ),
    ],
    ids=["amdim", "simclr", "supervised"],
)
def test_pretraining_loss_falls(make, tmp_path):
    L.seed_everything(0, verbose=False)
    module, losses = make(), _Losses()
    _trainer(max_steps=24, limit_val_batches=0, callbacks=[losses], default_root_dir=tmp_path).fit(
        module, _glyph_data()
    )
    first, last = sum(losses.values[:4]) / 4, sum(losses.values[-4:]) / 4
    assert len(losses.values) == 24 and last < first - 0.1 * abs(first)
    assert (tmp_path / "network.safetensors").is_file()  # exported at the end of fit


@torch.no_grad()
def _mean_nce_terms(module, x, draws=4):
    """AMDIM terms on a fixed batch, averaged over augmentation draws (batch-norm in training mode)."""
    torch.manual_seed(123)
    b, totals = x.shape[0], {"1t5": 0.0, "1t7": 0.0}
    for _ in range(draws):
        features = module.network.multiscale(torch.cat([module.augment(x), module.augment(x)]))
        (g1, g2), (l5_1, l5_2), (l7_1, l7_2) = (f.split(b) for f in features)
        loc = torch.randint(0, 25, (2, b))
        terms = amdim_infomax(g1, l5_1, l7_1, g2, l5_2, l7_2, loc[0], loc[1])
        for k in totals:
            totals[k] += float(terms[k]) / draws
    return totals


def test_amdim_beats_the_chance_level_of_its_nce_terms(tmp_path):
    """A score-blind encoder gets log(1 + (B - 1) L) per NCE term (one positive among (B - 1) L negatives).
    A short run must lower both global-to-local terms clearly and take global-to-5x5 below that level
    (global-to-7x7 stays near it: most 8x8-pixel patches of a glyph are blank background)."""
    L.seed_everything(0, verbose=False)
    module = AMDIMPretraining(_tiny_amdim(), optimizer=functools.partial(torch.optim.Adam, lr=2e-3))
    data = _glyph_data()
    data.setup("fit")
    x = torch.stack([data.split("train")[i][0] for i in range(0, 240, 10)])  # 24 images of 12 classes
    before = _mean_nce_terms(module.train(), x)
    _trainer(max_steps=30, limit_val_batches=0, default_root_dir=tmp_path).fit(module, data)
    after = _mean_nce_terms(module.train(), x)
    assert after["1t5"] < before["1t5"] - 0.5 and after["1t7"] < before["1t7"] - 0.5
    assert after["1t5"] < math.log(1 + 23 * 25) - 0.3
    assert after["1t7"] < math.log(1 + 23 * 49)


def test_pretrained_weights_reach_protonet_unchanged(tmp_path):
    L.seed_everything(0, verbose=False)
    ssl = AMDIMPretraining(_tiny_amdim(), export_path=str(tmp_path / "enc.safetensors"))
    _trainer(max_steps=2, limit_val_batches=0).fit(ssl, _glyph_data())
    proto = ProtoNet(_tiny_amdim(), pretrained=str(tmp_path / "enc.safetensors"), temperature=8.0)
    proto.load_pretrained()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(proto.network.eval()(x), ssl.network.eval()(x))
    # ProtoNet trains on episodes and tests with the 95% interval
    data = _glyph_data(train_mode="episodes", train_episodes=3, train_query=3)
    _trainer(max_epochs=1, limit_val_batches=1).fit(proto, data)
    result = _trainer().test(proto, data, verbose=False)[0]
    mean, ci, n = proto.results["test"]["5way1shot"]
    assert (
        n == 4
        and result["test/acc_5way1shot"] == pytest.approx(mean)
        and result["test/ci95_5way1shot"] == pytest.approx(ci)
    )


def test_wrong_wiring_gives_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="multiscale"):
        AMDIMPretraining(Conv4(1, hidden=4))
    with pytest.raises(TypeError, match="train_mode to 'episodes'"):
        ProtoNet(Conv4(1, hidden=4)).training_step((torch.zeros(2, 1, 8, 8), torch.zeros(2)), 0)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        ProtoNet(Conv4(1, hidden=4), pretrained=str(tmp_path / "nothing.safetensors")).load_pretrained()
