"""Embeddings of scalar conditions shared by every backbone: noise level, class label, extra scalars.

* Sinusoidal ("positional") embedding (Vaswani et al. 2017, sec. 3.5; used on the timestep by
  Ho et al. 2020 and Dhariwal & Nichol 2021): for ``half = dim // 2`` and ``i = 0 .. half - 1``::

      f_i          = max_period ** (-i / half)
      emb[i]       = cos(x f_i)
      emb[half+i]  = sin(x f_i)

  (a zero column is appended when ``dim`` is odd).
* Random Fourier features (Tancik et al. 2020; the Gaussian Fourier projection of NCSN++, Song et
  al. 2021): fixed ``b_i ~ N(0, std^2)``, ``emb = [cos(2 pi x b), sin(2 pi x b)]``.
* ``ConditionEmbedding`` combines them into the one vector a backbone adds to its features::

      emb = MLP(noise_embedding(scale * c_noise)) + E[label] + sum_s W_s sinusoid(scalar_scale * s)

  ``E`` has ``num_classes + 1`` rows; the last row is the learned null label of classifier-free
  guidance (Ho & Salimans 2022), used when ``labels`` is None. Each extra scalar (e.g. the guidance
  weight ``guidance_w`` of guided distillation, Meng et al. 2023) gets a sinusoidal embedding of
  ``1000 * s`` projected by a bias-free linear layer, so ``W_s`` starts the network's response to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

NoiseEmbedding = Literal["positional", "fourier"]


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a (B,) tensor -> (B, dim) float32 (formula in the module docstring)."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    half = dim // 2
    x = x.reshape(-1).float()
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / max(half, 1)
    )
    args = x[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class SinusoidalEmbedding(nn.Module):
    """``sinusoidal_embedding(scale * x, dim)`` as a module (no parameters)."""

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.scale, self.max_period = dim, scale, max_period

    def forward(self, x: Tensor) -> Tensor:
        return sinusoidal_embedding(self.scale * x.float(), self.dim, self.max_period)


class FourierFeatures(nn.Module):
    """Random Fourier features ``[cos(2 pi x b), sin(2 pi x b)]`` with fixed ``b ~ N(0, std^2)`` (NCSN++).

    The frequencies are a persistent buffer, so a checkpoint restores them exactly.
    """

    def __init__(self, dim: int, std: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FourierFeatures needs an even dim >= 2, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * std)

    def forward(self, x: Tensor) -> Tensor:
        args = 2 * math.pi * x.reshape(-1).float()[:, None] * self.freqs[None, :].float()
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Noise level + class label + named scalars -> one (B, emb_dim) vector (module docstring).

    Args:
        emb_dim: width of the output vector.
        in_dim: width of the raw noise embedding fed to the MLP (the backbone's base width).
        num_classes: number of classes; 0 means unconditional (``labels`` must then be None).
        scalar_conditions: names of extra scalar keyword inputs, each a (B,) tensor (e.g. ``guidance_w``).
        noise_embedding: ``positional`` (sinusoidal) or ``fourier`` (random Fourier features).
        noise_embedding_scale: multiplier of ``c_noise`` before embedding (positional) or the standard
            deviation of the Fourier frequencies (fourier). With ``positional``, scale 1 suits both a
            0..999 timestep and EDM's ``ln(sigma)/4`` (as in EDM's DDPM++); with ``fourier``, 16 is NCSN++'s.
        scalar_embedding_scale: multiplier of each extra scalar before its sinusoidal embedding (1000).
    """

    def __init__(
        self,
        emb_dim: int,
        in_dim: int,
        num_classes: int = 0,
        scalar_conditions: Sequence[str] = (),
        noise_embedding: NoiseEmbedding = "positional",
        noise_embedding_scale: float = 1.0,
        scalar_embedding_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if noise_embedding == "positional":
            self.noise_features: nn.Module = SinusoidalEmbedding(in_dim, scale=noise_embedding_scale)
        elif noise_embedding == "fourier":
            self.noise_features = FourierFeatures(in_dim, std=noise_embedding_scale)
        else:
            raise ValueError(
                f"unknown noise_embedding {noise_embedding!r}; expected 'positional' or 'fourier'"
            )
        self.noise_mlp = nn.Sequential(nn.Linear(in_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.num_classes = num_classes
        # Row num_classes is the null label (classifier-free guidance); labels=None selects it.
        self.label_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        names = list(scalar_conditions)
        if len(set(names)) != len(names) or any(not n.isidentifier() or n == "labels" for n in names):
            raise ValueError(
                f"scalar_conditions must be distinct identifiers other than 'labels', got {names}"
            )
        self.scalar_conditions = names
        self.scalar_embedding = SinusoidalEmbedding(in_dim, scale=scalar_embedding_scale)
        self.scalar_projections = nn.ModuleDict({n: nn.Linear(in_dim, emb_dim, bias=False) for n in names})

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _per_sample(self, name: str, value: Tensor | float, batch: int, device: torch.device) -> Tensor:
        value = torch.as_tensor(value, device=device)
        if value.ndim == 0:
            value = value.expand(batch)
        if value.ndim != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        return value

    def forward(
        self,
        c_noise: Tensor | float,
        batch: int,
        labels: Tensor | None = None,
        scalars: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """(B, emb_dim) embedding; ``c_noise`` scalar or (B,), ``labels`` (B,) long or None (null label)."""
        weight = self.noise_mlp[0].weight
        c_noise = self._per_sample("c_noise", c_noise, batch, weight.device)
        emb = self.noise_mlp(self.noise_features(c_noise).to(weight.dtype))
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError(
                    "labels were given to an unconditional network (num_classes=0); pass labels=None"
                )
        else:
            if labels is None:
                labels = torch.full((batch,), self.null_label, dtype=torch.long, device=weight.device)
            labels = self._per_sample("labels", labels, batch, weight.device)
            if labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
            # Checking values needs a host sync on accelerators, so only check on CPU (CUDA asserts anyway).
            if labels.device.type == "cpu" and ((labels < 0) | (labels > self.null_label)).any():
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                    f"got min {int(labels.min())} max {int(labels.max())}"
                )
            emb = emb + self.label_embedding(labels.long())
        scalars = {} if scalars is None else scalars
        unexpected = set(scalars) - set(self.scalar_conditions)
        if unexpected:
            raise ValueError(
                f"unexpected conditioning inputs {sorted(unexpected)}; this network accepts labels and "
                f"scalar_conditions={self.scalar_conditions}"
            )
        for name in self.scalar_conditions:
            if name not in scalars:
                raise ValueError(
                    f"missing conditioning input {name!r} (a ({batch},) tensor); it is in scalar_conditions"
                )
            value = self._per_sample(name, scalars[name], batch, weight.device)
            emb = emb + self.scalar_projections[name](self.scalar_embedding(value).to(weight.dtype))
        return emb


__all__ = [
    "ConditionEmbedding",
    "FourierFeatures",
    "NoiseEmbedding",
    "SinusoidalEmbedding",
    "sinusoidal_embedding",
]
