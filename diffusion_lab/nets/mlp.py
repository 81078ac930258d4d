"""Small residual MLP backbone ``F(x, c_noise, labels=None, **scalars)`` for low-dimensional toy data.

``h_0 = W_in x``; ``depth`` pre-norm residual blocks ``h <- h + W_2 SiLU(W_1 SiLU(LN(h)) + U e)`` with the
condition vector ``e`` from ``ConditionEmbedding`` (noise level, class label with a learned null label,
named extra scalars); output ``W_out SiLU(LN(h))``. The same conditioning contract as ``UNet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.nets.embeddings import ConditionEmbedding, NoiseEmbedding


class _ResidualMLPBlock(nn.Module):
    def __init__(self, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(emb_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))
        return h + self.fc2(self.dropout(F.silu(z)))


class MLP(nn.Module):
    """Residual MLP ``F(x, c_noise, labels=None, **scalars) -> (B, dim)`` for (B, dim) inputs.

    Args:
        dim: data dimension (2 for the toy mixtures).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        num_classes: number of classes (0: unconditional); ``labels=None`` selects the null label.
        scalar_conditions: names of extra scalar keyword inputs (e.g. ``["guidance_w"]``).
        dropout: dropout inside the residual blocks.
        noise_embedding, noise_embedding_scale: see ``ConditionEmbedding``.
        emb_dim: width of the condition vector (default ``hidden``).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        num_classes: int = 0,
        scalar_conditions: Sequence[str] = (),
        dropout: float = 0.0,
        noise_embedding: NoiseEmbedding = "positional",
        noise_embedding_scale: float = 1.0,
        emb_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(
                f"need dim >= 1, hidden >= 1, depth >= 0; got dim={dim}, hidden={hidden}, depth={depth}"
            )
        self.dim, self.num_classes, self.scalar_conditions = dim, num_classes, list(scalar_conditions)
        emb_dim = emb_dim if emb_dim is not None else hidden
        self.condition = ConditionEmbedding(
            emb_dim,
            hidden,
            num_classes=num_classes,
            scalar_conditions=scalar_conditions,
            noise_embedding=noise_embedding,
            noise_embedding_scale=noise_embedding_scale,
        )
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, dim)

    def forward(
        self, x: Tensor, c_noise: Tensor | float, labels: Tensor | None = None, **scalars: Tensor
    ) -> Tensor:
        """x (B, dim), c_noise scalar or (B,), labels (B,) long or None -> (B, dim)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects input of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.condition(c_noise, x.shape[0], labels, scalars)
        h = self.input(x.to(self.input.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h))).to(x.dtype)


__all__ = ["MLP"]
