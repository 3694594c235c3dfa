"""SCAFFOLD: control variates correct each client's drift (METHODS.md §36.2).

Paper: S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, arXiv:1910.06378.

T is FedIT's set (every LoRA A and B, and the heads). The server holds a control variate ``c`` (``scaffold.c/<key>``
per key of T, float32, zeros at start) and client i keeps its own ``c_i`` (``scaffold.ci/<key>``, zeros before its
first participation; the engine holds it and commits it only when the reply is accepted). The plan downloads the
global adapter and ``c``; the client trains T with every gradient corrected to ``g + c − c_i``
(:class:`fedlora.client.objectives.GradientShift`; applied before clipping and the optimiser step). Then, option II,
``c_i⁺ = c_i − c + (θ − y)/(K·η_l)`` with θ the downloaded global, y the trained adapter, K the local steps and η_l the
local learning rate; the client uploads y (keys of T) and ``Δc_i = c_i⁺ − c_i`` (``scaffold.dc/<key>``, float32) and
keeps ``c_i⁺``. With a lossy upload codec the client keeps ``c_i + Δc_i`` as the server decodes it, so ``c`` stays
the mean of the ``c_i``. The server: ``θ ← θ + η_g·Σ p_k (y_k − θ)`` and ``c ← c + (1/N)·Σ_{k∈S} Δc_k`` with N the
number of all clients (the paper and OpenFedLLM). Default ``p_k`` uniform and ``η_g = 1`` (the paper; OpenFedLLM uses
n_k weights: ``weighting=num_examples``).

Where the correction enters is the option ``correction``. ``after_step`` (default): after each optimiser step
``y ← y − η_l(c − c_i)``, as OpenFedLLM does with AdamW; ``gradient``: ``g ← g + c − c_i`` before the step, the
paper's SGD form. Under plain SGD (momentum 0, no clipping) both give exactly ``y ← y − η_l(g − c_i + c)``. With
AdamW the ``gradient`` form is Adam-normalised: the correction (Adam-direction units, ~1 per coordinate) swamps the
task gradient and the run oscillates instead of learning (tiny end-to-end setting: chance level after 5 rounds),
which is why ``after_step`` is the default. Either way ``(θ − y)/(Kη_l)`` under AdamW is an average Adam direction,
not an average gradient.
y travels as the trained values (as in OpenFedLLM; the paper sends ``y − θ``, which codecs encode anyway, since θ was
downloaded). Clients must train at the global rank (c has T's shapes).
With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) both server sums become the coordinate-wise
statistic, unweighted: ``θ ← θ + η_g·robust_k(y_k − θ)`` and ``c ← c + (|S|/N)·robust_k(Δc_k)``; ``c`` is then no
longer exactly the mean of the clients' ``c_i`` (a client's drift estimate can be outvoted), only an estimate of it.
Up: y and Δc (``2r(m+n)`` per module, heads twice). Down: θ and c (the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, namespaced, subset
from fedlora.client.codecs import parse_codec, roundtrip
from fedlora.client.objectives import GradientShift, Objective
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    TensorSpec,
    TrainStats,
    option,
    register_method,
)

C_NS = "scaffold.c"
"""The server control variate ``c`` (server tensors, and downloaded)."""
CI_NS = "scaffold.ci"
"""A client's control variate ``c_i`` (kept by the client)."""
DC_NS = "scaffold.dc"
"""A client's change ``Δc_i`` of its control variate (uploaded)."""


@dataclass(frozen=True)
class ScaffoldOptions:
    server_lr: float = option(1.0, "global step size η_g (the paper's experiments and OpenFedLLM: 1)", minimum=0.0)
    correction: str = option(
        "after_step",
        "where c − c_i enters: after_step (θ ← θ − lr·(c − c_i) after each optimiser step, OpenFedLLM's form, works "
        "with AdamW) or gradient (g ← g + c − c_i, the paper's SGD form); identical under plain SGD",
        choices=("after_step", "gradient"),
    )


@register_method
class Scaffold(FedMethod):
    id = "scaffold"
    family = "client drift correction (control variates)"
    paper = "Karimireddy et al., ICML 2020, arXiv:1910.06378"
    up = "A, B, heads and their control-variate changes Δc_i"
    down = "A, B, heads and the server control variate c"
    bytes_up = "2r(m+n) + 2 heads"
    bytes_down = "2r(m+n) + 2 heads"
    default_weighting = "uniform"
    Options = ScaffoldOptions

    def optimised_keys(self) -> tuple[str, ...]:
        """T: every A and B, and the heads."""
        return self.layout.all_keys

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        tensors = dict(server.tensors)
        for key in self.optimised_keys():
            tensors[namespaced(C_NS, key)] = torch.zeros(server.adapter[key].shape, dtype=torch.float32)
        return dataclasses.replace(server, tensors=tensors)

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.optimised_keys()
        download = subset(server.adapter, keys)
        download.update({namespaced(C_NS, k): server.tensors[namespaced(C_NS, k)] for k in keys})
        dc_keys = [namespaced(DC_NS, k) for k in keys]
        plan = self.make_plan(rnd, client_id, server, download=download, upload_keys=[*keys, *dc_keys], train_keys=keys)
        upload = dict(plan.upload)
        for k in dc_keys:  # control variates travel in float32 whatever the adapter's dtype
            upload[k] = TensorSpec(upload[k].shape, torch.float32)
        return dataclasses.replace(plan, upload=upload)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        keys = self.optimised_keys()
        eta = self.options.server_lr
        adapter = dict(server.adapter)
        tensors = dict(server.tensors)
        n = self.ctx.num_clients
        uniform = [1.0 / len(updates)] * len(updates)
        for key in keys:
            theta = server.adapter[key]
            step = self.combine((u.state[key].float() - theta.float() for u in updates), w)  # Σ p_k (y_k − θ)
            adapter[key] = (theta.float() + eta * step).to(theta.dtype)
            c = namespaced(C_NS, key)
            # (1/N)·Σ_{k∈S} Δc_k written as (|S|/N)·mean_k Δc_k, so a robust aggregator bounds it too
            dc = self.combine((u.state[namespaced(DC_NS, key)].float() for u in updates), uniform)
            tensors[c] = server.tensors[c] + dc * (len(updates) / n)
        return AggregateResult(adapter=adapter, tensors=tensors)

    # ----------------------------------------------------------------- client side
    def _client_variate(self, key: str, plan: ClientPlan, personal: AdapterState | None) -> torch.Tensor:
        """``c_i`` of ``key`` (zeros before the client's first participation)."""
        kept = (personal or {}).get(namespaced(CI_NS, key))
        if kept is not None:
            return kept.float()
        return torch.zeros(plan.download[namespaced(C_NS, key)].shape, dtype=torch.float32)

    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        shift = {}
        for key in sorted(plan.train_keys):
            shift[key] = plan.download[namespaced(C_NS, key)].float() - self._client_variate(key, plan, personal)
        if all(not bool(s.any()) for s in shift.values()):
            return None  # c = c_i (e.g. both zero at a first participation): plain FedAvg training
        return GradientShift(shift, after_step=self.options.correction == "after_step")

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        if stats.steps <= 0 or not stats.lr > 0:
            raise ValueError(
                f"scaffold needs local steps and a positive learning rate (K={stats.steps}, lr={stats.lr})"
            )
        keys = self.optimised_keys()
        upload = subset(trained, keys)
        c_old = {k: self._client_variate(k, plan, personal) for k in keys}
        denom = stats.steps * stats.lr
        for key in keys:
            c = plan.download[namespaced(C_NS, key)].float()
            drift = (plan.download[key].float() - trained[key].float()) / denom
            c_new = c_old[key] - c + drift
            upload[namespaced(DC_NS, key)] = c_new - c_old[key]
        received = roundtrip(parse_codec(plan.upload_codec), upload, plan.download)
        keep = {namespaced(CI_NS, k): c_old[k] + received[namespaced(DC_NS, k)].float() for k in keys}
        return upload, keep
