"""Client objectives: how a method shapes local training without touching the training loop.

The loop (:func:`fedlora.client.train.train_local`) computes the task loss, adds :meth:`Objective.loss`, calls
``backward``, lets :meth:`Objective.after_backward` correct the gradients, clips, steps, and lets
:meth:`Objective.after_step` move the parameters (without gradient). Which tensors train is
the plan's business (:class:`fedlora.methods.base.Stage`). The hooks receive the client's tensors at the client's
rank, keyed like the adapter state: ``params`` are differentiable views (fresh each step), ``grads`` are views of
the gradients that may be changed in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch


class Objective:
    """No extra term and no correction; subclasses override one or both hooks."""

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """An extra differentiable term added to the task loss (None: nothing)."""
        return None

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Correct the gradients in place after ``backward`` and before clipping and the optimiser step."""

    def after_step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        """Change the parameters in place after the optimiser step (``lr``: the local learning rate); runs under
        ``torch.no_grad``."""


class Combined(Objective):
    """Several objectives: their loss terms add up, their gradient corrections apply in order."""

    def __init__(self, parts: Iterable[Objective]) -> None:
        self.parts: Sequence[Objective] = tuple(parts)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        terms = [t for t in (p.loss(params) for p in self.parts) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        for p in self.parts:
            p.after_backward(grads)

    def after_step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        for p in self.parts:
            p.after_step(params, lr)


class ProximalTerm(Objective):
    """``(μ/2)·Σ_X ‖X − X_anchor‖²`` over ``anchors``' keys (FedProx: the trainable tensors at round start)."""

    def __init__(self, mu: float, anchors: Mapping[str, torch.Tensor]) -> None:
        self.mu = float(mu)
        self.anchors = {k: v.detach().clone() for k, v in anchors.items()}

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mu == 0.0:
            return None
        total = None
        for key, anchor in self.anchors.items():
            if key not in params:
                continue
            term = (params[key] - anchor.to(params[key].dtype)).pow(2).sum()
            total = term if total is None else total + term
        return None if total is None else 0.5 * self.mu * total


class GradientShift(Objective):
    """SCAFFOLD's control-variate correction ``c − c_i`` per key, on the gradient (``g ← g + shift``, the paper's SGD
    form) or, with ``after_step=True``, on the parameters after each optimiser step (``θ ← θ − lr·shift``, the form
    OpenFedLLM uses with AdamW; identical to the first under plain SGD without clipping)."""

    def __init__(self, shift: Mapping[str, torch.Tensor], *, after_step: bool = False) -> None:
        self.shift = {k: v.detach() for k, v in shift.items()}
        self.on_params = after_step

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        if self.on_params:
            return
        for key, s in self.shift.items():
            if key in grads:
                grads[key].add_(s.to(grads[key].dtype))

    def after_step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        if not self.on_params:
            return
        for key, s in self.shift.items():
            if key in params:
                params[key].sub_(lr * s.to(params[key].dtype))
