"""Guidance as denoiser wrappers, and the same guidance as a separate probability-flow ODE term.

Every guidance here changes the denoiser by a correction ``delta``: ``D_guided = D_base + delta``. In the
VE view the probability-flow ODE is (Karras et al. 2022, eq. 3 with ``sigma(t) = t``)::

    dx/dsigma = (x - D(x, sigma)) / sigma

so adding ``delta`` to ``D`` adds ``-delta / sigma`` to ``dx/dsigma``. :func:`guidance_term` returns that
term, so that splitting samplers (Wizadwongsa & Suwajanakorn 2023) can integrate the guidance apart from the
diffusion part ``(x - D_base) / sigma``; the wrappers' ``forward`` returns ``D_base + delta`` for every
other sampler. By Tweedie, ``D = x + sigma^2 grad log p_sigma(x)``, so a gradient ``grad_x log q`` added
to the score is ``delta = sigma^2 grad_x log q``.

* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022): ``D_w = D_u + (1 + w)(D_c - D_u)``; base ``D_c``,
  ``delta = w (D_c - D_u)``. Since ``x0 = x - sigma eps`` is affine in eps with the same ``x``, this equals
  the usual ``eps_w = (1 + w) eps_c - w eps_u``.
* :class:`ClassifierGuidance` (Dhariwal & Nichol 2021, Alg. 1 / eq. 12 in the VE view):
  ``delta = s sigma^2 grad_x log p(c | x, sigma)``. At ``s = 1`` with the exact classifier this is
  exactly the conditional denoiser (Bayes: ``grad log p(x | c) = grad log p(x) + grad log p(c | x)``).
* :class:`LossGuidance`: ``delta = -s sigma^2 grad_x L(D(x, sigma))`` for a differentiable loss ``L`` on
  the denoised estimate (gradient through the denoiser, as in DPS / DiffuseIT). Sign convention: ``L`` is
  a loss to be *decreased*; ``-L`` plays the role of ``log p(y | x)``, so a positive scale moves samples
  towards lower loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import DenoiserFn, append_dims, broadcast_sigma


def _per_sample(value: Tensor | float, x: Tensor) -> Tensor:
    """A float or (B,) tensor as a tensor broadcastable against x."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.ndim == 0:
        return value
    if value.shape != (x.shape[0],):
        raise ValueError(f"per-sample value must have shape ({x.shape[0]},), got {tuple(value.shape)}")
    return append_dims(value, x.ndim)


class Guidance(nn.Module):
    """A guided denoiser ``D_base + correction``; ``denoiser`` is the unguided (base) denoiser."""

    def __init__(self, denoiser: DenoiserFn) -> None:
        super().__init__()
        self.denoiser = denoiser

    def base(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """The unguided denoiser whose ODE the guidance term is added to."""
        return self.denoiser(x, sigma, **cond)

    def correction(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """``delta(x, sigma)`` with ``D_guided = D_base + delta``."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        return self.base(x, sigma, **cond) + self.correction(x, sigma, **cond)

    def ode_term(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        """The guidance's contribution to ``dx/dsigma``: ``-delta / sigma`` (see :func:`guidance_term`)."""
        return guidance_term(self, x, sigma, **cond)


def guidance_term(guidance: Guidance, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
    """``g(x, sigma) = -delta(x, sigma) / sigma``: the guidance part of the VE probability-flow ODE.

    ``dx/dsigma = (x - D_base)/sigma + g`` equals ``(x - D_guided)/sigma`` for ``D_guided = D_base + delta``.
    """
    sigma = broadcast_sigma(sigma, x)
    return -guidance.correction(x, sigma, **cond) / append_dims(sigma, x.ndim)


# ---------------------------------------------------------------------------------------------------
class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022): ``D_w = D_u + (1 + w)(D_c - D_u)``.

    One forward pass over the concatenation of the conditional and the unconditional batch (2B rows).
    The unconditional half uses ``labels = null_label`` and, for other keywords, the values in ``null_cond``
    (broadcast to the batch); remaining batch-shaped conditioning tensors are repeated.

    Args:
        denoiser: a class-conditional denoiser ``D(x, sigma, labels=...)``.
        w: guidance weight (float or per-sample (B,) tensor); ``w = 0`` is the plain conditional model.
        null_label: the label that means "unconditional" (e.g. ``num_classes``).
        null_cond: unconditional values of other conditioning keywords (e.g. an empty-prompt embedding).
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        w: float | Tensor,
        null_label: int | None = None,
        null_cond: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(denoiser)
        if null_label is None and not null_cond:
            raise ValueError(
                "ClassifierFreeGuidance needs null_label or null_cond to form the unconditional half"
            )
        self.w = w
        self.null_label = null_label
        self.null_cond = dict(null_cond or {})

    def _cond_and_uncond(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> tuple[Tensor, Tensor]:
        """(D_c, D_u) from one forward pass over the doubled batch."""
        b = x.shape[0]
        sigma = broadcast_sigma(sigma, x)
        cond, uncond = dict(cond), {}
        if self.null_label is not None:
            if "labels" not in cond:
                raise ValueError("ClassifierFreeGuidance with null_label needs labels= in the conditioning")
            cond["labels"] = torch.as_tensor(cond["labels"], device=x.device).reshape(-1).expand(b)
            uncond["labels"] = torch.full_like(cond["labels"], self.null_label)
        for key, value in self.null_cond.items():
            if key not in cond:
                raise ValueError(f"null_cond has {key!r} but the conditioning passed has no {key}=")
            c = torch.as_tensor(cond[key], device=x.device)
            cond[key] = c = c.expand(b, *c.shape[1:]) if c.ndim > 0 and c.shape[0] == 1 else c
            uncond[key] = torch.as_tensor(value).to(c).expand_as(c)
        both = {}
        for key, c in cond.items():
            if key in uncond:
                both[key] = torch.cat([c, uncond[key]])
            elif isinstance(c, Tensor) and c.ndim > 0 and c.shape[0] == b:
                both[key] = torch.cat([c, c])
            else:  # a scalar or non-batch value shared by both halves
                both[key] = c
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        return out[:b], out[b:]

    def correction(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        d_c, d_u = self._cond_and_uncond(x, sigma, **cond)
        return _per_sample(self.w, d_c) * (d_c - d_u)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        if isinstance(self.w, (int, float)) and self.w == 0:
            return self.denoiser(x, sigma, **cond)
        d_c, d_u = self._cond_and_uncond(x, sigma, **cond)
        return d_u + (1 + _per_sample(self.w, d_c)) * (d_c - d_u)


# ---------------------------------------------------------------------------------------------------
def _grad_wrt_x(objective: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x sum(objective(x)), objective(x).detach()) with gradients enabled even under no_grad."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        value = objective(x_in)
        (grad,) = torch.autograd.grad(value.sum(), x_in)
    return grad, value.detach()


class ClassifierGuidance(Guidance):
    """Classifier guidance (Dhariwal & Nichol 2021) in the VE view:
    ``D_guided = D(x) + scale * sigma^2 * grad_x log p(c | x, sigma)``.

    Args:
        denoiser: the base denoiser (conditional or not).
        classifier: ``classifier(x, sigma) -> logits (B, C)`` on the VE-view input (a guided-diffusion
            classifier: :class:`~diffusion_lab.pretrained.guided_diffusion.NoisyClassifierVE`).
        scale: guidance scale ``s`` (float or per-sample (B,) tensor).
        pass_cond: also give the base denoiser the ``labels`` (off: an unconditional model + classifier).
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        classifier: Callable[..., Tensor],
        scale: float | Tensor,
        pass_cond: bool = False,
    ) -> None:
        super().__init__(denoiser)
        self.classifier = classifier
        self.scale = scale
        self.pass_cond = pass_cond

    def base(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        if not self.pass_cond:
            cond = {k: v for k, v in cond.items() if k != "labels"}
        return self.denoiser(x, sigma, **cond)

    def log_prob_grad(self, x: Tensor, sigma: Tensor | float, labels: Tensor) -> Tensor:
        """grad_x log p(labels | x, sigma) per sample."""
        sigma = broadcast_sigma(sigma, x)
        labels = torch.as_tensor(labels, device=x.device).reshape(-1).expand(x.shape[0])

        def log_p(x_in: Tensor) -> Tensor:
            log_probs = torch.log_softmax(self.classifier(x_in, sigma), dim=-1)
            return log_probs.gather(1, labels[:, None].long()).squeeze(1)

        grad, _ = _grad_wrt_x(log_p, x)
        return grad.to(x.dtype)

    def correction(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        if "labels" not in cond:
            raise ValueError("ClassifierGuidance needs labels= (the class to guide towards)")
        sigma = broadcast_sigma(sigma, x)
        grad = self.log_prob_grad(x, sigma, cond["labels"])
        return _per_sample(self.scale, x) * append_dims(sigma, x.ndim).to(x.dtype) ** 2 * grad


class LossGuidance(Guidance):
    """Loss guidance on the denoised estimate: ``D_guided = D(x) - scale * sigma^2 * grad_x L(D(x, sigma))``.

    The gradient flows through the denoiser (DPS, Chung et al. 2023; DiffuseIT, Kwon & Ye 2023). ``L`` is a
    loss to decrease: the guidance treats ``-L`` as ``log p(y | x)``.

    Args:
        denoiser: the base denoiser.
        loss_fn: ``loss_fn(x0_hat, x=x, sigma=sigma, **cond) -> (B,)`` per-sample losses (a scalar is
            treated as the sum over the batch; a mean would divide the gradient by B).
        scale: guidance scale (float or per-sample (B,) tensor).
    """

    def __init__(self, denoiser: DenoiserFn, loss_fn: Callable[..., Tensor], scale: float | Tensor) -> None:
        super().__init__(denoiser)
        self.loss_fn = loss_fn
        self.scale = scale

    def _denoised_and_grad(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> tuple[Tensor, Tensor]:
        """(D(x), grad_x L(D(x))), one forward and one backward through the denoiser."""
        denoised = {}

        def loss(x_in: Tensor) -> Tensor:
            x0_hat = self.denoiser(x_in, sigma, **cond)
            denoised["x0"] = x0_hat.detach()
            return self.loss_fn(x0_hat, x=x_in, sigma=sigma, **cond)

        grad, _ = _grad_wrt_x(loss, x)
        return denoised["x0"], grad.to(x.dtype)

    def correction(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        _, grad = self._denoised_and_grad(x, sigma, **cond)
        return -_per_sample(self.scale, x) * append_dims(sigma, x.ndim).to(x.dtype) ** 2 * grad

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        x0_hat, grad = self._denoised_and_grad(x, sigma, **cond)
        return x0_hat - _per_sample(self.scale, x) * append_dims(sigma, x.ndim).to(x.dtype) ** 2 * grad


__all__ = ["Guidance", "ClassifierFreeGuidance", "ClassifierGuidance", "LossGuidance", "guidance_term"]
