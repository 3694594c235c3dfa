"""FedALT: each client trains its own LoRA next to a frozen Rest-of-World LoRA built from the others' (METHODS.md §40).

Paper: J. Bian, L. Wang, L. Zhang, J. Xu, "FedALT: Federated Fine-Tuning through Adaptive Local Training with
Rest-of-World LoRA", AAAI 2026, arXiv:2503.11880. Reference code: jmbian/FedALT@8be3dde (``server.py``, ``client.py``,
``main.py``; the mixture layer in its bundled ``peft/tuners/lora.py``).

Every client holds two LoRA adapters of the same rank, alpha and target modules: its **individual** LoRA (the
default adapter, ``A1, B1`` and the task heads) and a **Rest-of-World** (RoW) LoRA (the ``row`` adapter, keys
``row/<peft key>``, ``A0, B0``), mixed per token by a trainable **adaptive mixer** (the reference's MoE-style gate):
per adapted module ``W_g`` (2 × n, no bias, key ``gate/<module>.weight``) and

    ``y = W0 x + s·(g_0(x)·B0 A0 drop(x) + g_1(x)·B1 A1 drop(x))``,  ``g(x) = softmax(W_g x)`` for each token

(index 0 the RoW, 1 the individual LoRA; the logits come from the layer input before dropout, as the reference).
``W_g = 0`` gives ``g = (½, ½)``: ``y = W0 x + (s/2)(B0 A0 + B1 A1) x``.

* Client: trains ``A1, B1``, ``W_g`` and the heads; ``A0, B0`` are frozen (not in the trainable set: no gradient, so
  they are bit-identical to the download after training). The individual LoRA and ``W_g`` (and the heads, unless
  ``local_head=false``) are **kept local across rounds**: the engine holds them and hands them back, so what the
  client keeps is exactly what its training produced, whatever the server does. ``W_g`` never travels and is never
  aggregated (the reference's ``route_aggregation=False``); a client's first ``W_g`` is drawn as ``nn.Linear``
  initialises it (kaiming-uniform, a = √5) from (run seed, client id), as the reference builds each client's model
  on its own: the same client gets the same gate after a restart. Up: ``A1, B1`` (``r(m+n)`` per module) [and heads].
* Server, leave-one-out, uniform by default (the reference): for each client k of the round,
  ``A0^(k) = (1/(K−1))·Σ_{j≠k} A1^(j)`` and ``B0^(k) = (1/(K−1))·Σ_{j≠k} B1^(j)`` (A and B separately: the RoW product
  is FedIT-inexact, ``B0 A0 ≠ mean_{j≠k} B1^(j) A1^(j)``, as in the reference). ``--weighting`` replaces ``1/(K−1)`` by
  the others' weights renormalised over ``j ≠ k`` (capped by ``max_weight_ratio`` among them); a robust
  ``aggregator`` takes the coordinate-wise statistic of the others' factors. Down: client k's own RoW ``A0^(k), B0^(k)``
  (``r(m+n)`` per module per client) [and the heads' average]. The server keeps the round's leave-one-out adapters in
  its named tensors (``fedalt.loo/<client>/row/…``) and the statistic over all the round's uploads
  (``fedalt.world/row/…``): a client that did not take part in the last aggregation receives that one (every upload
  comes from someone else). With a single reply the others' set is empty: that client keeps the RoW it was sent and
  the world adapter becomes its upload. Before the first aggregation every client receives the initial ``row``
  adapter (A0 random, B0 = 0: it contributes nothing), as the reference.
* No global model: every client is evaluated with its own gate, on its own test split. ``personal/client-K/`` holds
  its two peft adapters and ``token_gate.safetensors`` (its ``W_g`` by module name): ``fedlora.load_trained(run,
  client=K)`` installs the gate and gives the engine's model; plain ``PeftModel.from_pretrained`` of the adapters
  alone does **not** (it has no gate), and ``fedlora export`` refuses a gated model (an input-dependent mix cannot be
  merged into weights or written as one peft adapter).

Choices, each an option where the specification leaves them open:

* ``mix``: ``gate`` (default, the reference) or ``fixed``: no gate, ``y = W0 x + s·(w·B1 A1 x + (1 − w)·B0 A0 x)``
  with ``individual_weight`` ``w`` (default ½, the gate at ``W_g = 0``); a fixed mix exports like FedDPA's.
* ``local_head``: the heads (``modules_to_save``; the reference is a causal LM without one) belong to the individual
  model and stay with the client (default), or are averaged FedIT-style over the round and sent to every client.
* ``individual_init``: a client's first individual LoRA is the run's initial default adapter (``shared``, default: the
  uploads then start from one point, which the round's direction check assumes) or drawn per client from (run seed,
  client) with B1 = 0 (``per_client``: the reference builds each client's model with its own draw; the direction check,
  which measures the uploaded factors themselves since the server never sent them, may then need ``--min-cosine
  null``).

Not reproduced: the cheaper broadcast of ``Σ_j A1^(j), Σ_j B1^(j)`` (each client subtracting its own): bytes are
counted per client here, so it would cost the same ``r(m+n)`` per client, and it is inexact under a lossy upload codec
(the client's kept factors differ from what the server decoded). FedALT needs ``K ≥ 2`` replies per round to build a
RoW from others; the reference runs every client every round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, namespaced, subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    Stage,
    TrainStats,
    derive_seed,
    option,
    register_method,
)

ROW = "row"
"""Namespace (and peft adapter name) of the frozen Rest-of-World adapter."""
LOO = "fedalt.loo"
"""Server tensors ``fedalt.loo/<client id>/row/<peft key>``: the round's leave-one-out RoW of each client."""
WORLD = "fedalt.world"
"""Server tensors ``fedalt.world/row/<peft key>``: the statistic over all the round's uploads (for the others)."""


@dataclass(frozen=True)
class FedALTOptions:
    mix: str = option(
        "gate",
        "how the individual and Rest-of-World LoRAs are mixed: gate (the reference: a trainable token-wise softmax "
        "gate W_g per module, kept by each client, never uploaded) or fixed (individual_weight)",
        choices=("gate", "fixed"),
    )
    individual_weight: float = option(
        0.5,
        "mix=fixed only: w, the individual LoRA's share of the mix, the Rest-of-World gets 1-w (0.5 = the gate at "
        "W_g = 0)",
        minimum=0.0,
        maximum=1.0,
    )
    local_head: bool = option(True, "keep the task heads with each client (false: average them over the round)")
    individual_init: str = option(
        "shared",
        "a client's first individual LoRA: shared (the run's initial adapter) or per_client (A drawn per client, "
        "B = 0, as the reference's separate model per client)",
        choices=("shared", "per_client"),
    )

    def __post_init__(self) -> None:
        if self.mix == "gate" and self.individual_weight != 0.5:
            raise ValueError(
                f"individual_weight={self.individual_weight!r} applies to mix=fixed only (the gate learns the mix)"
            )
        if not self.individual_weight > 0.0:
            raise ValueError(
                f"individual_weight={self.individual_weight!r} must be > 0: at 0 the individual LoRA gets no gradient"
            )


@register_method
class FedALT(FedMethod):
    id = "fedalt"
    family = "personalised (individual LoRA + frozen rest-of-world LoRA, mixed per token by a local gate)"
    paper = "Bian et al., AAAI 2026, arXiv:2503.11880"
    up = "individual A1, B1 (heads too if local_head=false); the gate W_g never travels"
    down = "the client's own Rest-of-World A0, B0 = mean of the OTHER clients' uploads (heads too if local_head=false)"
    bytes_up = "r(m+n) (+ heads if local_head=false)"
    bytes_down = "r(m+n) per client, personalised (+ heads if local_head=false)"
    default_weighting = "uniform"
    has_personal_state = True
    has_global_model = False
    extra_adapters = (ROW,)
    token_gate = (ROW, "")
    """The gate's index 0 is the Rest-of-World adapter, 1 the individual (default) one, as in the paper."""
    Options = FedALTOptions

    @classmethod
    def gate_of(cls, options: FedALTOptions) -> tuple[str, ...]:
        return cls.token_gate if options.mix == "gate" else ()

    # ----------------------------------------------------------------- keys
    def shared_heads(self) -> tuple[str, ...]:
        return () if self.options.local_head else self.layout.other_keys

    def personal_keys(self) -> tuple[str, ...]:
        """What a client keeps: its individual LoRA, its gate (and the heads when they are local)."""
        heads = self.layout.other_keys if self.options.local_head else ()
        return self.layout.lora_keys + heads + self.gate_keys()

    def mix_weights(self) -> dict[str, float]:
        """The multipliers of the two adapters' scales: 1 each under the gate (it mixes), ``(w, 1 − w)`` fixed."""
        if self.gate_adapters:
            return {"": 1.0, ROW: 1.0}
        w = self.options.individual_weight
        return {"": w, ROW: 1.0 - w}

    def upload_keys(self) -> tuple[str, ...]:
        return self.layout.lora_keys + self.shared_heads()

    def row_keys(self) -> tuple[str, ...]:
        return self.extra_layouts[ROW].lora_keys

    @staticmethod
    def loo_key(client_id: int, row_key: str) -> str:
        return namespaced(f"{LOO}/{client_id}", row_key)

    @staticmethod
    def world_key(row_key: str) -> str:
        return namespaced(WORLD, row_key)

    def row_for(self, server: ServerState, client_id: int) -> AdapterState:
        """Client ``client_id``'s Rest-of-World adapter: its leave-one-out average from the last aggregation, or the
        average over all of that round's uploads when it was not among them."""
        out = {}
        for rk in self.row_keys():
            own = server.tensors.get(self.loo_key(client_id, rk))
            out[rk] = own if own is not None else server.tensors[self.world_key(rk)]
        return out

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        """Before any aggregation every client's RoW is the initial ``row`` adapter (B0 = 0: it adds nothing);
        zeros when ``initial`` has no ``row`` keys."""
        server = super().init_server(initial)
        tensors = dict(server.tensors)
        for spec in self.extra_layouts[ROW].modules:
            for key, shape in ((spec.a_key, spec.a_shape()), (spec.b_key, spec.b_shape())):
                value = initial.get(key)
                tensors[self.world_key(key)] = value.detach().clone() if value is not None else torch.zeros(shape)
        return dataclasses.replace(server, tensors=tensors)

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        download = {k: v.clone() for k, v in self.row_for(server, client_id).items()}
        download.update({k: server.adapter[k] for k in self.shared_heads()})
        train = frozenset(self.layout.all_keys + self.gate_keys())  # A1, B1, W_g and the heads; never the RoW
        stages = (Stage(train, self.mix_weights()),)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=self.upload_keys(), stages=stages)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w_all = self.weights(updates)
        tensors: dict[str, torch.Tensor] = {}
        others = [updates[:i] + updates[i + 1 :] for i in range(len(updates))]
        w_others = [self.weights(o) if o else [] for o in others]
        for key in self.layout.lora_keys:
            rk = namespaced(ROW, key)
            dtype = server.tensors[self.world_key(rk)].dtype
            tensors[self.world_key(rk)] = self.combine((u.state[key] for u in updates), w_all).to(dtype)
            for u, rest, w in zip(updates, others, w_others, strict=True):
                if rest:
                    row = self.combine((o.state[key] for o in rest), w).to(dtype)
                else:  # a lone reply: no one else uploaded, the client keeps the RoW it was sent
                    row = self.row_for(server, u.client_id)[rk].clone()
                tensors[self.loo_key(u.client_id, rk)] = row
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.shared_heads(), updates, w_all))
        return AggregateResult(adapter=adapter, tensors=tensors)

    # ----------------------------------------------------------------- client side
    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        """The client's own individual LoRA and gate (kept from its last round), or at its first participation the
        initial LoRA (``shared``) or a draw of its own (``per_client``) and a gate drawn from (run seed, client); its
        RoW from the download."""
        state = super().start_state(plan, initial, personal)
        missing = [k for k in self.gate_keys() if k not in (personal or {})]
        if missing:
            drawn = self.fresh_gates(derive_seed(self.seed, "fedalt.gate", plan.client_id))
            for key in missing:
                state[key] = drawn[key].to(initial[key].dtype) if key in initial else drawn[key]
        if personal is None and self.options.individual_init == "per_client":
            drawn = self.fresh_factors(derive_seed(self.seed, "fedalt.individual", plan.client_id), plan.ranks)
            state.update({k: v.to(initial[k].dtype) for k, v in drawn.items()})
        return state

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        keep = {k: trained[k].detach().clone() for k in self.personal_keys()}
        return subset(trained, plan.upload_keys), keep

    def inference_weights(self, client_id: int) -> Mapping[str, float]:
        return self.mix_weights()
