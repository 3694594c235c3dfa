"""Server optimisers on the adapter: FedAvgM, FedAdam, FedYogi, FedAdagrad (METHODS.md §36.3, §36.4).

Papers: T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335 (FedAvgM); S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush,
J. Konečný, S. Kumar, H. B. McMahan, "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295 (FedAdagrad,
FedYogi, FedAdam).

Clients continue from the global adapter and train the FedIT set T (every LoRA A and B, and the heads); the server
turns their replies into a pseudo-gradient ``Δ_t = Σ_k p_k (θ_k − θ)`` (θ: the global value of T at round start) and
takes one optimiser step on it, elementwise and separately on every tensor of T (so A and B are moved separately:
the implied model ``W0 + s·B_new A_new`` is not an optimiser step on ``BA``; §36.0). The optimiser state has exactly
the shapes of T and lives in the server's named tensors, ``fedopt.m/<key>`` (momentum / first moment) and
``fedopt.v/<key>`` (second moment), float32, created by :meth:`init_server`; the number of server steps taken so far
is ``meta["fedopt.steps"]`` (it decides the first step, below; a round without an accepted reply takes no step).
Up: A, B, heads (``r(m+n)`` per module). Down: the same. Client optimisers are fresh every round.

* ``fedavgm``: ``v_t = β·v_{t−1} + (1 − d)·Δ_t`` for t > 0 and ``v_0 = Δ_0``; ``θ ← θ + η_s·v_t``. With the default
  dampening ``d = 0`` this is Hsu et al. / TFF's server SGD with momentum (Flower's FedAvgM); ``d = β`` with
  ``η_s = 1`` is OpenFedLLM's EMA form (``m_t = β m + (1−β) Δ``, ``m_0 = Δ_0``). The dampening is torch's
  ``SGD(dampening=)`` semantics: the first step is never dampened. Default weights ``n_k`` (num_examples).
* ``fedadam`` / ``fedyogi`` / ``fedadagrad`` (Algorithm 2, no bias correction, ``m_{−1} = 0``): ``m_t = β1·m_{t−1}
  + (1 − β1)·Δ_t``; Adagrad ``v_t = v_{t−1} + Δ_t²``, Yogi ``v_t = v_{t−1} − (1 − β2)·Δ_t²·sign(v_{t−1} − Δ_t²)``,
  Adam ``v_t = β2·v_{t−1} + (1 − β2)·Δ_t²``; ``θ ← θ + η·m_t / (√v_t + τ)``. ``v_{−1} = τ²`` (Algorithm 2 and
  OpenFedLLM) unless ``initial_v`` says otherwise (0: Flower/TFF). Where ``√v_t + τ = 0`` (only with τ = 0 on a
  coordinate that never changed) the step is 0, not 0/0. Default weights uniform (Algorithm 2's box; OpenFedLLM).
  ``variant="openfedllm"`` reproduces OpenFedLLM's ``fed_global.py``: ``m_0 = Δ_0`` on the first server step and
  the second moment built from ``m_t²`` instead of ``Δ_t²`` (its FedAdagrad has no momentum: use ``beta1=0``,
  the default here).

Choices the spec leaves open: defaults ``β1 = 0.9`` (``0`` for FedAdagrad, as TFF's Keras Adagrad and OpenFedLLM),
``β2 = 0.99`` (paper text and OpenFedLLM; TFF's doc says 0.999), ``τ = 1e-3`` (TFF README and OpenFedLLM) and
``η = 0.03 ≈ 10^-1.5`` (a point of the paper's server-lr grid, inside its best ranges 10^-2.5…10^0 for
FedAdam/FedYogi and 10^-1.5…10^1 for FedAdagrad; in the tiny end-to-end setting 1e-2 is too slow: 0.29 accuracy after
5 rounds, 0.41 with 0.03); FedAvgM ``β = 0.9``, ``η_s = 1`` (TFF).
With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) ``Δ_t`` is the coordinate-wise statistic of the
differences ``θ_k − θ`` (the same as of the ``θ_k``, minus θ), unweighted; the optimiser step is unchanged.
The state is kept in float32 whatever the adapter's dtype; the new θ is cast back to it. Only the default adapter at
the global rank is optimised: uniform client ranks below ``lora_r`` are refused (the state has T's shapes).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlora.adapters.state import AdapterState, namespaced
from fedlora.methods.base import (
    AggregateResult,
    ClientUpdate,
    FedMethod,
    ServerState,
    option,
    register_method,
)

M_NS = "fedopt.m"
"""Namespace of the momentum / first-moment tensors in ``ServerState.tensors``."""
V_NS = "fedopt.v"
"""Namespace of the second-moment tensors."""
STEPS = "fedopt.steps"
"""``ServerState.meta`` key: server steps taken so far."""


@dataclass(frozen=True)
class FedAvgMOptions:
    server_lr: float = option(1.0, "server learning rate η_s", minimum=0.0)
    momentum: float = option(0.9, "server momentum β", minimum=0.0, maximum=1.0)
    dampening: float = option(
        0.0,
        "dampening d of the momentum (v = β v + (1−d) Δ, first step v = Δ): 0 = Hsu et al./TFF/Flower; "
        "d = β with server_lr = 1 reproduces OpenFedLLM's EMA",
        minimum=0.0,
        maximum=1.0,
    )


_VARIANTS = ("paper", "openfedllm")
_VARIANT_HELP = (
    "paper: Algorithm 2 (m_0 = (1−β1)Δ_0, v from Δ²); openfedllm: OpenFedLLM's fed_global.py (m_0 = Δ_0, v from m²)"
)
_INITIAL_V_HELP = "initial second moment v_{-1} (none: τ², Algorithm 2 and OpenFedLLM; 0: Flower and TFF)"


@dataclass(frozen=True)
class AdaptiveOptions:
    server_lr: float = option(0.03, "server learning rate η (≈ 10^-1.5)", minimum=0.0)
    beta1: float = option(0.9, "first-moment decay β1", minimum=0.0, maximum=1.0)
    beta2: float = option(0.99, "second-moment decay β2", minimum=0.0, maximum=1.0)
    tau: float = option(1e-3, "adaptivity τ (added to √v)", minimum=0.0)
    variant: str = option("paper", _VARIANT_HELP, choices=_VARIANTS)
    initial_v: float | None = option(None, _INITIAL_V_HELP, minimum=0.0)


@dataclass(frozen=True)
class AdagradOptions:
    server_lr: float = option(0.03, "server learning rate η (≈ 10^-1.5)", minimum=0.0)
    beta1: float = option(
        0.0, "first-moment decay β1 (0: no momentum, as TFF and OpenFedLLM)", minimum=0.0, maximum=1.0
    )
    tau: float = option(1e-3, "adaptivity τ (added to √v)", minimum=0.0)
    variant: str = option("paper", _VARIANT_HELP, choices=_VARIANTS)
    initial_v: float | None = option(None, _INITIAL_V_HELP, minimum=0.0)


class ServerOptimizer(FedMethod):
    """FedIT clients; the server steps an optimiser on the pseudo-gradient ``Δ_t`` of every tensor of T.

    Subclasses name their state (:attr:`state_namespaces`), its initial value (:meth:`initial_value`) and one step
    (:meth:`step`), all elementwise on float32 tensors of one key.
    """

    family = "server optimiser (FedOpt)"
    up = "A, B, heads"
    down = "A, B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    state_namespaces: ClassVar[tuple[str, ...]] = (M_NS,)

    def optimised_keys(self) -> tuple[str, ...]:
        """T: the tensors clients train and share (FedIT's set: every A and B, and the heads)."""
        return self.layout.all_keys

    def initial_value(self, namespace: str) -> float:
        """The value every entry of the state ``namespace`` starts from."""
        return 0.0

    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        tensors = dict(server.tensors)
        for ns in self.state_namespaces:
            for key in self.optimised_keys():
                tensors[namespaced(ns, key)] = torch.full(
                    server.adapter[key].shape, self.initial_value(ns), dtype=torch.float32
                )
        return dataclasses.replace(server, tensors=tensors, meta={**server.meta, STEPS: 0})

    @abstractmethod
    def step(
        self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One server step on one tensor: ``(change of θ, new state)`` from the pseudo-gradient ``delta``, the state
        (``{namespace: tensor}``) and the number ``t`` of steps taken before this one."""

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        t = int(server.meta.get(STEPS, 0))
        keys = self.optimised_keys()
        adapter = dict(server.adapter)
        tensors = dict(server.tensors)
        sq_norm = 0.0
        for key in keys:
            theta = server.adapter[key]
            # Σ p_k (θ_k − θ): differences first, so a coordinate no client changed has Δ = 0 exactly
            delta = self.combine((u.state[key].float() - theta.float() for u in updates), w)
            sq_norm += float(delta.square().sum())
            state = {ns: server.tensors[namespaced(ns, key)] for ns in self.state_namespaces}
            change, new_state = self.step(delta, state, t)
            adapter[key] = (theta.float() + change).to(theta.dtype)
            for ns, value in new_state.items():
                tensors[namespaced(ns, key)] = value
        return AggregateResult(
            adapter=adapter,
            tensors=tensors,
            meta={**server.meta, STEPS: t + 1},
            metrics={"pseudo_gradient_norm": sq_norm**0.5},
        )


@register_method
class FedAvgM(ServerOptimizer):
    id = "fedavgm"
    paper = "Hsu et al., arXiv:1909.06335 (2019)"
    default_weighting = "num_examples"
    Options = FedAvgMOptions

    def step(
        self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        v = delta.clone() if t == 0 else o.momentum * state[M_NS] + (1.0 - o.dampening) * delta
        return o.server_lr * v, {M_NS: v}


class AdaptiveServerOptimizer(ServerOptimizer):
    """Reddi et al.'s Algorithm 2: first moment m, second moment v (per variant), step ``η·m/(√v + τ)``."""

    paper = "Reddi et al., ICLR 2021, arXiv:2003.00295"
    default_weighting = "uniform"
    state_namespaces = (M_NS, V_NS)

    def initial_value(self, namespace: str) -> float:
        if namespace != V_NS:
            return 0.0
        o = self.options
        return o.tau**2 if o.initial_v is None else o.initial_v

    @abstractmethod
    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and this step's square (``Δ_t²``, or ``m_t²`` for OpenFedLLM)."""

    def step(
        self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        openfedllm = o.variant == "openfedllm"
        first = openfedllm and t == 0  # OpenFedLLM: m_0 = Δ_0
        m = delta.clone() if first else o.beta1 * state[M_NS] + (1.0 - o.beta1) * delta
        v = self.second_moment(state[V_NS], (m if openfedllm else delta).square())
        denom = v.sqrt() + o.tau
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        change = torch.where(denom > 0, o.server_lr * m / safe, torch.zeros_like(m))
        return change, {M_NS: m, V_NS: v}


@register_method
class FedAdam(AdaptiveServerOptimizer):
    id = "fedadam"
    Options = AdaptiveOptions

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        b2 = self.options.beta2
        return b2 * v + (1.0 - b2) * sq


@register_method
class FedYogi(AdaptiveServerOptimizer):
    id = "fedyogi"
    Options = AdaptiveOptions

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.options.beta2) * sq * torch.sign(v - sq)


@register_method
class FedAdagrad(AdaptiveServerOptimizer):
    id = "fedadagrad"
    Options = AdagradOptions

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v + sq
