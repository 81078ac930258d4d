"""Sample quality of one model over a grid of samplers x step counts: the "FID / IS vs NFE" table and plot.

For each sampler configuration (a dict of ``pl_module.generate`` overrides such as ``{method: heun}``) and each
step count, the same seeded samples as :class:`~diffusion_lab.metrics.sample_quality.SampleQuality` draws are
generated, their features extracted once, and FID / KID / IS / precision / recall / class accuracy computed
against cached reference statistics. The number of function evaluations (NFE) is *measured*: a forward hook
counts the calls of the model's denoiser while one batch is generated (Heun with N steps: 2N - 1; a
classifier-free-guided step batched into one call counts once).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_lab.metrics.factory import QualityConfig, quality_from_features
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.metrics.reference_stats import ReferenceStats
from diffusion_lab.metrics.sample_quality import generate_features

__all__ = ["DENOISER_ATTRIBUTES", "find_denoiser", "sweep_samplers", "write_sweep_table"]

# Where the project's LightningModules keep the network that a sampler calls once per NFE.
DENOISER_ATTRIBUTES = ("ema.averaged", "denoiser", "network", "net")


def find_denoiser(pl_module: nn.Module, attribute: str | None = None) -> nn.Module | None:
    """The sub-module whose calls count as NFE: ``attribute`` (dotted path) or the first of
    :data:`DENOISER_ATTRIBUTES` that exists."""
    for path in [attribute] if attribute else DENOISER_ATTRIBUTES:
        module: Any = pl_module
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    if attribute:
        raise ValueError(f"the model has no sub-module '{attribute}' to count function evaluations on")
    return None


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1


def sweep_samplers(
    pl_module: nn.Module,
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    samplers: Sequence[dict[str, Any]],
    steps: Sequence[int],
    *,
    num_samples: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    classifier: nn.Module | None = None,
    quality: QualityConfig | None = None,
    denoiser_attribute: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (sampler, steps): ``sampler``, ``steps``, ``nfe``, ``seconds`` (generation + features) and
    the numbers of :func:`quality_from_features`."""
    denoiser = find_denoiser(pl_module, denoiser_attribute)
    rows = []
    for sampler in samplers:
        for num_steps in steps:
            config = {**sampler, "steps": int(num_steps)}
            counter = _CallCounter()
            handle = denoiser.register_forward_pre_hook(counter) if denoiser is not None else None
            start = time.perf_counter()
            try:
                data = generate_features(
                    pl_module,
                    extractor,
                    num_samples=num_samples,
                    batch_size=batch_size,
                    seed=seed,
                    sampler=config,
                    classifier=classifier,
                    device=device,
                    progress=progress,
                )
            finally:
                if handle is not None:
                    handle.remove()
            seconds = time.perf_counter() - start
            # every generate call draws one batch with the same schedule, so calls / batches = NFE per sample
            nfe = counter.calls // math.ceil(num_samples / batch_size) if denoiser is not None else None
            results = quality_from_features(
                reference,
                data["features"],
                data.get("logits"),
                labels=data.get("labels"),
                predicted=data.get("predicted"),
                config=quality,
            )
            rows.append(
                {
                    "sampler": sampler.get("method", "default"),
                    "steps": int(num_steps),
                    "nfe": nfe,
                    "seconds": seconds,
                    **results,
                }
            )
    return rows


def write_sweep_table(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "Sample quality vs NFE"
):
    """Write ``quality_vs_nfe.md`` (a table), ``quality_vs_nfe.json`` and ``quality_vs_nfe.png`` (FID vs NFE, one
    line per sampler, log-x); returns the markdown path."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [
        "sampler",
        "steps",
        "nfe",
        "fid",
        "kid_mean",
        "is_mean",
        "precision",
        "recall",
        "class_accuracy",
        "seconds",
    ]
    columns = [c for c in columns if any(c in row for row in rows)]

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    md_path = out_dir / "quality_vs_nfe.md"
    md_path.write_text("\n".join(lines) + "\n")
    (out_dir / "quality_vs_nfe.json").write_text(json.dumps(list(rows), indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted(
            (row["nfe"] or row["steps"], row["fid"])
            for row in rows
            if row["sampler"] == sampler and "fid" in row
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (denoiser calls per sample)")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quality_vs_nfe.png", dpi=120)
    plt.close(fig)
    return md_path
