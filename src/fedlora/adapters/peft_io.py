"""The bridge between an :data:`AdapterState` and a live peft model.

:class:`AdapterSlots` maps every key of ``get_peft_model_state_dict(model)`` to the parameter that holds it,
once, so that a client's turn in the local engine is "copy its tensors into the model in place, train, read
them out" with no model rebuild and no key translation per step. Writing a dense update into the frozen base
weights (FedEx-LoRA's residual, FLoRA's merge) also lives here, with the Conv1D layout rule applied once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.adapters.state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterState,
    LoraLayout,
    fresh_gate,
    gate_key,
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
    rank-``r_k`` LoRA on the one shared base model. A model with token-wise gates (:func:`install_token_gates`)
    also exposes each module's mixer under ``gate/<module name>.weight`` (:func:`fedlora.adapters.state.gate_key`).
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
        self.gates = find_token_gates(model)
        if self.gates is not None:
            self.params.update({gate_key(name): w for name, w in self.gates.weights().items()})
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


# ---------------------------------------------------------------------------------------------- token-wise gate
GATE_FILE = "token_gate.safetensors"
"""A saved model's gates, next to its adapters: one ``(K, in)`` tensor per module name, the gated peft adapter
names (in gate order) in the file's metadata. peft does not read it: :func:`load_token_gates` does."""
_GATE_FORMAT = "fedlora-token-gate/1"


class _GatedDropout(torch.nn.Module):
    """peft's dropout of one adapter in one LoRA layer, times that adapter's share of the layer's token-wise gate.

    peft adds ``lora_B(lora_A(dropout(x))) * s`` per active adapter, ``x`` being the layer's input. The gate's share
    ``g_i(x)`` is one number per token, so ``g_i(x)·B A dropout(x) = B A (g_i(x)·dropout(x))``: scaling the
    dropout's output gives ``y = W0 x + Σ_i s_i g_i(x) B_i A_i dropout(x)`` with ``g(x) = softmax(W_g x)`` over the
    gated adapters (logits from the undropped input). The mixer is referenced, not registered here (it belongs to
    :class:`TokenGates`), so it is one entry of the model's state dict and lies outside every peft adapter.
    """

    def __init__(self, dropout: torch.nn.Module, mixer: torch.nn.Linear, index: int) -> None:
        super().__init__()
        self.dropout = dropout
        self.index = index
        object.__setattr__(self, "mixer", mixer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer: torch.nn.Linear = self.__dict__["mixer"]
        logits = mixer(x.to(mixer.weight.dtype))
        share = torch.softmax(logits.float(), dim=-1)[..., self.index : self.index + 1]
        return self.dropout(x) * share.to(x.dtype)


class TokenGates(torch.nn.Module):
    """A peft model's token-wise gates: per LoRA layer (``names``) a mixer ``W_g`` (``K × in_features``, no bias)
    whose softmax over the ``K`` gated ``adapters`` (peft adapter names, in gate order) weighs each token's LoRA
    terms. Registered on the model as ``token_gates`` (outside peft's adapters: ``save_pretrained`` ignores it)."""

    def __init__(self, modules: Sequence[tuple[str, int]], adapters: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(name for name, _ in modules)
        self.adapters = tuple(adapters)
        self.mixers = torch.nn.ModuleList(
            torch.nn.utils.skip_init(torch.nn.Linear, n, len(self.adapters), bias=False) for _, n in modules
        )

    def weights(self) -> dict[str, torch.nn.Parameter]:
        """Each mixer's weight by module name."""
        return {name: mixer.weight for name, mixer in zip(self.names, self.mixers, strict=True)}


def find_token_gates(model: torch.nn.Module) -> TokenGates | None:
    """The model's :class:`TokenGates`, or None."""
    return next((m for m in model.modules() if isinstance(m, TokenGates)), None)


def install_token_gates(model: torch.nn.Module, adapters: Sequence[str], *, seed: int) -> TokenGates:
    """Give every LoRA layer of ``model`` a token-wise softmax gate over ``adapters`` (peft adapter names, at least
    two, each present in every LoRA layer; in gate order): ``y = W0 x + Σ_i s_i g_i(x) B_i A_i dropout(x)``,
    ``g(x) = softmax(W_g x)``. Each ``W_g`` is drawn as ``nn.Linear`` initialises it (:func:`fresh_gate`), module
    after module from one generator seeded by ``seed``. Install it after the last adapter is added."""
    from peft.tuners.lora import LoraLayer

    adapters = tuple(adapters)
    if find_token_gates(model) is not None:
        raise ValueError("the model already has token gates")
    if len(adapters) < 2 or len(set(adapters)) != len(adapters):
        raise ValueError(f"a token gate mixes two or more distinct adapters, not {list(adapters)}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("the model has no LoRA layer to gate")
    for name, layer in layers:
        missing = [a for a in adapters if a not in layer.lora_A]
        if missing:
            raise ValueError(f"LoRA layer {name} has no adapter {missing[0]!r} to gate")
    gates = TokenGates([(name, int(layer.in_features)) for name, layer in layers], adapters)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, layer), mixer in zip(layers, gates.mixers, strict=True):
            like = layer.lora_A[adapters[0]].weight
            mixer.to(device=like.device, dtype=like.dtype)
            mixer.weight.copy_(fresh_gate(len(adapters), mixer.in_features, gen))
    for (_, layer), mixer in zip(layers, gates.mixers, strict=True):
        for i, adapter in enumerate(adapters):
            layer.lora_dropout[adapter] = _GatedDropout(layer.lora_dropout[adapter], mixer, i)
    model.add_module("token_gates", gates)
    return gates


def save_token_gates(model: torch.nn.Module, directory: str | Path) -> Path | None:
    """Write the model's gates to ``directory/token_gate.safetensors`` (None, and nothing written, without gates)."""
    from safetensors.torch import save_file

    gates = find_token_gates(model)
    if gates is None:
        return None
    path = Path(directory) / GATE_FILE
    tensors = {name: w.detach().cpu().contiguous() for name, w in gates.weights().items()}
    save_file(tensors, str(path), metadata={"format": _GATE_FORMAT, "adapters": json.dumps(list(gates.adapters))})
    return path


def load_token_gates(model: torch.nn.Module, path: str | Path) -> TokenGates:
    """Install the gates saved in ``path`` (:func:`save_token_gates`) on ``model``, which holds the adapters they
    mix. ValueError naming the file and the key when the file does not fit the model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot be loaded: {e}") from None
    try:
        if meta.get("format") != _GATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_GATE_FORMAT!r}")
        adapters = json.loads(meta.get("adapters", "null"))
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise ValueError(f"'adapters' is {meta.get('adapters')!r}, not a list of adapter names")
        gates = install_token_gates(model, adapters, seed=0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    weights = gates.weights()
    missing, extra = sorted(set(weights) - set(tensors)), sorted(set(tensors) - set(weights))
    if missing or extra:
        raise ValueError(f"{path}: gates of other modules (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, w in weights.items():
            if tuple(tensors[name].shape) != tuple(w.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(w.shape)}")
            w.copy_(tensors[name])
    return gates


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
