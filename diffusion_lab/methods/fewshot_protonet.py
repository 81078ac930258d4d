"""Episodic evaluation and ProtoNet meta-learning (Snell et al. 2017) of an embedding network.

``EpisodicModule`` is the base of every few-shot LightningModule here: ``validate`` / ``test`` score
N-way K-shot episodes with nearest prototypes in the embedding (squared Euclidean distance) and log, per
episode setting, the mean accuracy and its 95% interval ``1.96 std / sqrt(episodes)`` (``test/acc_5way1shot``,
``test/ci95_5way1shot``, ...). Any pretraining module (``fewshot_ssl.py``) can therefore be tested on frozen
features as it is, and ``ProtoNet`` adds episodic training: cross-entropy of the query logits
``-||f(x) - c_k||^2 / temperature`` (Snell et al., eqs. 1-2), starting from a pretrained network (Chen et al.).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.episodes import EpisodeSampler, episode_key
from diffusion_lab.methods.fewshot_losses import mean_confidence_interval, protonet_logits, prototypes
from diffusion_lab.methods.lr_schedules import optimizer_with_step_schedule
from diffusion_lab.reliability.nan_guard import nonfinite_loss

log = logging.getLogger(__name__)

PRETRAINED_HINT = (
    "the network.safetensors written at the end of a pretraining run "
    "(diffusion-lab fit --config configs/fewshot/<dataset>_ssl.yaml), or its Lightning checkpoint"
)


def load_network_weights(network: nn.Module, path: str | Path) -> None:
    """Load embedding-network weights from a safetensors / state-dict file or a Lightning checkpoint.

    Keys may carry the ``network.`` prefix of a few-shot LightningModule; entries of other submodules
    (projection heads, classifiers) are ignored. Every parameter of ``network`` must be present.
    """
    from diffusion_lab.pretrained.safe_load import load_state_dict_file

    state = load_state_dict_file(path, what="few-shot embedding network", where_to_get=PRETRAINED_HINT)
    if any(k.startswith("network.") for k in state):
        state = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in '{path}' do not fit {type(network).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was the pretraining network configured with the same sizes?)"
        )


def save_network_weights(network: nn.Module, path: str | Path) -> Path:
    """Write the network's state dict as safetensors (loadable by ``load_network_weights``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}, str(path))
    return path


class EpisodicModule(L.LightningModule):
    """Embedding network + nearest-prototype evaluation on episodes (validation and test).

    Args:
        network: embedding network, images (B, C, H, W) -> (B, D).
        pretrained: optional weights for ``network`` (see ``load_network_weights``), loaded in ``setup`` (so a
            config naming a file that a previous run will write can be instantiated before it exists;
            a checkpoint given to ``fit``/``test`` by ``ckpt_path`` is restored after it and wins).
        temperature: divides the negative squared distances in the logits (training only; accuracy
            does not depend on it).
        optimizer, lr_scheduler: injected by LightningCLI or passed as callables.
        export_path: where ``on_fit_end`` writes the network weights as safetensors (default
            ``<log_dir>/network.safetensors``; ``""`` disables it).

    After ``trainer.test`` the results are in ``self.results["test"]``: ``{key: (mean, ci95, episodes)}``.
    """

    def __init__(
        self,
        network: nn.Module,
        pretrained: str | None = None,
        temperature: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters(ignore=["network", "augmentation", "optimizer", "lr_scheduler"])
        self.network = network
        self.pretrained, self._pretrained_loaded = pretrained, False
        self.temperature = temperature
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.export_path = export_path
        self._accuracies: dict[str, list[Tensor]] = defaultdict(list)
        self.results: dict[str, dict[str, tuple[float, float, int]]] = {}

    def load_pretrained(self) -> None:
        """Load ``pretrained`` into the network once (called by ``setup``; call it directly outside a Trainer)."""
        if self.pretrained and not self._pretrained_loaded:
            load_network_weights(self.network, self.pretrained)
            self._pretrained_loaded = True

    def setup(self, stage: str) -> None:
        self.load_pretrained()

    # ------------------------------------------------------------------ episodes
    def episode_logits(self, batch: dict[str, Any]) -> Tensor:
        """ProtoNet logits (N*Q, N) of an episode; support and query share one forward pass."""
        n_support = batch["support"].shape[0]
        embeddings = self.network(torch.cat([batch["support"], batch["query"]]))
        protos = prototypes(embeddings[:n_support], batch["support_labels"], batch["n_way"])
        return protonet_logits(embeddings[n_support:], protos, self.temperature)

    def _evaluate(self, batch: dict[str, Any]) -> None:
        logits = self.episode_logits(batch)
        accuracy = (logits.argmax(dim=1) == batch["query_labels"]).float().mean()
        self._accuracies[episode_key(batch["n_way"], batch["k_shot"])].append(accuracy.detach().cpu())

    def _report(self, stage: str) -> None:
        self.results[stage] = {}
        for key, accs in sorted(self._accuracies.items()):
            # every rank's episodes (DDP shards them): the interval is over all of them, not a mean of intervals
            episodes = self.all_gather(torch.stack(accs).to(self.device)).reshape(-1).cpu()
            mean, ci = mean_confidence_interval(episodes)
            self.results[stage][key] = (mean, ci, episodes.numel())
            self.log(f"{stage}/acc_{key}", mean)
            self.log(f"{stage}/ci95_{key}", ci)
        self._accuracies.clear()

    def on_validation_epoch_start(self) -> None:
        self._accuracies.clear()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_start(self) -> None:
        self._accuracies.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")
        for key, (mean, ci, n) in self.results["test"].items():
            log.info("test %s: %.2f +- %.2f %% over %d episodes", key, 100 * mean, 100 * ci, n)

    # ------------------------------------------------------------------ training plumbing
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return optimizer_with_step_schedule(
            self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )

    def _check_loss(self, loss: Tensor, batch_idx: int) -> None:
        """A non-finite loss is handed to the trainer's NaNGuard, which skips the update (the CLI adds one by
        default); without a guard it raises ``FloatingPointError`` naming the step."""
        nonfinite_loss(self, loss)

    def on_fit_end(self) -> None:
        if self.export_path == "" or self.trainer.global_rank != 0:
            return
        path = self.export_path or str(Path(self.trainer.log_dir or ".") / "network.safetensors")
        log.info("network weights written to %s", save_network_weights(self.network, path))


class ProtoNet(EpisodicModule):
    """Prototypical-network meta-learning on training episodes (Snell et al. 2017; Chen et al. fine-tune a
    self-supervised network this way). Arguments as ``EpisodicModule``; the data module must serve
    episodes (``FewShotDataModule(train_mode="episodes")``).
    """

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not isinstance(batch, dict) or "support" not in batch:
            raise TypeError("ProtoNet trains on episodes: set the data module's train_mode to 'episodes'")
        logits = self.episode_logits(batch)
        loss = F.cross_entropy(logits, batch["query_labels"])
        self._check_loss(loss, batch_idx)
        accuracy = (logits.argmax(dim=1) == batch["query_labels"]).float().mean()
        n = logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/acc", accuracy, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        return loss


# ---------------------------------------------------------------------------------------------------
# Fast evaluation of a frozen network: embed each image once, then score episodes by indexing.
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_dataset(network: nn.Module, dataset: Dataset, batch_size: int = 512, device: str = "cpu") -> Tensor:
    """Embeddings (N, D) of every item of ``dataset`` in eval mode (item order)."""
    was_training = network.training
    network.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = torch.cat([network(x.to(device)).float().cpu() for x, _ in loader])
    network.train(was_training)
    return out


def frozen_episode_accuracies(embeddings: Tensor, sampler: EpisodeSampler) -> Tensor:
    """Nearest-prototype accuracy of every episode of ``sampler`` on precomputed embeddings: (episodes,).

    Equal to testing the frozen network episode by episode (eval-mode networks embed each image
    independently of the rest of its episode) at a fraction of the cost.
    """
    n, k, q = sampler.n_way, sampler.k_shot, sampler.q_query
    support_labels = torch.arange(n).repeat_interleave(k)
    query_labels = torch.arange(n).repeat_interleave(q)
    accs = []
    for indices in sampler:
        e = embeddings[torch.as_tensor(indices)]
        logits = protonet_logits(e[n * k :], prototypes(e[: n * k], support_labels, n))
        accs.append((logits.argmax(dim=1) == query_labels).float().mean())
    return torch.stack(accs)


__all__ = [
    "EpisodicModule",
    "ProtoNet",
    "embed_dataset",
    "frozen_episode_accuracies",
    "load_network_weights",
    "save_network_weights",
]
