"""Low-dose CT denoising with a pretrained diffusion prior: DDLM and its unsupervised neighbours (test/predict).

Thin wiring: the prior is any trained denoiser (a ``DiffusionModule`` built from its YAML and checkpoint with
``methods.loading.load_module``, EMA weights), the sampler is ``diffusion.ddlm.ddlm_denoise``, the data are
``data.ct`` pairs. Nothing is trained or tuned on low-dose data: there is no ``fit``.

``test`` logs, per dose level ``D`` of the DataModule's ``dose_names``, the restoration metrics of the output and
of the low-dose input against the full-dose image (``test/D/psnr``, ``test/D/low_dose_psnr``, ...,
``test/D/psnr_gain_db``), and a full-dose | low-dose FBP | output grid (TensorBoard image ``test/D/grid`` and
``output_dir/grid_D.png``). ``predict`` writes each denoised slice as ``output_dir/D/slice_NNNN.png`` (window
[-1, 1] shown as black..white) and ``.npy`` (in the window's physical units: 1/mm or HU).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.ddlm import DDLMConfig, ddlm_denoise
from diffusion_lab.metrics.restoration import build_restoration_metrics


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_=+-]", "_", name)


class LDCTDenoising(L.LightningModule):
    """DDLM low-dose CT denoising (and SDEdit / ILVR / DPS baselines through ``ddlm.consistency``).

    Args:
        prior_config: YAML of the prior (e.g. ``configs/ldct/phantom_prior.yaml``); with ``prior_checkpoint`` it is
            loaded at ``setup`` (so configs instantiate before the checkpoint exists).
        prior_checkpoint: the prior's Lightning checkpoint or safetensors file.
        prior_overrides: command-line style overrides of the prior's config (e.g.
            ``["--data.init_args.resolution=128"]``) when the checkpoint was trained with them.
        ddlm: sampler settings (steps, consistency, strength, start_scale, sigma_scale, eta, ...).
        metrics: restoration metrics (``metrics.restoration.RESTORATION_METRICS``).
        data_range: intensity range of the metrics on the [-1, 1] scale (2 = the whole window).
        output_dir: where predict writes slices and test writes grids (None: nowhere).
        grid_slices: slices per dose level in the test grid.
        grid_upscale: nearest-neighbour upscaling of grid images.
        seed: seed of stochastic options (SDEdit start noise, eta > 0); item i of dose k uses seed + i + 100003 k.
        prior: an already built denoiser ``D(x, sigma)`` (Python use and tests); replaces prior_config.
    """

    def __init__(
        self,
        prior_config: str | None = None,
        prior_checkpoint: str | None = None,
        prior_overrides: Sequence[str] = (),
        ddlm: DDLMConfig | None = None,
        metrics: list[str] | tuple[str, ...] = ("psnr", "ssim", "rmse"),
        data_range: float = 2.0,
        output_dir: str | None = "outputs/ddlm",
        grid_slices: int = 8,
        grid_upscale: int = 2,
        seed: int = 0,
        prior: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if prior is None and (prior_config is None or prior_checkpoint is None):
            raise ValueError(
                "give the prior as prior_config + prior_checkpoint, or as an already built prior="
            )
        if grid_slices < 0 or grid_upscale < 1:
            raise ValueError(
                f"need grid_slices >= 0 and grid_upscale >= 1, got {grid_slices}, {grid_upscale}"
            )
        self.save_hyperparameters(ignore=["prior", "ddlm"])
        self.prior_config, self.prior_checkpoint = prior_config, prior_checkpoint
        self.prior_overrides = list(prior_overrides)
        self.prior = prior
        self.ddlm = ddlm if ddlm is not None else DDLMConfig()
        self.metric_names, self.data_range = list(metrics), data_range
        build_restoration_metrics(self.metric_names, data_range)  # validate the names now
        self.output_dir = Path(output_dir) if output_dir else None
        self.grid_slices, self.grid_upscale, self.seed = grid_slices, grid_upscale, seed
        self.dose_names: list[str] = []
        self.output_metrics = nn.ModuleList()
        self.input_metrics = nn.ModuleList()
        self._grid: dict[int, list[Tensor]] = {}

    # ------------------------------------------------------------------ prior and data
    def setup(self, stage: str) -> None:
        if self.prior is None:
            from diffusion_lab.methods.loading import load_module

            self.prior = load_module(
                self.prior_config, self.prior_checkpoint, self.prior_overrides
            ).ema.averaged
        self.prior.eval().requires_grad_(False)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.dose_names = list(getattr(datamodule, "dose_names", None) or ["dose0"])
        self.window = getattr(datamodule, "window", None)
        self.output_metrics = nn.ModuleList(
            build_restoration_metrics(self.metric_names, self.data_range) for _ in self.dose_names
        ).to(self.device)
        self.input_metrics = nn.ModuleList(
            build_restoration_metrics(self.metric_names, self.data_range) for _ in self.dose_names
        ).to(self.device)

    def dose_name(self, dose: int) -> str:
        return self.dose_names[dose] if dose < len(self.dose_names) else f"dose{dose}"

    def configure_optimizers(self) -> None:
        raise RuntimeError(
            "LDCTDenoising is test/predict only: DDLM uses a pretrained prior and trains nothing"
        )

    # ------------------------------------------------------------------ denoising
    def denoise(self, low_dose: Tensor, index: Tensor | None = None, dose: Tensor | None = None) -> Tensor:
        """DDLM output (B, 1, H, W) for low-dose slices on the [-1, 1] scale.

        Runs outside inference mode (Lightning's test and predict loops use it), because the ``dps`` option
        differentiates through the prior; the input is cloned into a normal tensor for that.
        """
        generator = None
        if self.ddlm.eta > 0 or self.ddlm.start_scale > 1:
            first = int(index[0]) if index is not None else 0
            level = int(dose[0]) if dose is not None else 0
            generator = torch.Generator(low_dose.device).manual_seed(self.seed + first + 100003 * level)
        with torch.inference_mode(False), torch.no_grad():
            return ddlm_denoise(self.prior, low_dose.clone(), self.ddlm, generator=generator)

    def forward(self, low_dose: Tensor) -> Tensor:
        return self.denoise(low_dose)

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self._grid = {}
        self._seen: set[int] = set()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        full, low, dose = batch["full_dose"], batch["low_dose"], batch["dose"]
        out = self.denoise(low, batch.get("index"), dose)
        for k in torch.unique(dose).tolist():
            mask = dose == k
            self._seen.add(k)
            self.output_metrics[k].update(out[mask], full[mask])
            self.input_metrics[k].update(low[mask], full[mask])
            kept = self._grid.setdefault(k, [])
            for f, lo, o in zip(full[mask], low[mask], out[mask]):
                if len(kept) < self.grid_slices:
                    kept.append(torch.cat([f, lo, o], dim=-1).cpu())  # (1, H, 3W)

    def on_test_epoch_end(self) -> None:
        for k, name in enumerate(self.dose_names):
            if k not in self._seen:
                continue
            output = self.output_metrics[k].compute()
            inputs = self.input_metrics[k].compute()
            for metric in self.metric_names:
                self.log(f"test/{name}/{metric}", output[metric].float())
                self.log(f"test/{name}/low_dose_{metric}", inputs[metric].float())
            if "psnr" in self.metric_names:
                self.log(f"test/{name}/psnr_gain_db", (output["psnr"] - inputs["psnr"]).float())
            self.output_metrics[k].reset()
            self.input_metrics[k].reset()
        self._write_grids()

    def _write_grids(self) -> None:
        from torchvision.utils import save_image

        for k, rows in sorted(self._grid.items()):
            grid = ((torch.cat(rows, dim=-2).clamp(-1, 1) + 1) / 2).float()  # (1, n H, 3 W)
            if self.grid_upscale > 1:
                grid = grid.repeat_interleave(self.grid_upscale, -1).repeat_interleave(self.grid_upscale, -2)
            name = self.dose_name(k)
            experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"test/{name}/grid", grid, self.global_step)
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                save_image(grid, self.output_dir / f"grid_{_safe_name(name)}.png")

    # ------------------------------------------------------------------ predict
    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Denoise a batch; write each slice as PNG and .npy under ``output_dir/<dose>/``."""
        index = batch.get("index", torch.arange(batch["low_dose"].shape[0]))
        dose = batch.get("dose", torch.zeros_like(index))
        out = self.denoise(batch["low_dose"], index, dose)
        if self.output_dir is not None:
            self._write_slices(out, index, dose)
        return {"index": index.cpu(), "dose": dose.cpu(), "denoised": out.float().cpu()}

    def _write_slices(self, out: Tensor, index: Tensor, dose: Tensor) -> None:
        from torchvision.utils import save_image

        window = getattr(self, "window", None)
        for image, i, k in zip(out.float().cpu(), index.tolist(), dose.tolist()):
            folder = self.output_dir / _safe_name(self.dose_name(k))
            folder.mkdir(parents=True, exist_ok=True)
            save_image((image.clamp(-1, 1) + 1) / 2, folder / f"slice_{i:04d}.png")
            values = image[0]
            if window is not None:
                values = (
                    window.unit_to_mu(values) if window.units == "attenuation" else window.unit_to_hu(values)
                )
            np.save(folder / f"slice_{i:04d}.npy", values.numpy().astype(np.float32))

    def on_predict_start(self) -> None:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)


__all__ = ["LDCTDenoising"]
