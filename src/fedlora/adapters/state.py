"""Adapter state: a flat tensor dict keyed like ``peft.get_peft_model_state_dict``, and its per-module view.

An :data:`AdapterState` is exactly what peft saves for an adapter (``...query.lora_A.weight``,
``...query.lora_B.weight``, plus ``modules_to_save`` heads such as ``...classifier.weight``), so it loads with
``set_peft_model_state_dict`` and converts to a Flower ``ArrayRecord`` without renaming.

The :class:`LoraLayout` says which keys form the (A, B) pair of each adapted module, and carries each module's
``lora_alpha``, alpha rule (how the scale depends on a client's rank) and ``fan_in_fan_out`` flag. It is read
from the peft model (:meth:`LoraLayout.from_peft_model`), never guessed from key names, and it is plain data:
methods receive it and stay free of ``torch.nn`` and of peft.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

AdapterState = dict[str, torch.Tensor]
"""A flat ``{key: tensor}`` adapter state, keyed like ``peft.get_peft_model_state_dict``."""

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
NAMESPACE_SEP = "/"
"""Keys of a second adapter (or of method state) are namespaced ``"<name>/<peft key>"``; the default adapter's
keys are peft's own, unprefixed."""

ALPHA_RULES = ("constant", "proportional", "rslora")
"""How a client of rank ``r_k`` is scaled: ``constant`` (alpha fixed: ``s = alpha/r_k``, peft's default),
``proportional`` (``alpha_k = alpha·r_k/r``: every rank gets the global scale ``alpha/r``; FLoRA's ``alpha_k = 2·r_k``)
or ``rslora`` (``s = alpha/sqrt(r_k)``)."""


def namespaced(namespace: str, key: str) -> str:
    """``key`` under ``namespace`` (the default adapter, ``""``, keeps peft's key)."""
    return f"{namespace}{NAMESPACE_SEP}{key}" if namespace else key


@dataclass(frozen=True)
class LoraModuleSpec:
    """One LoRA-adapted module: where its factors live and how ``ΔW = s·B@A`` is formed.

    ``A`` has shape ``(rank, in_features)`` and ``B`` ``(out_features, rank)`` whatever the layout of the base
    weight; ``fan_in_fan_out`` is True when the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``), which
    matters only when a dense update is written into the base weight (:func:`to_base_layout`).
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    """The global (server) rank: the largest rank any client trains."""
    lora_alpha: float
    alpha_rule: str = "constant"
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"alpha_rule={self.alpha_rule!r}; allowed: {', '.join(ALPHA_RULES)}")

    @property
    def a_key(self) -> str:
        return self.name + LORA_A_SUFFIX

    @property
    def b_key(self) -> str:
        return self.name + LORA_B_SUFFIX

    def scaling(self, rank: int | None = None) -> float:
        """The LoRA scale ``s`` of a client training this module at ``rank`` (default: the global rank)."""
        r = self.rank if rank is None else rank
        if r < 1:
            raise ValueError(f"{self.name}: rank {r} must be >= 1")
        if self.alpha_rule == "rslora":
            return self.lora_alpha / math.sqrt(r)
        if self.alpha_rule == "proportional":
            return self.lora_alpha / self.rank
        return self.lora_alpha / r

    def a_shape(self, rank: int | None = None) -> tuple[int, int]:
        return (self.rank if rank is None else rank, self.in_features)

    def b_shape(self, rank: int | None = None) -> tuple[int, int]:
        return (self.out_features, self.rank if rank is None else rank)


@dataclass(frozen=True)
class LoraLayout:
    """The adapted modules of a model, and the keys of the other trainable tensors (task heads)."""

    modules: tuple[LoraModuleSpec, ...]
    other_keys: tuple[str, ...] = ()
    _by_name: dict[str, LoraModuleSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.modules})
        if len(self._by_name) != len(self.modules):
            raise ValueError("LoraLayout has two modules with the same name")

    def module(self, name: str) -> LoraModuleSpec:
        return self._by_name[name]

    @property
    def a_keys(self) -> tuple[str, ...]:
        return tuple(m.a_key for m in self.modules)

    @property
    def b_keys(self) -> tuple[str, ...]:
        return tuple(m.b_key for m in self.modules)

    @property
    def lora_keys(self) -> tuple[str, ...]:
        return self.a_keys + self.b_keys

    @property
    def all_keys(self) -> tuple[str, ...]:
        return self.lora_keys + self.other_keys

    def namespaced(self, namespace: str, *, with_other_keys: bool = False) -> LoraLayout:
        """The same modules under ``namespace`` (a second adapter's keys); heads only when asked."""
        mods = tuple(replace(m, name=namespaced(namespace, m.name)) for m in self.modules)
        other = tuple(namespaced(namespace, k) for k in self.other_keys) if with_other_keys else ()
        return LoraLayout(modules=mods, other_keys=other)

    @classmethod
    def from_peft_model(
        cls,
        model: torch.nn.Module,
        adapter_name: str = "default",
        *,
        alpha_rule: str | None = None,
        namespace: str = "",
    ) -> LoraLayout:
        """Read the layout from a peft model: rank, alpha and layout flags per LoRA layer.

        ``alpha_rule`` defaults to what peft's config says (``rslora`` or ``constant``); ``namespace`` prefixes the
        keys (a second adapter). For a namespaced adapter only its LoRA keys are listed (heads belong to the default).
        """
        from peft import get_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        if alpha_rule is None:
            rs = bool(getattr(model.peft_config[adapter_name], "use_rslora", False))  # type: ignore[index]
            alpha_rule = "rslora" if rs else "constant"
        specs = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                specs.append(
                    LoraModuleSpec(
                        name=namespaced(namespace, name),
                        in_features=int(module.in_features),
                        out_features=int(module.out_features),
                        rank=int(module.r[adapter_name]),
                        lora_alpha=float(module.lora_alpha[adapter_name]),
                        alpha_rule=alpha_rule,
                        fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                    )
                )
        keys = [namespaced(namespace, k) for k in get_peft_model_state_dict(model, adapter_name=adapter_name)]
        lora = {s.a_key for s in specs} | {s.b_key for s in specs}
        missing = lora - set(keys)
        if missing:
            raise ValueError(f"peft state dict lacks LoRA keys {sorted(missing)[:3]}; unsupported LoRA layer type")
        other = () if namespace else tuple(k for k in keys if k not in lora)
        return cls(modules=tuple(specs), other_keys=other)


def slice_to_rank(key: str, value: torch.Tensor, ranks: Mapping[str, object] | None) -> torch.Tensor:
    """``value`` cut to a client's rank when ``key`` is a LoRA factor of a module in ``ranks`` (anything with a
    ``rank``): the first rows of A, the first columns of B; other keys and full-rank factors unchanged (a view)."""
    if ranks:
        for suffix, dim in ((LORA_A_SUFFIX, 0), (LORA_B_SUFFIX, 1)):
            if key.endswith(suffix):
                r = getattr(ranks.get(key[: -len(suffix)]), "rank", None)
                if r is not None and r < value.shape[dim]:
                    return value[:r] if dim == 0 else value[:, :r]
    return value


def factors(state: Mapping[str, torch.Tensor], spec: LoraModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of ``spec`` in ``state``."""
    return state[spec.a_key], state[spec.b_key]


def delta_weight(state: Mapping[str, torch.Tensor], spec: LoraModuleSpec, scale: float | None = None) -> torch.Tensor:
    """``s·B@A`` for one module, in nn.Linear layout ``(out, in)``, float32 (``s``: given, or the rank's scale)."""
    a, b = factors(state, spec)
    return (spec.scaling(a.shape[0]) if scale is None else scale) * (b.float() @ a.float())


def to_base_layout(spec: LoraModuleSpec, dense: torch.Tensor) -> torch.Tensor:
    """Turn an ``(out, in)`` update into the layout of the stored base weight (transposed for Conv1D)."""
    return dense.T if spec.fan_in_fan_out else dense


def state_bytes(state: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors as they travel (numel × element size, no container overhead)."""
    tensors = state.values() if isinstance(state, Mapping) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def subset(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> AdapterState:
    """The entries of ``state`` under ``keys`` (order of ``keys``)."""
    return {k: state[k] for k in keys}


def clone_state(state: Mapping[str, torch.Tensor]) -> AdapterState:
    return {k: v.detach().clone() for k, v in state.items()}


def weighted_mean(tensors: Iterable[torch.Tensor], weights: Iterable[float]) -> torch.Tensor:
    """``Σ w_k t_k`` accumulated in float32 (weights are expected to sum to one), cast back to the input dtype."""
    out: torch.Tensor | None = None
    dtype = None
    for t, w in zip(tensors, weights, strict=True):
        dtype = t.dtype
        term = t.float() * float(w)
        out = term if out is None else out.add_(term)
    if out is None:
        raise ValueError("weighted_mean of no tensors")
    return out.to(dtype)
