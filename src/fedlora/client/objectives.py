"""Client objectives: how a method shapes local training without touching the training loop.

The loop (:func:`fedlora.client.train.train_local`) computes the task loss, adds :meth:`Objective.loss`, calls
``backward``, lets :meth:`Objective.after_backward` correct the gradients, clips, and steps. Which tensors train is
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
    """``g ← g + shift`` per key (SCAFFOLD's control-variate correction ``c − c_i``)."""

    def __init__(self, shift: Mapping[str, torch.Tensor]) -> None:
        self.shift = {k: v.detach() for k, v in shift.items()}

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        for key, s in self.shift.items():
            if key in grads:
                grads[key].add_(s.to(grads[key].dtype))
