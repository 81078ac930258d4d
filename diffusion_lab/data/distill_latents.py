"""Latents of an image DataModule under a diffusers ``AutoencoderKL``, encoded once and cached on disk.

Latent diffusion (Rombach et al. 2022, sec. 3) and latent guided distillation (Meng et al. 2023, sec. 5) train
on ``z = s (E(x) - b)`` (``pretrained.diffusers.LatentCodec``). Encoding every epoch would cost as much as the
diffusion model itself, so :class:`CachedLatents` encodes each split of the wrapped image DataModule once (the
posterior mean by default), writes ``{cache_dir}/{data}-{split}-{key}.safetensors`` (latents + labels; the key
hashes the VAE weights, the scaling, the wrapped DataModule's class and hyperparameters and the encoding mode,
so a different VAE or data set never reuses a stale file) and serves ``(latents, labels)`` batches. Random
augmentations of the wrapped data (e.g. flips) are frozen at encoding time. The images and the VAE are touched
only when a split is not cached yet (or to decode).

``decode`` maps latents back to images (``predict`` of ``GuidedDistillation`` uses it to write images).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lab.data.base import DataModuleBase
from diffusion_lab.metrics.features import file_digest
from diffusion_lab.pretrained.diffusers import WEIGHTS_NAME, LatentCodec, load_diffusers_vae


class CachedLatents(DataModuleBase):
    """``(latents (B, C_z, R/f, R/f), labels (B,))`` of an image DataModule under the VAE in ``vae_path``.

    The image DataModule and the VAE are only built when a split has to be encoded (or latents decoded), so a
    config instantiates, and a run whose latents are cached trains, without the images at hand.

    Args:
        vae_path: a diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``), read offline.
        data: the image DataModule (batches ``(images in [-1, 1], labels)``), or give ``data_class`` (its class
            path) and ``data_args`` (its arguments) to build it lazily, as YAML does.
        num_classes: classes of the data (default: the DataModule's; required with ``data_class``).
        latent_shape: ``(C_z, h, w)`` of one latent (default: from the VAE config and the data's resolution;
            required with ``data_class``), e.g. ``[4, 32, 32]`` for 256 px images and Stable Diffusion's VAE.
        scaling_factor: latent scale ``s`` (default: the VAE config's).
        cache_dir: where the encoded splits are stored.
        sample_posterior: encode a posterior sample (seeded per split) instead of its mean.
        encode_batch_size: images per VAE call while encoding.
        device: where the VAE runs while encoding (and decoding).
        batch_size, num_workers, val_batch_size, drop_last, pin_memory: see ``DataModuleBase``.
    """

    def __init__(
        self,
        vae_path: str,
        data: LightningDataModule | None = None,
        data_class: str | None = None,
        data_args: dict[str, Any] | None = None,
        num_classes: int | None = None,
        latent_shape: list[int] | None = None,
        scaling_factor: float | None = None,
        cache_dir: str = "data_cache/latents",
        sample_posterior: bool = False,
        encode_batch_size: int = 64,
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if (data is None) == (data_class is None):
            raise ValueError("give exactly one of data (a DataModule) and data_class (+ data_args)")
        if data_class is not None and (num_classes is None or latent_shape is None):
            raise ValueError(
                "with data_class, also give num_classes and latent_shape (nothing is built until setup)"
            )
        self.vae_path, self._data, self.data_class, self.data_args = (
            vae_path,
            data,
            data_class,
            data_args or {},
        )
        self._num_classes = num_classes if num_classes is not None else getattr(data, "num_classes", 0)
        self.scaling_factor, self.device = scaling_factor, device
        self.cache_dir, self.sample_posterior = Path(cache_dir), sample_posterior
        self.encode_batch_size = encode_batch_size
        self._codec: LatentCodec | None = None
        self._key: str | None = None
        if data is not None:
            self._data_name, self._data_args = type(data).__name__, dict(getattr(data, "hparams", {}))
        else:
            self._data_name, self._data_args = data_class.rpartition(".")[2], dict(self.data_args)
        if latent_shape is None:
            config = self.codec.vae.config
            factor = 2 ** (len(config.block_out_channels) - 1)
            resolution = getattr(data, "resolution", None)
            if resolution is None or resolution % factor:
                raise ValueError(
                    f"image resolution {resolution} of {type(data).__name__} is not a multiple of {factor}"
                )
            latent_shape = [config.latent_channels, resolution // factor, resolution // factor]
        if len(latent_shape) != 3 or min(latent_shape) < 1:
            raise ValueError(f"latent_shape must be [channels, height, width], got {latent_shape}")
        self._shape = tuple(int(v) for v in latent_shape)

    @property
    def codec(self) -> LatentCodec:
        if self._codec is None:
            self._codec = load_diffusers_vae(
                self.vae_path, scaling_factor=self.scaling_factor, device=self.device
            )
        return self._codec

    @property
    def data(self) -> LightningDataModule:
        if self._data is None:
            from diffusion_lab.cli import instantiate

            self._data = instantiate({"class_path": self.data_class, "init_args": self.data_args})
        return self._data

    @property
    def key(self) -> str:
        """Hash of the VAE weights and scale, the data's class and arguments, and the encoding mode (computed once,
        from what was given: the DataModule instance's hyperparameters, or ``data_class`` and ``data_args``)."""
        if self._key is None:
            vae_path = Path(self.vae_path)
            weights = next(iter(sorted(vae_path.rglob(WEIGHTS_NAME))), None) if vae_path.is_dir() else None
            parts = {
                "vae": file_digest(weights) if weights is not None else str(vae_path),
                "scale": self.scaling_factor,
                "data": self._data_name,
                "args": {k: repr(v) for k, v in sorted(self._data_args.items())},
                "sample": self.sample_posterior,
            }
            self._key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        return self._key

    # ---- shape information -------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return self._shape[0]

    @property
    def resolution(self) -> int:
        return self._shape[1]

    @property
    def num_classes(self) -> int:
        return self._num_classes

    # ---- encoding ------------------------------------------------------------------------------------
    def cache_path(self, split: str) -> Path:
        return self.cache_dir / f"{self._data_name}-{split}-{self.key}.safetensors"

    @torch.no_grad()
    def encode_split(self, split: str) -> tuple[Tensor, Tensor]:
        """Latents and labels of one split of ``data`` (in order), from the cache or encoded and cached now."""
        from safetensors.torch import load_file, save_file

        path = self.cache_path(split)
        if path.is_file():
            stored = load_file(str(path))
            return stored["latents"], stored["labels"]
        dataset = getattr(self.data, f"{split}_set")
        generator = torch.Generator(self.device).manual_seed(0)
        latents, labels = [], []
        for images, y in DataLoader(dataset, batch_size=self.encode_batch_size, shuffle=False):
            z = self.codec.encode(images.to(self.device), sample=self.sample_posterior, generator=generator)
            latents.append(z.float().cpu())
            labels.append(torch.as_tensor(y).long())
        result = {"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(result, str(tmp), metadata={"key": self.key, "split": split})
        tmp.replace(path)  # readers never see half a file
        return result["latents"], result["labels"]

    def setup(self, stage: str | None = None) -> None:
        """Serve each split from its cache file; the image data are set up only if a split must be encoded."""
        for split in ("train", "val"):
            if getattr(self, f"{split}_set") is not None:
                continue
            if not self.cache_path(split).is_file():
                self.data.setup("fit")
                if getattr(self.data, f"{split}_set", None) is None:
                    continue  # e.g. no validation split
            setattr(self, f"{split}_set", TensorDataset(*self.encode_split(split)))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] of latents (B, C_z, h, w)."""
        return self.codec.decode(latents.to(self.device)).clamp(-1, 1)


__all__ = ["CachedLatents"]
