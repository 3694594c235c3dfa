"""The bridge between an :data:`AdapterState` and a live peft model.

:class:`AdapterSlots` maps every key of ``get_peft_model_state_dict(model)`` to the parameter that holds it,
once, so that a client's turn in the local engine is "copy its tensors into the model in place, train, read
them out" with no model rebuild and no key translation per step. Writing a dense update into the frozen base
weights (FedEx-LoRA's residual, FLoRA's merge) also lives here, with the Conv1D layout rule applied once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedlora.adapters.state import AdapterState, LoraLayout, to_base_layout


class AdapterSlots:
    """In-place access to a peft model's adapter tensors by their state-dict keys."""

    def __init__(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        from peft import get_peft_model_state_dict

        by_ptr = {p.data_ptr(): p for p in model.parameters()}
        self.params: dict[str, torch.nn.Parameter] = {}
        for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
            param = by_ptr.get(tensor.data_ptr())
            if param is None or param.shape != tensor.shape:
                raise ValueError(f"cannot locate the parameter behind adapter key {key!r}")
            self.params[key] = param
        self.model = model
        self.adapter_name = adapter_name

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.params)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model in place (every key must exist; shapes must match)."""
        with torch.no_grad():
            for key, value in state.items():
                param = self.params.get(key)
                if param is None:
                    raise KeyError(f"adapter key {key!r} is not in the model")
                if param.shape != value.shape:
                    raise ValueError(f"{key}: model has shape {tuple(param.shape)}, state {tuple(value.shape)}")
                param.copy_(value)

    def read(self, keys: Iterable[str] | None = None) -> AdapterState:
        """Detached copies of the model's current adapter tensors (all, or ``keys``)."""
        names = self.params if keys is None else keys
        return {k: self.params[k].detach().clone() for k in names}

    def set_trainable(self, keys: Iterable[str]) -> list[torch.nn.Parameter]:
        """Make exactly ``keys`` trainable among the adapter tensors; return those parameters."""
        wanted = set(keys)
        unknown = wanted - set(self.params)
        if unknown:
            raise KeyError(f"unknown adapter keys {sorted(unknown)[:3]}")
        trainable = []
        for key, param in self.params.items():
            param.requires_grad_(key in wanted)
            if key in wanted:
                trainable.append(param)
        return trainable


def base_weights(model: torch.nn.Module, layout: LoraLayout) -> dict[str, torch.nn.Parameter]:
    """The frozen base weight of every adapted module, by module name."""
    modules = dict(model.named_modules())
    return {spec.name: modules[spec.name].get_base_layer().weight for spec in layout.modules}


BaseDelta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A change of one frozen weight: dense ``(out, in)``, or factored ``(B, A)`` meaning ``B @ A``."""


def add_to_base(model: torch.nn.Module, layout: LoraLayout, delta: Mapping[str, BaseDelta]) -> None:
    """``W0 += Δ`` for each module named in ``delta``.

    Δ is in nn.Linear layout ``(out, in)``, dense or factored ``(B, A)``; it is transposed only for a Conv1D weight
    (stored ``(in, out)``), the single place where layout matters.
    """
    weights = base_weights(model, layout)
    with torch.no_grad():
        for name, value in delta.items():
            spec = layout.module(name)
            dense = value[0].float() @ value[1].float() if isinstance(value, tuple) else value
            w = weights[name]
            if tuple(w.shape) != (
                (spec.in_features, spec.out_features) if spec.fan_in_fan_out else (spec.out_features, spec.in_features)
            ):
                raise ValueError(f"{name}: base weight shape {tuple(w.shape)} does not match the layout")
            w.add_(to_base_layout(spec, dense).to(w.dtype))
