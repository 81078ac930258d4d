"""Test-only callback and network, importable by class_path (tests/_support is put on PYTHONPATH)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from torch import nn


def state_checksum(module: nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes, in order: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(
            t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            if t.numel()
            else b""
        )
    return h.hexdigest()


class StateProbe(L.Callback):
    """Append {event, rank, global_step, ema, weights} lines to ``out_dir/probe_rank{r}.jsonl``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, event: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "event": event,
            "rank": trainer.global_rank,
            "global_step": trainer.global_step,
            "ema": state_checksum(pl_module.ema),
            "weights": state_checksum(pl_module.denoiser),
            "ema_updates": int(pl_module.ema.num_updates),
        }
        with open(self.out_dir / f"probe_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write("train_start", trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write("train_end", trainer, pl_module)


def read_probe(out_dir: str | Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / f"probe_rank{rank}.jsonl").read_text().splitlines()]


class TinyConvNet(nn.Module):
    """A minimal image backbone with the nets' contract, to check that class_path swaps take effect."""

    def __init__(self, in_channels: int = 1, num_classes: int = 0, hidden: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels + 1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, in_channels, 3, padding=1)

    def forward(self, x, c_noise, labels=None, **_):
        c = (
            torch.as_tensor(c_noise, dtype=x.dtype, device=x.device)
            .reshape(-1, 1, 1, 1)
            .expand(x.shape[0], 1, *x.shape[2:])
        )
        return self.conv2(torch.relu(self.conv1(torch.cat([x, c], 1))))
