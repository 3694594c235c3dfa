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
from collections.abc import Iterable, Mapping, Sequence
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


GATE_NAMESPACE = "gate"
"""Keys of a token-wise gate (:func:`fedlora.adapters.peft_io.install_token_gates`): ``gate/<module name>.weight``,
one ``(K, in_features)`` mixer per adapted module (K = the adapters it mixes). Never a peft key."""


def gate_key(module_name: str) -> str:
    """The key of the token-wise gate of module ``module_name``."""
    return namespaced(GATE_NAMESPACE, module_name + ".weight")


def fresh_gate(num_adapters: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A new ``(num_adapters, in_features)`` gate drawn as ``nn.Linear`` initialises its weight (kaiming-uniform
    with a = √5: uniform in ±1/√in_features), float32. Randomness comes only from ``generator``."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(num_adapters, in_features, generator=generator) * 2 - 1) * bound


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

    @property
    def gate_keys(self) -> tuple[str, ...]:
        """The keys a token-wise gate over these modules has (:func:`gate_key`), in module order."""
        return tuple(gate_key(m.name) for m in self.modules)

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


AGGREGATORS = ("mean", "median", "trimmed_mean:<beta>")
"""How client tensors are combined coordinate by coordinate: ``mean`` (the weighted mean ``Σ p_k t_k``),
``median`` or ``trimmed_mean:<beta>`` with ``0 < beta < 0.5``. The robust two ignore the client weights: every
client counts once (see :func:`coordinate_median`, :func:`trimmed_mean`)."""


def parse_aggregator(spec: str) -> tuple[str, float]:
    """``(kind, beta)`` from an aggregator spec: ``("mean", 0.0)``, ``("median", 0.0)`` or
    ``("trimmed_mean", beta)``; a ValueError naming the spec and the allowed forms otherwise."""
    allowed = "allowed: mean, median, trimmed_mean:<beta> with 0 < beta < 0.5"
    if not isinstance(spec, str):
        raise ValueError(f"aggregator={spec!r} is not a string; {allowed}")
    text = spec.strip()
    if text in ("mean", "median"):
        return text, 0.0
    kind, sep, value = text.partition(":")
    if kind.strip() != "trimmed_mean":
        raise ValueError(f"aggregator={spec!r} is unknown; {allowed}")
    if not sep or not value.strip():
        raise ValueError(f"aggregator={spec!r} needs the trimmed fraction beta (e.g. trimmed_mean:0.1); {allowed}")
    try:
        beta = float(value)
    except ValueError:
        raise ValueError(f"aggregator={spec!r}: beta={value.strip()!r} is not a number; {allowed}") from None
    if not (math.isfinite(beta) and 0.0 < beta < 0.5):
        raise ValueError(f"aggregator={spec!r}: beta={beta!r} is outside 0 < beta < 0.5; {allowed}")
    return "trimmed_mean", beta


def _stacked(tensors: Iterable[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.dtype]:
    items = list(tensors)
    if not items:
        raise ValueError(f"{what} of no tensors")
    return torch.stack([t.float() for t in items]), items[0].dtype


def coordinate_median(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median of ``K`` same-shaped tensors (float32, cast back to the input dtype).

    For even ``K`` it is the mean of the two middle values (not torch's lower median), so two clients give their
    mean and the result does not depend on the clients' order. No weights: every client counts once. Any
    ``⌈K/2⌉ − 1`` values of a coordinate may be arbitrarily large without moving it outside the range of the
    others.
    """
    stack, dtype = _stacked(tensors, "coordinate_median")
    k = stack.shape[0]
    ordered = stack.sort(dim=0).values
    mid = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return mid.to(dtype)


def trimmed_count(k: int, beta: float) -> int:
    """How many values :func:`trimmed_mean` drops at each end among ``k``: ``⌈beta·k⌉``, at most ``⌊(k−1)/2⌋``
    (at least one value survives; at that limit the trimmed mean is the median)."""
    return min(math.ceil(beta * k - 1e-9), (k - 1) // 2)


def trimmed_mean(tensors: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """The coordinate-wise ``beta``-trimmed mean of ``K`` same-shaped tensors (float32, cast back to the input
    dtype): per coordinate the :func:`trimmed_count` largest and smallest values are dropped and the rest is
    averaged with equal weights (client weights are ignored)."""
    if not 0.0 < beta < 0.5:
        raise ValueError(f"trimmed_mean: beta={beta!r} is outside 0 < beta < 0.5")
    stack, dtype = _stacked(tensors, "trimmed_mean")
    k = stack.shape[0]
    t = trimmed_count(k, beta)
    kept = stack.sort(dim=0).values[t : k - t]
    return kept.mean(dim=0).to(dtype)


def combine_tensors(
    tensors: Iterable[torch.Tensor], weights: Sequence[float], aggregator: str = "mean"
) -> torch.Tensor:
    """Client tensors combined by ``aggregator`` (:data:`AGGREGATORS`): :func:`weighted_mean` with ``weights`` for
    ``mean``, else the unweighted :func:`coordinate_median` or :func:`trimmed_mean`."""
    kind, beta = parse_aggregator(aggregator)
    if kind == "mean":
        return weighted_mean(tensors, weights)
    items = list(tensors)
    if len(items) != len(weights):
        raise ValueError(f"combine_tensors: {len(items)} tensors but {len(weights)} weights")
    return coordinate_median(items) if kind == "median" else trimmed_mean(items, beta)
