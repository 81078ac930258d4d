"""Episodes: exact N x (K + Q) layout, classes never crossing splits, reproducibility under a seed."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data.episodes import EpisodeCollate, EpisodeSampler
from diffusion_lab.data.fewshot import FewShotDataModule, GlyphClasses
from diffusion_lab.data.glyphs import render_glyph_classes

SOURCE_ARGS = dict(
    n_train_classes=7, n_val_classes=6, n_test_classes=6, instances_per_class=12, image_size=16, seed=3
)


@pytest.fixture(scope="module")
def datamodule():
    dm = FewShotDataModule(
        GlyphClasses(**SOURCE_ARGS),
        train_mode="episodes",
        train_way=5,
        train_shot=2,
        train_query=3,
        train_episodes=4,
        eval_way=5,
        eval_shots=[1, 5],
        eval_query=4,
        val_episodes=3,
        test_episodes=5,
        seed=11,
    )
    dm.setup()
    return dm


def test_sampler_layout_and_counts():
    labels = torch.arange(8).repeat_interleave(10)[
        torch.randperm(80, generator=torch.Generator().manual_seed(0))
    ]
    sampler = EpisodeSampler(labels, n_way=5, k_shot=2, q_query=3, n_episodes=20, seed=0)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 20
    for ep in episodes:
        assert len(ep) == 5 * (2 + 3) and len(set(ep)) == len(ep)  # exact size, no image twice
        ep_labels = labels[torch.tensor(ep)]
        support, query = ep_labels[:10].reshape(5, 2), ep_labels[10:].reshape(5, 3)
        assert len(set(support[:, 0].tolist())) == 5  # five distinct classes, class-major blocks
        assert (support == support[:, :1]).all() and (query == support[:, :1]).all()


def test_sampler_is_reproducible_and_seeded():
    labels = torch.arange(10).repeat_interleave(6)
    a = list(EpisodeSampler(labels, 5, 1, 2, 8, seed=4))
    assert a == list(EpisodeSampler(labels, 5, 1, 2, 8, seed=4))
    assert a != list(EpisodeSampler(labels, 5, 1, 2, 8, seed=5))
    train = EpisodeSampler(labels, 5, 1, 2, 8, seed=4)
    train.set_epoch(1)
    assert list(train) != a  # training episodes change with the epoch ...
    train.set_epoch(0)
    assert list(train) == a  # ... reproducibly
    fixed = EpisodeSampler(labels, 5, 1, 2, 8, seed=4, fixed=True)
    first = list(fixed)
    fixed.set_epoch(3)
    assert list(fixed) == first  # evaluation episodes never change


def test_sampler_rejects_impossible_episodes():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 3)
    with pytest.raises(ValueError, match="at least 4 classes"):
        EpisodeSampler(labels, 4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"classes \[2\] have fewer"):
        EpisodeSampler(labels, 3, 1, 3, 1)


def test_collate_labels_follow_the_layout():
    items = [(torch.full((1, 2, 2), float(i)), 100 + i // 2) for i in range(6)]  # 3 classes x 2 support
    items += [(torch.zeros(1, 2, 2), 100 + i) for i in range(3)]  # 3 classes x 1 query
    batch = EpisodeCollate(3, 2, 1)(items)
    assert batch["support_labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["query_labels"].tolist() == [0, 1, 2]
    assert batch["classes"].tolist() == [100, 101, 102]
    assert batch["support"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="has 9 items"):
        EpisodeCollate(3, 2, 1)(items[:-1])


def _glyph_bank(split_ids):
    """Every instance of every class of a split, rendered independently of the data module."""
    images = render_glyph_classes(split_ids, SOURCE_ARGS["instances_per_class"], 16, SOURCE_ARGS["seed"])
    return {bytes(img.numpy()): cid for cid, per_class in zip(split_ids, images) for img in per_class}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episodes_never_mix_split_classes(datamodule, split):
    source = datamodule.source
    bank = _glyph_bank(list(source.class_ids(split)))
    other = {s for s in ("train", "val", "test") if s != split}
    other_bank = {}
    for s in other:
        other_bank.update(_glyph_bank(list(source.class_ids(s))))
    if split == "train":
        loaders = [datamodule.train_dataloader()]
    else:
        loaders = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    n_batches = 0
    for loader in loaders:
        for batch in loader:
            n_batches += 1
            n, k = batch["n_way"], batch["k_shot"]
            q = batch["query"].shape[0] // n
            assert batch["support"].shape[0] + batch["query"].shape[0] == n * (k + q)
            images = torch.cat([batch["support"], batch["query"]])
            labels = torch.cat([batch["support_labels"], batch["query_labels"]])
            for img, label in zip(images, labels):
                key = bytes(((img[0] + 1) * 127.5).round().to(torch.uint8).numpy())
                assert key in bank and key not in other_bank  # a glyph of this split's classes only
                # the image belongs to the class the episode label says
                assert bank[key] == int(source.class_ids(split)[int(batch["classes"][label])])
    assert n_batches == {"train": 4, "val": 3 * 2, "test": 5 * 2}[split]


def test_eval_loaders_have_one_per_shot_and_are_fixed(datamodule):
    loaders = datamodule.test_dataloader()
    assert [next(iter(lo))["k_shot"] for lo in loaders] == [1, 5]
    first = [b["classes"].tolist() for b in loaders[0]]
    again = [b["classes"].tolist() for b in datamodule.test_dataloader()[0]]
    assert first == again


def test_pretraining_set_keeps_splits_apart():
    dm = FewShotDataModule(GlyphClasses(**SOURCE_ARGS), pretrain_splits=["train", "val"], batch_size=4)
    assert dm.num_classes == 13
    dm.setup("fit")
    labels = torch.cat([y for _, y in torch.utils.data.DataLoader(dm.train_set, batch_size=64)])
    assert labels.unique().tolist() == list(range(13))
    with pytest.raises(ValueError, match="pretrain_splits"):
        FewShotDataModule(GlyphClasses(**SOURCE_ARGS), pretrain_splits=["test"])


def test_ranks_share_the_episodes_without_overlap():
    labels = torch.arange(8).repeat_interleave(6)
    whole = list(EpisodeSampler(labels, 3, 1, 2, 10, seed=4))
    shards = [list(EpisodeSampler(labels, 3, 1, 2, 10, seed=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # equal lengths: the 10th episode is dropped
    assert [shards[i % 3][i // 3] for i in range(9)] == whole[:9]
    with pytest.raises(ValueError, match="rank < world_size"):
        EpisodeSampler(labels, 3, 1, 2, 10, rank=3, world_size=3)


def test_training_episodes_change_every_epoch_under_the_trainer(datamodule):
    """Lightning calls set_epoch on ``loader.sampler``: the EpisodeLoader must expose the episode sampler there."""
    import lightning as L

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.classes: dict[int, list[list[int]]] = {}

        def training_step(self, batch, batch_idx):
            self.classes.setdefault(self.current_epoch, []).append(batch["classes"].tolist())
            return self.weight**2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    sampler = EpisodeSampler(datamodule.split("train").labels, 5, 2, 3, 4, seed=11)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        labels = datamodule.split("train").labels
        expected = [[int(labels[i]) for i in episode[: 5 * 2 : 2]] for episode in sampler]
        assert module.classes[epoch] == expected
    assert module.classes[0] != module.classes[1]
