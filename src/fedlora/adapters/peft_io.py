"""The bridge between an :data:`AdapterState` and a live peft model.

:class:`AdapterSlots` maps every key of ``get_peft_model_state_dict(model)`` to the parameter that holds it,
once, so that a client's turn in the local engine is "copy its tensors into the model in place, train, read
them out" with no model rebuild and no key translation per step. Writing a dense update into the frozen base
weights (FedEx-LoRA's residual, FLoRA's merge) also lives here, with the Conv1D layout rule applied once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedlora.adapters.state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterState,
    LoraLayout,
    namespaced,
    slice_to_rank,
    to_base_layout,
)


@dataclass(frozen=True)
class _Rank:
    rank: int


class AdapterSlots:
    """In-place access to a peft model's adapter tensors by their state-dict keys.

    The default adapter's keys are peft's; a further adapter ``ns`` (``adapters=("default", "local")``) appears
    under ``"local/<peft key>"`` with its LoRA tensors only (task heads belong to the default adapter). Every LoRA
    layer is held at the global rank; :meth:`load` zero-pads a client's lower-rank factors and :meth:`read` cuts
    them back (zero rows of A with zero columns of B add exactly nothing and get zero gradients), and
    :meth:`set_scales` gives each layer the client's own scale, so a client of rank ``r_k`` trains exactly a
    rank-``r_k`` LoRA on the one shared base model.
    """

    def __init__(self, model: torch.nn.Module, adapters: Iterable[str] = ("default",)) -> None:
        from peft import get_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        by_ptr = {p.data_ptr(): p for p in model.parameters()}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.namespaces: dict[str, str] = {}
        """namespace -> peft adapter name (``""`` -> ``"default"``)."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        self.layers: dict[str, tuple[torch.nn.Module, str]] = {}
        """namespaced module name -> (LoRA layer, peft adapter name)."""
        for adapter in adapters:
            ns = "" if adapter == "default" else adapter
            self.namespaces[ns] = adapter
            lora_only = ns != ""
            for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter).items():
                if lora_only and not (key.endswith(LORA_A_SUFFIX) or key.endswith(LORA_B_SUFFIX)):
                    continue
                param = by_ptr.get(tensor.data_ptr())
                if param is None or param.shape != tensor.shape:
                    raise ValueError(f"cannot locate the parameter behind adapter key {key!r}")
                self.params[namespaced(ns, key)] = param
            for name, layer in layers:
                if adapter in layer.lora_A:
                    self.layers[namespaced(ns, name)] = (layer, adapter)
        self.model = model
        self.default_scales = {n: float(layer.scaling[a]) for n, (layer, a) in self.layers.items()}
        self._scales = dict(self.default_scales)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.params)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model in place; LoRA factors of a lower rank are zero-padded."""
        with torch.no_grad():
            for key, value in state.items():
                param = self.params.get(key)
                if param is None:
                    raise KeyError(f"adapter key {key!r} is not in the model")
                if param.shape != value.shape:
                    # a lower-rank LoRA factor: zero the whole slot, then fill its first rows (A) / columns (B)
                    target = param
                    if value.dim() == 2 and param.dim() == 2:
                        rank = value.shape[0] if key.endswith(LORA_A_SUFFIX) else value.shape[1]
                        target = slice_to_rank(key, param, {key.rsplit(".lora_", 1)[0]: _Rank(rank)})
                    if target.shape != value.shape:
                        raise ValueError(f"{key}: model has shape {tuple(param.shape)}, state {tuple(value.shape)}")
                    param.zero_()
                    target.copy_(value)
                    continue
                param.copy_(value)

    def read(self, keys: Iterable[str] | None = None, ranks: Mapping[str, object] | None = None) -> AdapterState:
        """Detached copies of the model's current adapter tensors (all, or ``keys``), cut to ``ranks``."""
        names = self.params if keys is None else keys
        out = {}
        for k in names:
            out[k] = self.view(k, ranks).detach().clone()
        return out

    def view(
        self, key: str, ranks: Mapping[str, object] | None = None, tensor: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The live tensor of ``key`` (differentiable; or ``tensor`` laid out like it, e.g. its gradient), cut to
        the client's rank when ``ranks`` has its module."""
        return slice_to_rank(key, self.params[key] if tensor is None else tensor, ranks)

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

    def set_scales(self, scales: Mapping[str, float] | None = None, weights: Mapping[str, float] | None = None) -> None:
        """Give each LoRA layer its scale (``scales`` by namespaced module name; default: peft's own) times the
        weight of its adapter's namespace in ``weights``; adapters without a weight are switched off.

        ``weights=None`` means the default adapter alone, weight 1.
        """
        weights = {"": 1.0} if weights is None else weights
        unknown = set(weights) - set(self.namespaces)
        if unknown:
            raise KeyError(f"unknown adapter namespaces {sorted(unknown)}")
        if scales is not None:
            self._scales = {**self.default_scales, **{k: float(v) for k, v in scales.items() if k in self.layers}}
        active: dict[int, list[str]] = {}
        for name, (layer, adapter) in self.layers.items():
            ns = "" if adapter == "default" else adapter
            layer.scaling[adapter] = self._scales[name] * float(weights.get(ns, 0.0))
            if ns in weights:
                active.setdefault(id(layer), []).append(adapter)
        for layer, _adapter in self.layers.values():
            names = active.get(id(layer), [])
            if len(self.namespaces) > 1 and names:
                # peft's per-layer switch (the model-level one refuses several adapters with a task head)
                current = list(layer.active_adapters)
                if sorted(current) != sorted(names):
                    grads = {id(p): p.requires_grad for p in layer.parameters()}
                    layer.set_adapter(names if len(names) > 1 else names[0])
                    for p in layer.parameters():  # set_adapter toggles requires_grad; trainability is ours
                        p.requires_grad_(grads[id(p)])

    def reset_scales(self) -> None:
        """peft's own scales, default adapter only."""
        self.set_scales(self.default_scales, None)


def base_weights(model: torch.nn.Module, layout: LoraLayout) -> dict[str, torch.nn.Parameter]:
    """The frozen base weight of every adapted module, by module name."""
    modules = dict(model.named_modules())
    return {spec.name: modules[spec.name].get_base_layer().weight for spec in layout.modules}


def linear_base_weights(model: torch.nn.Module, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """The frozen base weight of every adapted module in nn.Linear layout ``(out, in)``: detached views, a Conv1D
    weight (stored ``(in, out)``) transposed (the inverse of :func:`fedlora.adapters.state.to_base_layout`)."""
    weights = base_weights(model, layout)
    return {spec.name: to_base_layout(spec, weights[spec.name].detach()) for spec in layout.modules}


BaseDelta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A change of one frozen weight: dense ``(out, in)``, or factored ``(B, A)`` meaning ``B @ A``."""


def dense_delta(value: BaseDelta) -> torch.Tensor:
    """The ``(out, in)`` float32 matrix of a dense or factored ``(B, A)`` change."""
    return value[0].float() @ value[1].float() if isinstance(value, tuple) else value.float()


def add_to_base(model: torch.nn.Module, layout: LoraLayout, delta: Mapping[str, BaseDelta]) -> None:
    """``W0 += Δ`` for each module named in ``delta``.

    Δ is in nn.Linear layout ``(out, in)``, dense or factored ``(B, A)``; it is transposed only for a Conv1D weight
    (stored ``(in, out)``), the single place where layout matters.
    """
    weights = base_weights(model, layout)
    with torch.no_grad():
        for name, value in delta.items():
            spec = layout.module(name)
            dense = dense_delta(value)
            w = weights[name]
            if tuple(w.shape) != (
                (spec.in_features, spec.out_features) if spec.fan_in_fan_out else (spec.out_features, spec.in_features)
            ):
                raise ValueError(f"{name}: base weight shape {tuple(w.shape)} does not match the layout")
            w.add_(to_base_layout(spec, dense).to(w.dtype))
