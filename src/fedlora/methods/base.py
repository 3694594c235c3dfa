"""Typed messages and the base class every federated LoRA method derives from, plus the registry.

A method is pure: it never touches files, sockets, models or ``flwr``. The round logic
(:mod:`fedlora.federation`) asks it, per round,

* :meth:`FedMethod.plan` (server side): what client ``k`` receives and which adapter tensors it trains and
  sends back;
* :meth:`FedMethod.start_state` / :meth:`FedMethod.finish` (client side): the adapter the client starts from
  (common initial adapter ∪ its personal tensors ∪ what it received, or a fresh draw) and, after training, what
  travels up and what it keeps privately;
* :meth:`FedMethod.aggregate` (server side): the new global adapter, and an explicit ``base_delta`` when the
  method changes the frozen weights (FedEx-LoRA, FLoRA).

Weighting of clients (``num_examples``, ``samples_seen``, ``uniform``) is an explicit constructor argument;
``"auto"`` resolves to the weighting of the method's reference code (METHODS.md §34).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedlora.adapters.algebra import LowRankTerm, fresh_lora_factors
from fedlora.adapters.state import (
    AdapterState,
    LoraLayout,
    LoraModuleSpec,
    clone_state,
    factors,
    subset,
    weighted_mean,
)

WEIGHTINGS = ("num_examples", "samples_seen", "uniform")
"""``num_examples``: local training-set size; ``samples_seen``: examples processed this round (FederatedScope);
``uniform``: ``1/K``."""


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, client id, purpose)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply: the tensors that travelled up, and how much data produced them."""

    client_id: int
    state: AdapterState
    num_examples: int
    samples_seen: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientPlan:
    """What the server sends client ``client_id`` in ``round`` and what it expects back."""

    round: int
    client_id: int
    download: AdapterState
    train_keys: frozenset[str]
    upload_keys: tuple[str, ...]
    reinit_seed: int | None = None
    """When set, the client starts from freshly drawn LoRA factors (A random, B=0) seeded by this value."""


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds."""

    round: int
    adapter: AdapterState
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Cumulative change of the frozen base weights per module name, nn.Linear layout ``(out, in)``."""


@dataclass(frozen=True)
class AggregateResult:
    """A round's outcome: the new global adapter and, for methods that change W0, this round's ``base_delta``."""

    adapter: AdapterState
    base_delta: dict[str, torch.Tensor] | None = None
    base_delta_wire_bytes: int = 0
    """Bytes a client must receive to apply ``base_delta`` (dense for FedEx-LoRA, stacked factors for FLoRA)."""
    metrics: dict[str, float] = field(default_factory=dict)


class FedMethod(ABC):
    """Base class: FedAvg-style defaults that concrete methods override where their paper differs."""

    id: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str]
    paper: ClassVar[str]
    up: ClassVar[str]
    down: ClassVar[str]
    default_weighting: ClassVar[str] = "num_examples"
    changes_base: ClassVar[bool] = False
    has_personal_state: ClassVar[bool] = False
    has_global_model: ClassVar[bool] = True

    def __init__(self, layout: LoraLayout, *, weighting: str = "auto", seed: int = 0) -> None:
        if weighting == "auto":
            weighting = self.default_weighting
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}; allowed: 'auto', " + ", ".join(map(repr, WEIGHTINGS)))
        self.layout = layout
        self.weighting = weighting
        self.seed = seed

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        """The server's state before round 0: the common initial adapter."""
        return ServerState(round=0, adapter=clone_state(initial))

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        """Default: send the whole global adapter, train and return all of it."""
        keys = self.layout.all_keys
        return ClientPlan(rnd, client_id, subset(server.adapter, keys), frozenset(keys), keys)

    @abstractmethod
    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """The new global state from the round's valid client updates (at least one)."""

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Normalised client weights ``p_k`` under this method's weighting."""
        if not updates:
            raise ValueError("no client updates to weight")
        if self.weighting == "uniform":
            raw = [1.0] * len(updates)
        elif self.weighting == "num_examples":
            raw = [float(u.num_examples) for u in updates]
        else:
            raw = [float(u.samples_seen) for u in updates]
        total = sum(raw)
        if total <= 0:
            raise ValueError(f"client weights under {self.weighting!r} sum to {total}")
        return [w / total for w in raw]

    def average_keys(
        self, keys: Sequence[str], updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> AdapterState:
        """``Σ p_k θ_k[key]`` for every key (float32 accumulation)."""
        return {k: weighted_mean((u.state[k] for u in updates), weights) for k in keys}

    @staticmethod
    def product_terms(
        spec: LoraModuleSpec, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> list[LowRankTerm]:
        """The terms ``p_k·s_k·B_k@A_k`` of one module, each client with its own scale ``s_k = s(r_k)``."""
        terms = []
        for p, u in zip(weights, updates, strict=True):
            a, b = factors(u.state, spec)
            terms.append(LowRankTerm(b=b, a=a, coeff=p * spec.scaling(a.shape[0])))
        return terms

    # ----------------------------------------------------------------- client side
    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        """The adapter a client trains from: initial ∪ personal ∪ download, then a fresh draw if asked."""
        state = dict(initial)
        if personal:
            state.update(personal)
        state.update(plan.download)
        if plan.reinit_seed is not None:
            gen = torch.Generator().manual_seed(plan.reinit_seed)
            for spec in self.layout.modules:
                a, b = fresh_lora_factors(spec.out_features, spec.in_features, spec.rank, gen)
                state[spec.a_key] = a.to(initial[spec.a_key].dtype)
                state[spec.b_key] = b.to(initial[spec.b_key].dtype)
        return state

    def finish(self, plan: ClientPlan, trained: AdapterState) -> tuple[AdapterState, AdapterState | None]:
        """Split a trained adapter into (what travels up, what the client keeps privately)."""
        return subset(trained, plan.upload_keys), None

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
    _REGISTRY[cls.id] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.id
    return cls


def method_ids() -> list[str]:
    """Registered method ids (aliases excluded), sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[FedMethod]:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_ids())}")
    return _REGISTRY[key]


def build_method(name: str, layout: LoraLayout, **kwargs: object) -> FedMethod:
    return get_method_class(name)(layout, **kwargs)  # type: ignore[arg-type]
