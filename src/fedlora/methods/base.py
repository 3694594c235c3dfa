"""The contract every federated method stands on: typed plans, replies and state, and the registry.

A method is pure: it never touches files, sockets, models or ``flwr``. The round logic
(:mod:`fedlora.federation`) asks it, per round,

* :meth:`FedMethod.plan` (server side): what client ``k`` receives (namespaced tensors), the rank and scale of
  each of its LoRA modules, which tensors it trains (in one or more :class:`Stage`), and what it must send back
  (:class:`TensorSpec` per key: replies are validated against the plan, never against the server's adapter);
* :meth:`FedMethod.start_state`, :meth:`FedMethod.objective`, :meth:`FedMethod.finish` (client side): the
  adapter the client starts from, what shapes its local loss or gradients, and after training what travels up and
  what the client keeps;
* :meth:`FedMethod.aggregate` (server side): the new global adapter, the method's own server state (named tensors
  + JSON metadata), and an explicit ``base_delta`` when the method changes the frozen weights.

All state a method carries between rounds lives in :class:`ServerState` (server) or in the per-client state the
engine holds for it; both are checkpointed generically, so a method keeps nothing mutable on ``self``.
Options are a frozen dataclass per method (:attr:`FedMethod.Options`), parsed and type-checked by
:func:`parse_options`. Weighting of clients is explicit; ``"auto"`` resolves to the method's reference code
(METHODS.md §34). Client influence is bounded in two places every method shares: :meth:`FedMethod.weights` caps
any client's weight at ``max_weight_ratio / K``, and :meth:`FedMethod.combine` (behind :meth:`FedMethod.average_keys`)
takes the mean, or a coordinate-wise median or trimmed mean (``aggregator``); methods whose aggregate is not an
average of what travels refuse the robust ones (:attr:`FedMethod.supports_robust_aggregation`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedlora.adapters.algebra import LowRankTerm, fresh_lora_factors
from fedlora.adapters.state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    NAMESPACE_SEP,
    AdapterState,
    LoraLayout,
    LoraModuleSpec,
    clone_state,
    combine_tensors,
    fresh_gate,
    gate_key,
    namespaced,
    parse_aggregator,
    slice_to_rank,
    subset,
)
from fedlora.client.objectives import Objective

WEIGHTINGS = ("num_examples", "samples_seen", "uniform")
"""``num_examples``: local training-set size; ``samples_seen``: examples processed this round (FederatedScope);
``uniform``: ``1/K``."""

DEFAULT_MAX_WEIGHT_RATIO = 3.0
"""Default cap on a client's weight, as a multiple of the uniform share ``1/K``. An honest Dirichlet(0.5) split of
the default data over 8 clients stays below it (largest ``K·p_k`` over seeds 0..49: 2.64; seed 0: 1.63), so by
default it only bites when one client claims far more data than the others."""

BaseDelta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A change of one frozen weight: dense ``(out, in)``, or factored ``(B, A)`` meaning ``B @ A``."""


def cap_weights(weights: Sequence[float], max_ratio: float | None) -> list[float]:
    """Water-filling: normalised weights with none above ``max_ratio / K`` (``K = len(weights)``).

    Weights above the cap are set to it and the excess is spread over the others in proportion to their weights,
    repeated until none exceeds it (at most ``K`` passes). The result sums to one, keeps the order of the weights
    (ties stay ties) and equals the input when nothing exceeds the cap; ``max_ratio = 1`` gives ``1/K`` each, and
    ``None`` leaves the weights as they are. Weights must be non-negative and sum to one.
    """
    k = len(weights)
    if max_ratio is None or k == 0:
        return list(weights)
    if not (math.isfinite(max_ratio) and max_ratio >= 1.0):
        raise ValueError(f"max_weight_ratio={max_ratio!r} must be a finite number >= 1 (or None: no cap)")
    cap = max_ratio / k
    if max_ratio <= 1.0 + 1e-12:
        return [1.0 / k] * k
    out = [float(w) for w in weights]
    capped: set[int] = set()
    while True:
        over = [i for i in range(k) if i not in capped and out[i] > cap]
        if not over:
            return out
        for i in over:
            out[i] = cap
            capped.add(i)
        free = [i for i in range(k) if i not in capped]
        budget = 1.0 - cap * len(capped)
        mass = sum(out[i] for i in free)
        for i in free:  # the free weights share what the capped ones left, in proportion to their weights
            out[i] = out[i] * budget / mass if mass > 0 else budget / len(free)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, client id, purpose)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class ModuleRank:
    """The rank a client trains one LoRA module at, and the scale ``s`` its ``B@A`` is multiplied by."""

    rank: int
    scale: float


@dataclass(frozen=True)
class TensorSpec:
    """What one uploaded tensor must look like (after decoding)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Stage:
    """One training pass of a client's round: which tensors get gradients and how the adapters are mixed.

    ``adapter_weights`` maps an adapter namespace (``""`` = the default adapter) to the multiplier of its scale in
    the forward pass; adapters not listed are inactive. Trained tensors of an inactive adapter are an error.
    """

    train_keys: frozenset[str]
    adapter_weights: Mapping[str, float] = field(default_factory=lambda: {"": 1.0})


@dataclass(frozen=True)
class BaseUpdate:
    """A change of the frozen base weights a client must apply before training (it travels inside the plan).

    ``cumulative=False``: add ``deltas`` to weights at version ``version - 1``; ``cumulative=True``: the weights are
    the original ones plus ``deltas`` (the change since version 0, for a client that missed several updates).
    """

    version: int
    deltas: Mapping[str, BaseDelta]
    cumulative: bool = False

    def wire_bytes(self) -> int:
        total = 0
        for d in self.deltas.values():
            parts = d if isinstance(d, tuple) else (d,)
            total += sum(t.numel() * t.element_size() for t in parts)
        return total


@dataclass(frozen=True)
class ClientPlan:
    """What the server sends client ``client_id`` in ``round`` and what it expects back."""

    round: int
    client_id: int
    download: AdapterState
    """Tensors the client receives (namespaced keys: the global adapter, a cluster's, control variates...)."""
    upload: Mapping[str, TensorSpec]
    """Every key the reply must carry, with its shape and dtype (LoRA keys at the client's rank)."""
    ranks: Mapping[str, ModuleRank]
    """Rank and scale per LoRA module (namespaced module names for a second adapter)."""
    stages: tuple[Stage, ...]
    reinit_seed: int | None = None
    """When set, the client starts from freshly drawn LoRA factors (A random, B=0) seeded by this value."""
    rank_may_shrink: bool = False
    """The client may upload a module at a lower rank than planned (HetLoRA's self-pruning), never higher."""
    base_update: BaseUpdate | None = None
    """Filled in by the round logic: the change of the base weights this client has not received yet."""
    upload_codec: str = "none"
    download_codec: str = "none"
    work: float = 1.0
    """Share of its local steps the client does (a straggler does fewer; set by the round's failure policy)."""
    fail_after: float | None = None
    """Simulated failure: the client stops with an error after this share of its local steps (None: it does not)."""

    @property
    def train_keys(self) -> frozenset[str]:
        return frozenset().union(*(s.train_keys for s in self.stages))

    @property
    def upload_keys(self) -> tuple[str, ...]:
        return tuple(self.upload)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply: the tensors that travelled up, each module's rank and scale, and counts."""

    client_id: int
    state: AdapterState
    num_examples: int
    samples_seen: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    ranks: Mapping[str, ModuleRank] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainStats:
    """What the client loop reports to :meth:`FedMethod.finish`."""

    steps: int
    samples_seen: int
    train_loss: float
    lr: float


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds (checkpointed generically)."""

    round: int
    adapter: AdapterState
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The method's named server tensors (optimiser moments, control variates, cluster adapters, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The method's JSON metadata (cluster assignments, client ranks, counters, ...)."""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Cumulative change of the frozen base weights per module name, nn.Linear layout ``(out, in)``."""
    base_version: int = 0
    """Number of base-weight changes so far."""
    last_base_update: dict[str, BaseDelta] = field(default_factory=dict)
    """The latest change as it travels (dense residual, or stacked factors)."""
    client_base: dict[int, int] = field(default_factory=dict)
    """Per client, the base version it last received."""


@dataclass(frozen=True)
class AggregateResult:
    """A round's outcome: the new global adapter, the method's server state, and this round's ``base_delta``."""

    adapter: AdapterState
    base_delta: Mapping[str, BaseDelta] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    """The method's new server tensors (None: unchanged)."""
    meta: dict[str, Any] | None = None
    """The method's new metadata (None: unchanged)."""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodContext:
    """What a method knows about the run: the adapter layout, the clients, their ranks, the seed."""

    layout: LoraLayout
    num_clients: int = 1
    client_ranks: tuple[int, ...] = ()
    """Rank of each client (empty: every client trains at the layout's rank)."""
    seed: int = 0
    weighting: str = "auto"
    rounds: int = 1
    init_lora_weights: str = "default"
    upload_codec: str = "none"
    download_codec: str = "none"
    max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO
    """No client's weight exceeds ``max_weight_ratio / K`` (:func:`cap_weights`); None: no cap."""
    aggregator: str = "mean"
    """How client tensors are combined wherever the method averages them (:meth:`FedMethod.combine`): ``mean``,
    ``median`` or ``trimmed_mean:<beta>`` (:data:`fedlora.adapters.state.AGGREGATORS`)."""
    base_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None
    """Reads the frozen base weight of every adapted module, nn.Linear layout ``(out, in)``, by module name (a run
    gives the pretrained weights; None outside a run). Only methods that initialise from them call it, once, in
    :meth:`FedMethod.init_server` (FeDeRA's SVD of the pretrained weights)."""


@dataclass(frozen=True)
class NoOptions:
    """This method has no options."""


# ---------------------------------------------------------------------------------------------- options
def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A method option: a dataclass field with its help text and bounds (shown by ``fedlora methods ID``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum, "max": maximum})


class OptionError(ValueError):
    """A method option is unknown or has a bad value; the message names it and what is allowed."""


def _option_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce_option(name: str, kind: Any, value: Any) -> Any:
    """Parse ``value`` (a CLI string, or a typed TOML/Python value) into ``kind``; strict, no truthy strings."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise OptionError(f"{name}={value!r} is not a boolean; allowed: true, false")
    if kind is int:
        if isinstance(value, bool):
            raise OptionError(f"{name}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise OptionError(f"{name}={value!r} is not an integer")
    if kind is float:
        if isinstance(value, bool):
            raise OptionError(f"{name}={value!r} is not a number")
        try:
            out = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{name}={value!r} is not a number") from None
        if not math.isfinite(out):
            raise OptionError(f"{name}={value!r} must be finite")
        return out
    if kind is str:
        if not isinstance(value, str):
            raise OptionError(f"{name}={value!r} is not a string")
        return value.strip()
    raise OptionError(f"{name}: unsupported option type {kind!r}")


def parse_options(cls: type[FedMethod], raw: Mapping[str, Any] | None) -> Any:
    """The method's typed options from ``raw`` (strings from ``--method-option`` or typed values)."""
    opts_cls = cls.Options
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    values: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            allowed = ", ".join(fields) or "none"
            raise OptionError(f"{key!r} is not an option of {cls.id}; allowed: {allowed}")
        f = fields[name]
        parsed = _coerce_option(name, _option_type(opts_cls, f), value)
        meta = f.metadata
        if meta.get("choices") is not None and parsed not in meta["choices"]:
            raise OptionError(
                f"{name}={parsed!r} is not allowed; allowed values: {', '.join(map(str, meta['choices']))}"
            )
        if meta.get("min") is not None and parsed is not None and parsed < meta["min"]:
            raise OptionError(f"{name}={parsed!r} must be >= {meta['min']}")
        if meta.get("max") is not None and parsed is not None and parsed > meta["max"]:
            raise OptionError(f"{name}={parsed!r} must be <= {meta['max']}")
        values[name] = parsed
    try:
        return opts_cls(**values)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{cls.id}: {e}") from None


def describe_options(cls: type[FedMethod]) -> list[dict[str, Any]]:
    """``name, type, default, help, choices`` of every option of a method."""
    out = []
    for f in dataclasses.fields(cls.Options):
        kind = _option_type(cls.Options, f)
        out.append(
            {
                "name": f.name,
                "type": getattr(kind, "__name__", str(kind)),
                "default": f.default,
                "help": f.metadata.get("help", ""),
                "choices": f.metadata.get("choices"),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- methods
class FedMethod(ABC):
    """Base class: FedAvg-style defaults that concrete methods override where their paper differs."""

    id: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str]
    paper: ClassVar[str]
    up: ClassVar[str]
    down: ClassVar[str]
    bytes_up: ClassVar[str] = "r(m+n) + heads"
    """Upload per module in terms of m (out), n (in), r (rank), K (clients in the round)."""
    bytes_down: ClassVar[str] = "r(m+n) + heads"
    default_weighting: ClassVar[str] = "num_examples"
    changes_base: ClassVar[bool] = False
    has_personal_state: ClassVar[bool] = False
    """Clients keep state between rounds (held by the engine), and are scored on their own test splits."""
    has_global_model: ClassVar[bool] = True
    supports_mixed_ranks: ClassVar[bool] = False
    preferred_alpha_rule: ClassVar[str] = "constant"
    """The alpha rule ``alpha_rule="auto"`` resolves to: methods that average factors of different ranks prefer
    ``proportional`` (every rank slot then means the same at every client)."""
    extra_adapters: ClassVar[tuple[str, ...]] = ()
    """Namespaces of further adapters every client holds besides the default one (e.g. FedDPA's ``local``)."""
    token_gate: ClassVar[tuple[str, ...]] = ()
    """Namespaces (``""`` = the default adapter) of the adapters a trainable token-wise gate mixes, in gate order;
    empty: no gate. The run then gives every adapted module a mixer ``W_g`` (K × in, no bias) and
    ``y = W0 x + Σ_i s_i·g_i(x)·B_i A_i x`` with ``g(x) = softmax(W_g x)`` per token
    (:func:`fedlora.adapters.peft_io.install_token_gates`); ``W_g`` is the tensor ``gate/<module>.weight``
    (:meth:`gate_keys`), trained and kept like any key the method lists in its stages and kept state (it is not a
    peft key). The gate does the mixing, so stages give the gated adapters weight 1. :meth:`gate_of` may switch
    the gate by option."""
    supports_robust_aggregation: ClassVar[bool] = True
    """Every client tensor the method averages goes through :meth:`combine` (directly or via :meth:`average_keys`),
    so ``aggregator`` may replace the weighted mean by a coordinate-wise median or trimmed mean. False for methods
    whose aggregate is not an average of what travels (products ``B@A``, stacking, SVD, norm weights, padding):
    they refuse a non-mean aggregator with :attr:`robust_refusal`."""
    robust_refusal: ClassVar[str] = ""
    """Why the method refuses a non-mean aggregator (its error message says it)."""
    Options: ClassVar[type] = NoOptions

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        weighting = self.default_weighting if ctx.weighting == "auto" else ctx.weighting
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}; allowed: 'auto', " + ", ".join(map(repr, WEIGHTINGS)))
        ratio = ctx.max_weight_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
            raise ValueError(f"max_weight_ratio={ratio!r} must be a finite number >= 1 (or None: no cap)")
        parse_aggregator(ctx.aggregator)
        refusal = self.robust_aggregation_error(ctx.aggregator)
        if refusal:
            raise ValueError(refusal)
        if ctx.client_ranks and not self.supports_mixed_ranks and len(set(ctx.client_ranks)) > 1:
            raise ValueError(
                f"{self.id} trains one rank for all clients; mixed client ranks need one of: "
                + ", ".join(m for m in method_ids() if get_method_class(m).supports_mixed_ranks)
            )
        for r in ctx.client_ranks:
            for spec in ctx.layout.modules:
                if not 1 <= r <= spec.rank:
                    raise ValueError(f"client rank {r} is outside 1..{spec.rank} (the global rank lora_r)")
                if r != spec.rank and not self.supports_mixed_ranks:
                    raise ValueError(
                        f"{self.id} trains every client at the global rank; client rank {r} != lora_r {spec.rank} "
                        "(set lora_r instead of client_ranks)"
                    )
        self.ctx = ctx
        self.layout = ctx.layout
        self.weighting = weighting
        self.seed = ctx.seed
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.id}: options must be {self.Options.__name__}")
        self.extra_layouts = {ns: self.layout.namespaced(ns) for ns in self.extra_adapters}
        unknown = [ns for ns in self.gate_adapters if ns not in ("", *self.extra_adapters)]
        if unknown:
            raise ValueError(f"{self.id}: the token gate mixes {unknown}, which are not adapters of the method")
        self._modules: dict[str, LoraModuleSpec] = {m.name: m for m in self.layout.modules}
        for lay in self.extra_layouts.values():
            self._modules.update({m.name: m for m in lay.modules})

    # ----------------------------------------------------------------- token-wise gate
    @classmethod
    def gate_of(cls, options: Any) -> tuple[str, ...]:
        """The adapters the token-wise gate mixes under ``options`` (default: :attr:`token_gate`)."""
        return cls.token_gate

    @property
    def gate_adapters(self) -> tuple[str, ...]:
        """The adapters this method's token-wise gate mixes (empty: no gate)."""
        return self.gate_of(self.options)

    def gate_keys(self) -> tuple[str, ...]:
        """``gate/<module>.weight`` of every adapted module when the method has a gate, else nothing."""
        return self.layout.gate_keys if self.gate_adapters else ()

    def fresh_gates(self, seed: int) -> AdapterState:
        """A gate ``W_g`` per module drawn as ``nn.Linear`` initialises its weight (float32), module after module in
        layout order from one generator seeded by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        k = len(self.gate_adapters)
        return {gate_key(spec.name): fresh_gate(k, spec.in_features, gen) for spec in self.layout.modules}

    # ----------------------------------------------------------------- ranks and specs
    def client_rank(self, client_id: int, server: ServerState | None = None) -> int | None:
        """The rank client ``client_id`` trains at: the configured one, or None (every module at its global rank).
        Methods that change a client's rank keep it in the server's meta and override this."""
        if self.ctx.client_ranks:
            return self.ctx.client_ranks[client_id]
        return None

    def module_ranks(self, rank: int | None) -> dict[str, ModuleRank]:
        """Rank and scale of every LoRA module (all adapters) for a client of ``rank`` (None: global ranks)."""
        out = {}
        for name, spec in self._modules.items():
            r = spec.rank if rank is None else rank
            out[name] = ModuleRank(r, spec.scaling(r))
        return out

    def module(self, name: str) -> LoraModuleSpec:
        return self._modules[name]

    def tensor_spec(
        self, key: str, ranks: Mapping[str, ModuleRank], reference: Mapping[str, torch.Tensor]
    ) -> TensorSpec:
        """Expected shape/dtype of ``key`` for a client with ``ranks``: LoRA keys at the client's rank; other keys
        like their value in ``reference`` (a namespaced key like its inner key)."""
        for suffix, is_a in ((LORA_A_SUFFIX, True), (LORA_B_SUFFIX, False)):
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                inner = name
                while inner not in self._modules and NAMESPACE_SEP in inner:
                    inner = inner.split(NAMESPACE_SEP, 1)[1]
                if inner in self._modules:
                    spec = self._modules[inner]
                    r = ranks[name].rank if name in ranks else ranks[inner].rank if inner in ranks else spec.rank
                    ref = reference.get(spec.a_key if is_a else spec.b_key)
                    dtype = ref.dtype if ref is not None else torch.float32
                    return TensorSpec(spec.a_shape(r) if is_a else spec.b_shape(r), dtype)
        inner = key
        while inner not in reference and NAMESPACE_SEP in inner:
            inner = inner.split(NAMESPACE_SEP, 1)[1]
        if inner not in reference:
            raise KeyError(f"{self.id}: no reference shape for upload key {key!r}")
        return TensorSpec(tuple(reference[inner].shape), reference[inner].dtype)

    def make_plan(
        self,
        rnd: int,
        client_id: int,
        server: ServerState,
        *,
        download: AdapterState,
        upload_keys: Sequence[str],
        train_keys: Sequence[str] | None = None,
        stages: Sequence[Stage] | None = None,
        rank: int | None = None,
        reinit_seed: int | None = None,
        rank_may_shrink: bool = False,
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> ClientPlan:
        """Build a plan with the client's ranks and scales and the expected reply spec filled in."""
        ranks = self.module_ranks(self.client_rank(client_id, server) if rank is None else rank)
        ref = server.adapter if reference is None else reference
        upload = {k: self.tensor_spec(k, ranks, ref) for k in upload_keys}
        if stages is None:
            stages = (Stage(frozenset(upload_keys if train_keys is None else train_keys)),)
        return ClientPlan(
            round=rnd,
            client_id=client_id,
            download=download,
            upload=upload,
            ranks=ranks,
            stages=tuple(stages),
            reinit_seed=reinit_seed,
            rank_may_shrink=rank_may_shrink,
            upload_codec=self.ctx.upload_codec,
            download_codec=self.ctx.download_codec,
        )

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        """The server's state before round 0: the common initial adapter of the default adapter."""
        return ServerState(round=0, adapter=clone_state(subset(initial, self.layout.all_keys)))

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        """Default: send the whole global adapter, train and return all of it."""
        keys = self.layout.all_keys
        return self.make_plan(rnd, client_id, server, download=subset(server.adapter, keys), upload_keys=keys)

    @abstractmethod
    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """The new global state from the round's valid client updates (at least one)."""

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Normalised client weights ``p_k`` under this method's weighting, capped at ``max_weight_ratio / K``.

        The counts are the clients' own claims: without the cap a client reporting 1e12 examples would own the
        round (``p_k ≈ 1``) and whatever it uploads would become the global adapter. The cap bounds any client's
        share to ``max_weight_ratio`` times the uniform share, spreading the excess over the others in
        proportion (:func:`cap_weights`); an honest, moderately skewed split stays below the default cap."""
        if not updates:
            raise ValueError("no client updates to weight")
        if self.weighting == "uniform":
            raw = [1.0] * len(updates)
        elif self.weighting == "num_examples":
            raw = [float(u.num_examples) for u in updates]
        else:
            raw = [float(u.samples_seen) for u in updates]
        total = sum(raw)
        if not total > 0 or not math.isfinite(total):
            raise ValueError(f"client weights under {self.weighting!r} sum to {total}")
        return cap_weights([w / total for w in raw], self.ctx.max_weight_ratio)

    def cap(self, weights: Sequence[float]) -> list[float]:
        """Weights a method computed itself (e.g. HetLoRA's norm weights), capped like :meth:`weights`."""
        return cap_weights(weights, self.ctx.max_weight_ratio)

    def combine(self, tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """The round's aggregate of one client tensor (or of one difference per client) under ``aggregator``:
        ``Σ p_k t_k`` (float32 accumulation, ``tensors`` streamed) for ``mean``; for ``median`` and
        ``trimmed_mean:<beta>`` the coordinate-wise, unweighted robust statistic (every client counts once;
        ``weights`` only fix the count). Every method that averages client tensors does it here, so the choice
        applies to all of them."""
        return combine_tensors(tensors, weights, self.ctx.aggregator)

    def average_keys(
        self, keys: Sequence[str], updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> AdapterState:
        """``Σ p_k θ_k[key]`` for every key (float32 accumulation), or its robust counterpart (:meth:`combine`)."""
        return {k: self.combine((u.state[k] for u in updates), weights) for k in keys}

    def combine_owned(
        self,
        tensors: Sequence[torch.Tensor],
        weights: Sequence[float],
        owners: torch.Tensor,
        *,
        dim: int,
        fallback: torch.Tensor,
    ) -> torch.Tensor:
        """Slice-wise :meth:`combine` along ``dim``: slice ``i`` combines only the clients that own it
        (``owners[k, i]`` true), their weights renormalised over those owners; a slice nobody owns is ``fallback``'s.

        CoLR's row-wise mean over the clients that touched a row, LoRA-A²'s per-rank renormalisation. Slices with the
        same set of owners are combined together (one call per distinct set). Returns ``fallback``'s dtype."""
        out = fallback.detach().float().clone()
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, column in enumerate(owners.bool().T.tolist()):
            groups.setdefault(tuple(k for k, own in enumerate(column) if own), []).append(i)
        for members, slices in groups.items():
            if not members:
                continue
            total = sum(float(weights[k]) for k in members)
            w = [float(weights[k]) / total for k in members] if total > 0 else [1.0 / len(members)] * len(members)
            index = torch.tensor(slices, dtype=torch.long)
            part = self.combine((tensors[k].index_select(dim, index) for k in members), w)
            out.index_copy_(dim, index, part.float())
        return out.to(fallback.dtype)

    @classmethod
    def robust_aggregation_error(cls, aggregator: str) -> str | None:
        """The message refusing ``aggregator`` for this method, or None when it is allowed."""
        kind, _ = parse_aggregator(aggregator)
        if kind == "mean" or cls.supports_robust_aggregation:
            return None
        able = ", ".join(m for m in method_ids() if get_method_class(m).supports_robust_aggregation)
        return (
            f"{cls.id} cannot use aggregator={aggregator!r}: {cls.robust_refusal or 'its aggregate is not an average'}."
            f" Use aggregator='mean' (max_weight_ratio still bounds each client's weight) or one of: {able}"
        )

    @staticmethod
    def scale_of(update: ClientUpdate, spec: LoraModuleSpec) -> float:
        """The scale client ``update`` trained ``spec`` at (its reply says; the rank's rule otherwise)."""
        mr = update.ranks.get(spec.name)
        return mr.scale if mr is not None else spec.scaling(update.state[spec.a_key].shape[0])

    def product_terms(
        self, spec: LoraModuleSpec, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> list[LowRankTerm]:
        """The terms ``p_k·s_k·B_k@A_k`` of one module, each client with its own scale ``s_k``."""
        return [
            LowRankTerm(b=u.state[spec.b_key], a=u.state[spec.a_key], coeff=p * self.scale_of(u, spec))
            for p, u in zip(weights, updates, strict=True)
        ]

    # ----------------------------------------------------------------- client side
    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        """The adapter a client trains from: initial (at its ranks) ∪ personal ∪ download, then a fresh draw if
        the plan asks for one."""
        state = {k: slice_to_rank(k, v, plan.ranks) for k, v in initial.items()}
        if personal:
            state.update(personal)
        state.update(plan.download)
        if plan.reinit_seed is not None:
            for key, value in self.fresh_factors(plan.reinit_seed, plan.ranks).items():
                state[key] = value.to(initial[key].dtype)
        return state

    def fresh_factors(
        self, seed: int, ranks: Mapping[str, ModuleRank], layout: LoraLayout | None = None
    ) -> AdapterState:
        """The LoRA factors a plan with ``reinit_seed=seed`` starts from (float32): A drawn as ``init_lora_weights``
        says, B = 0, module after module in layout order from one generator seeded by ``seed``; of the default
        adapter, or of ``layout`` (e.g. a further adapter's, :attr:`extra_layouts`)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for spec in (layout or self.layout).modules:
            r = ranks[spec.name].rank
            a, b = fresh_lora_factors(spec.out_features, spec.in_features, r, gen, init=self.ctx.init_lora_weights)
            out[spec.a_key], out[spec.b_key] = a, b
        return out

    def reference(self, plan: ClientPlan) -> AdapterState:
        """What the server knows a client of ``plan`` started from: the download, and the freshly drawn factors
        when the plan re-draws them (a reply's update, which the round bounds, is measured from here)."""
        ref = dict(plan.download)
        if plan.reinit_seed is not None:
            ref.update(self.fresh_factors(plan.reinit_seed, plan.ranks))
        return ref

    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        """What shapes the client's local training besides the task loss (None: the task loss alone)."""
        return None

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        """Split a trained adapter into (what travels up, what the client keeps privately)."""
        return subset(trained, plan.upload_keys), None

    def inference_weights(self, client_id: int) -> Mapping[str, float]:
        """How a client's adapters are mixed when its own model is evaluated (default adapter alone)."""
        return {"": 1.0}

    # ----------------------------------------------------------------- description
    @classmethod
    def describe(cls) -> dict[str, str]:
        return {
            "id": cls.id,
            "family": cls.family,
            "paper": cls.paper,
            "up": cls.up,
            "down": cls.down,
            "weighting": cls.default_weighting,
            "bytes_up": cls.bytes_up,
            "bytes_down": cls.bytes_down,
        }


_REGISTRY: dict[str, type[FedMethod]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type[FedMethod]) -> type[FedMethod]:
    """Class decorator: register a method under its lowercase, unique ``id`` (and aliases)."""
    for name in (cls.id, *cls.aliases):
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"method id {name!r} must be a lowercase identifier")
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"method id {name!r} is registered twice")
    if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise ValueError(f"{cls.id}: Options must be a frozen dataclass")
    _REGISTRY[cls.id] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.id
    return cls


def method_ids() -> list[str]:
    """Registered method ids (aliases excluded), sorted."""
    return sorted(_REGISTRY)


def canonical_id(name: str) -> str:
    """The id behind ``name`` (an id or an alias)."""
    return get_method_class(name).id


def get_method_class(name: str) -> type[FedMethod]:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_ids())}")
    return _REGISTRY[key]


def build_method(
    name: str, layout: LoraLayout | MethodContext, *, options: Mapping[str, Any] | None = None, **context: Any
) -> FedMethod:
    """Build method ``name``: ``layout`` (with ``context`` fields of :class:`MethodContext`) or a full context."""
    ctx = layout if isinstance(layout, MethodContext) else MethodContext(layout=layout, **context)
    if isinstance(layout, MethodContext) and context:
        ctx = dataclasses.replace(ctx, **context)
    cls = get_method_class(name)
    return cls(ctx, parse_options(cls, options))


__all__ = [
    "DEFAULT_MAX_WEIGHT_RATIO",
    "WEIGHTINGS",
    "AggregateResult",
    "BaseDelta",
    "BaseUpdate",
    "ClientPlan",
    "ClientUpdate",
    "FedMethod",
    "MethodContext",
    "ModuleRank",
    "NoOptions",
    "OptionError",
    "ServerState",
    "Stage",
    "TensorSpec",
    "TrainStats",
    "build_method",
    "canonical_id",
    "cap_weights",
    "derive_seed",
    "describe_options",
    "get_method_class",
    "method_ids",
    "namespaced",
    "option",
    "parse_options",
    "register_method",
    "slice_to_rank",
]
