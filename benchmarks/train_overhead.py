"""Lightning overhead: time per optimisation step of DiffusionModule under Lightning vs a plain PyTorch loop.

Same quickstart model (configs/quickstart.yaml network, EDM loss, AdamW, grad-norm clipping, EMA update), same
digits DataLoader, same machine, one process; the two are run alternately (``--repeats`` rounds) and the median
seconds per step of each is reported with their ratio. Goal: ratio <= 1.05.

    python -m benchmarks train_overhead [--steps 60] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from benchmarks._common import markdown_table, write_results
from benchmarks._models import QUICKSTART
from diffusion_lab.methods.loading import build_from_config
from diffusion_lab.reliability.defaults import with_reliability


class StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.count = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.start:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        if self.start:
            self.count += 1


def _fresh(seed: int = 0):
    L.seed_everything(seed, verbose=False)
    model, data = build_from_config(QUICKSTART)
    data.setup("fit")
    return model, data


def lightning_seconds_per_step(steps: int, warmup: int) -> float:
    model, data = _fresh()
    timer = StepTimer(warmup)
    # What `diffusion-lab fit` runs: the reliability defaults (exact-resume RNG state, NaN/Inf guard,
    # preemption handler, atomic checkpoint IO) are part of the measured framework cost.
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps + warmup,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "gradient_clip_val": 1.0,
        "callbacks": [timer],
    }
    trainer = L.Trainer(**{**options, **with_reliability(options)})
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    return (timer.end - timer.start) / timer.count


def plain_seconds_per_step(steps: int, warmup: int) -> float:
    model, data = _fresh()
    denoiser, loss_fn, ema = model.denoiser, model.loss, model.ema
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=0.002, weight_decay=0.0)
    denoiser.train()
    done, start = 0, 0.0
    while done < steps + warmup:
        for x0, labels in data.train_dataloader():
            if done == warmup:
                start = time.perf_counter()
            cond = model._cond(labels, dropout=model.label_dropout)
            loss = loss_fn(denoiser, x0, **cond)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
            optimizer.step()
            ema.update(denoiser)
            done += 1
            if done == steps + warmup:
                break
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, lightning = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        plain.append(plain_seconds_per_step(args.steps, args.warmup))
        lightning.append(lightning_seconds_per_step(args.steps, args.warmup))
    p, lt = statistics.median(plain), statistics.median(lightning)
    ratio = lt / p
    rows = [
        ["plain PyTorch loop", p * 1e3, ", ".join(f"{v * 1e3:.1f}" for v in plain)],
        ["DiffusionModule + Lightning Trainer", lt * 1e3, ", ".join(f"{v * 1e3:.1f}" for v in lightning)],
    ]
    md = (
        "# train_overhead: Lightning vs a plain PyTorch loop\n\n"
        "Quickstart model (digits UNet, EDM loss, AdamW, grad clipping 1.0, EMA), batch 128, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} interleaved rounds, "
        f"{args.threads} torch thread(s). Lightning runs with the CLI's reliability defaults (NaN/Inf guard, "
        "exact-resume RNG capture, preemption handler) and without a logger or checkpoint writes (framework "
        "overhead only).\n\n"
        + markdown_table(["loop", "median ms / step", "rounds (ms / step)"], rows)
        + f"\n\n**Ratio Lightning / plain: {ratio:.3f}** (goal <= 1.05).\n\n"
        "Reproduce: `python -m benchmarks train_overhead -- --steps 60 --repeats 3`\n"
    )
    path = write_results(
        "train_overhead",
        md,
        {"ratio": ratio, "plain_ms_per_step": p * 1e3, "lightning_ms_per_step": lt * 1e3},
    )
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
