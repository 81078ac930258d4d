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

**Text conditioning** (``captions``): each image's caption (a CSV/JSON next to the image folder or one ``.txt``
per image, ``data.captions``) is embedded once by an open_clip text tower read from ``text_encoder_path`` (the
unit-norm pooled CLIP text embedding, (E,)) and stored in the same cache file as ``text_emb``; batches are then
``(latents, text_emb)``, the ``condition: text_emb`` input of ``GuidedDistillation``. The cache key also hashes
the text encoder's weights and configuration and the captions file (per-image ``.txt`` captions are not hashed:
clear the cache after editing them). The wrapped DataModule must list each split's files in order
(``split_files``, as ``ImageFolder``).
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
from diffusion_lab.data.captions import caption_file, encode_captions, read_captions
from diffusion_lab.metrics.features import file_digest
from diffusion_lab.pretrained.diffusers import WEIGHTS_NAME, LatentCodec, load_diffusers_vae


class CachedLatents(DataModuleBase):
    """``(latents (B, C_z, R/f, R/f), labels (B,))`` of an image DataModule under the VAE in ``vae_path``, or
    ``(latents, text_emb (B, E))`` with ``captions``.

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
        device: where the VAE (and the text encoder) run while encoding (and decoding).
        captions: serve CLIP text embeddings of captions instead of labels: a ``.csv`` (columns file, caption)
            or ``.json`` file next to the image folder, or ``txt`` (one ``.txt`` per image); see ``data.captions``.
        text_encoder_path: local open_clip weights file of the text encoder (e.g. ``open_clip_model.safetensors``
            of ``timm/vit_base_patch32_clip_224.openai``); read only when captions must be encoded.
        text_encoder_arch: its open_clip architecture (``ViT-B-32``: E = 512).
        text_encoder_cfg: an explicit open_clip model config instead of the named architecture's (tiny models).
        text_batch_size: captions per text-encoder call.
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
        captions: str | None = None,
        text_encoder_path: str | None = None,
        text_encoder_arch: str = "ViT-B-32",
        text_encoder_cfg: dict[str, Any] | None = None,
        text_batch_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_batch_size, drop_last, pin_memory)
        if (data is None) == (data_class is None):
            raise ValueError("give exactly one of data (a DataModule) and data_class (+ data_args)")
        if data_class is not None and (latent_shape is None or (num_classes is None and captions is None)):
            raise ValueError(
                "with data_class, also give num_classes and latent_shape (nothing is built until setup)"
            )
        if captions is not None and text_encoder_path is None:
            raise ValueError(
                f"captions={captions!r} needs text_encoder_path, a local open_clip weights file of the text encoder"
            )
        self.captions, self.text_encoder_path = captions, text_encoder_path
        self.text_encoder_arch, self.text_encoder_cfg = text_encoder_arch, text_encoder_cfg
        self.text_batch_size = text_batch_size
        self._text_encoder: Any = None
        self.vae_path, self._data, self.data_class, self.data_args = (
            vae_path,
            data,
            data_class,
            data_args or {},
        )
        self._num_classes = num_classes if num_classes is not None else getattr(data, "num_classes", 0)
        if captions is not None:
            self._num_classes = 0  # text conditioning: the batches carry text embeddings, not labels
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
    def text_encoder(self) -> Any:
        """The CLIP text encoder (``pretrained.clip.ClipEncoder``), loaded on first use."""
        if self._text_encoder is None:
            from diffusion_lab.pretrained.clip import load_clip

            self._text_encoder = load_clip(
                self.text_encoder_path,
                self.text_encoder_arch,
                model_cfg=self.text_encoder_cfg,
                device=self.device,
            ).eval()
        return self._text_encoder

    @property
    def text_dim(self) -> int | None:
        """Width E of the text embeddings (from the open_clip config, without loading weights); None without
        captions."""
        if self.captions is None:
            return None
        cfg = self.text_encoder_cfg
        if cfg is None:
            import open_clip

            cfg = open_clip.get_model_config(self.text_encoder_arch) or {}
        if "embed_dim" not in cfg:
            raise KeyError(
                f"unknown open_clip architecture {self.text_encoder_arch!r}; pass text_encoder_cfg"
            )
        return int(cfg["embed_dim"])

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
            if self.captions is not None:
                encoder = Path(self.text_encoder_path)
                root = Path(self._data_args.get("root", getattr(self._data, "root", ".")))
                path = caption_file(root, self.captions) if self.captions != "txt" else None
                parts["text"] = {
                    "encoder": file_digest(encoder) if encoder.is_file() else str(encoder),
                    "arch": self.text_encoder_arch,
                    "cfg": repr(self.text_encoder_cfg),
                    "captions": file_digest(path) if path is not None else self.captions,
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

    def _served(self, stored: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return stored["latents"], stored["text_emb" if self.captions is not None else "labels"]

    @torch.no_grad()
    def encode_split(self, split: str) -> tuple[Tensor, Tensor]:
        """Latents and labels (text embeddings with ``captions``) of one split of ``data`` (in order), from the
        cache or encoded and cached now."""
        from safetensors.torch import load_file, save_file

        path = self.cache_path(split)
        if path.is_file():
            return self._served(load_file(str(path)))
        text_emb = self._encode_text(split) if self.captions is not None else None  # first: fail fast
        dataset = getattr(self.data, f"{split}_set")
        generator = torch.Generator(self.device).manual_seed(0)
        latents, labels = [], []
        for images, y in DataLoader(dataset, batch_size=self.encode_batch_size, shuffle=False):
            z = self.codec.encode(images.to(self.device), sample=self.sample_posterior, generator=generator)
            latents.append(z.float().cpu())
            labels.append(torch.as_tensor(y).long())
        result = {"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels)}
        if text_emb is not None:
            if len(text_emb) != len(result["latents"]):
                raise RuntimeError(f"{len(text_emb)} captions for {len(result['latents'])} images in {split}")
            result["text_emb"] = text_emb
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(result, str(tmp), metadata={"key": self.key, "split": split})
        tmp.replace(path)  # readers never see half a file
        return self._served(result)

    def _encode_text(self, split: str) -> Tensor:
        """CLIP text embeddings (N, E) of the captions of ``split``'s images, in the split's order."""
        split_files = getattr(self.data, "split_files", None)
        if split_files is None:
            raise TypeError(
                f"captions need a DataModule that lists its files per split (split_files, as ImageFolder); "
                f"{type(self.data).__name__} does not"
            )
        texts = read_captions(Path(getattr(self.data, "root", ".")), split_files(split), self.captions)
        return encode_captions(self.text_encoder, texts, self.text_batch_size)

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
