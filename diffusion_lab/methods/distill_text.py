"""Pooled CLIP text conditioning for the backbones built on ``ConditionEmbedding`` (``UNet``, ``MLP``).

Text-guided latent distillation (Meng et al. 2023, sec. 5.2 / 6.3) conditions teacher and student on a caption.
Here the caption enters as one vector ``c = CLIP_text(caption)`` (unit norm, ``data.captions``), mapped by a
bias-free linear layer and added to the backbone's condition vector, the same place as the class label and the
guidance strength ``w`` (``nets.embeddings``)::

    emb = MLP(noise_embedding(c_noise)) + E[label] + sum_s W_s sinusoid(1000 s) + W_text c

``text_emb=None`` (or the zero vector, the default null embedding of ``GuidedDistillation``) adds nothing: the
unconditional model of classifier-free guidance. Token-level conditioning (cross-attention over the 77 CLIP token
states, as Stable Diffusion) is not provided by these backbones; a diffusers ``UNet2DConditionModel`` denoiser
(``pretrained.diffusers``) takes ``text_emb=`` that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from diffusion_lab.nets.embeddings import ConditionEmbedding

TEXT_KEY = "text_emb"


class TextConditionEmbedding(nn.Module):
    """A ``ConditionEmbedding`` plus ``W_text text_emb`` (module docstring); same call signature.

    Args:
        inner: the backbone's ``ConditionEmbedding`` (kept, so its weights and scalar inputs are unchanged).
        text_dim: width E of the text embeddings (512 for CLIP ViT-B/32).
        zero_init: start ``W_text`` at zero (the network then starts as its text-free self).
    """

    def __init__(self, inner: ConditionEmbedding, text_dim: int, zero_init: bool = False) -> None:
        super().__init__()
        if text_dim < 1:
            raise ValueError(f"text_dim must be >= 1, got {text_dim}")
        self.inner = inner
        self.text_dim = int(text_dim)
        weight = inner.noise_mlp[-1].weight
        self.text_projection = nn.Linear(text_dim, weight.shape[0], bias=False).to(weight)
        if zero_init:
            nn.init.zeros_(self.text_projection.weight)

    def forward(
        self,
        c_noise: Tensor | float,
        batch: int,
        labels: Tensor | None = None,
        scalars: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        scalars = dict(scalars or {})
        text = scalars.pop(TEXT_KEY, None)
        emb = self.inner(c_noise, batch, labels, scalars)
        if text is None:
            return emb
        if text.ndim != 2 or text.shape != (batch, self.text_dim):
            raise ValueError(
                f"{TEXT_KEY} must have shape ({batch}, {self.text_dim}) (one pooled embedding per sample), "
                f"got {tuple(text.shape)}"
            )
        return emb + self.text_projection(text.to(self.text_projection.weight.dtype))


def add_text_conditioning(network: nn.Module, text_dim: int, zero_init: bool = False) -> nn.Module:
    """Give ``network`` (in place) the ``text_emb=`` input: its one ``ConditionEmbedding`` is wrapped by a
    :class:`TextConditionEmbedding`. Returns ``network``; a network already text-conditioned is left as it is."""
    if any(isinstance(m, TextConditionEmbedding) for m in network.modules()):
        return network
    found = [
        (parent, name, child)
        for parent in network.modules()
        for name, child in parent.named_children()
        if isinstance(child, ConditionEmbedding)
    ]
    if len(found) != 1:
        raise ValueError(
            f"text conditioning needs a network with exactly one ConditionEmbedding (UNet, MLP); "
            f"{type(network).__name__} has {len(found)}"
        )
    parent, name, embedding = found[0]
    setattr(parent, name, TextConditionEmbedding(embedding, text_dim, zero_init))
    return network


class TextConditioned(nn.Module):
    """A backbone ``F(x, c_noise, labels=None, text_emb=None, **scalars)`` taking pooled text embeddings (YAML).

    Args:
        network: a backbone with one ``ConditionEmbedding`` (``nets.unet.UNet``, ``nets.mlp.MLP``).
        text_dim: width E of the text embeddings (the DataModule's ``text_dim``, e.g. 512 for ViT-B/32).
        zero_init: start the text projection at zero.
    """

    def __init__(self, network: nn.Module, text_dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.network = add_text_conditioning(network, text_dim, zero_init)
        self.text_dim = int(text_dim)

    @property
    def scalar_conditions(self) -> Any:
        """The wrapped backbone's list of scalar inputs (``add_guidance_embedding`` appends ``guidance_w``)."""
        return getattr(self.network, "scalar_conditions", None)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor | float,
        labels: Tensor | None = None,
        text_emb: Tensor | None = None,
        **scalars: Tensor,
    ) -> Tensor:
        if text_emb is not None:
            scalars[TEXT_KEY] = text_emb
        return self.network(x, c_noise, labels, **scalars)


__all__ = ["TEXT_KEY", "TextConditionEmbedding", "TextConditioned", "add_text_conditioning"]
