"""FedDPA: a federated global adapter plus a private local adapter per client (METHODS.md §17).

Paper: Y. Yang, G. Long, T. Shen, J. Jiang, M. Blumenstein, "Dual-Personalizing Adapter for Federated Foundation
Models", NeurIPS 2024, arXiv:2403.19211. Reference code: Lydia-yang/FedDPA@cf638c1.

Every client holds two LoRA adapters with the same rank, alpha and target modules: the global ``default`` adapter
(``A_g, B_g`` and the task heads, federated) and its own ``local`` adapter (``A_l, B_l``, keys ``local/<peft key>``,
never uploaded; no head of its own: the head belongs to the global adapter). A round of client ``k``:

1. *Local step* (only in rounds ``t >= local_from``): train ``A_l, B_l`` alone on the mix
   ``y = W0 x + s·((1 - a)·B_g A_g x + a·B_l A_l x)`` with ``a = local_weight``. The global adapter is not in the
   trainable set, so it is stop-gradient: after this step it is bit-identical to the download (the reference
   detaches the global's output instead; the local factors get the same gradients).
2. *Global step*: plain FedIT training of the global adapter (and heads) alone, ``y = W0 x + s·B_g A_g x``, from
   the downloaded global.

Up: the global adapter ``A_g, B_g`` (``r(m+n)`` per module) and heads. Down: the same. The local adapter stays with
the client (the engine keeps it between rounds, also across rounds the client sits out). Server:
``θ_g = Σ_k (1/K) θ_g^k`` for A, B and heads separately — **uniform** weights, as in the reference code
(``model_aggregation.py``: the data-size weights are commented out); ``--weighting`` overrides it. A robust
``aggregator`` (``median``, ``trimmed_mean:<beta>``) takes the coordinate-wise statistic of A, B and heads instead.

Inference (a client's own model, evaluated on its own test split and saved under ``personal/client-K``):
``y = W0 x + s·(w_g·B_g A_g x + w_l·B_l A_l x)`` with ``w_g + w_l = 1``: ``weight_on="global"`` (the reference code:
``set_local(['local'], [w, 1-w])`` with ``default`` active) gives ``w_g = w = inference_weight``; ``"local"`` gives
``w_l = w`` (what the paper's motivation suggests: the more a test instance resembles local data, the larger the local
share). Before a client's local adapter has been trained its ``B_l`` is 0, so its model is the global at ``w_g``.

Choices the specification leaves open, each an option:

* ``variant``: ``iterative`` = FedDPA-T (the reference's ``--local_model True``): local step from round 1 on, as the
  reference (round 0 trains the global only). ``sequential`` = FedDPA-F: the reference's ``main.py`` is plain FedIT
  and the local fine-tune "happens outside main.py"; we read it as the client fine-tuning its local adapter on top
  of the global it received in the last federated round, i.e. the global step every round and the local step only
  from round ``local_from_round`` (default: the last round, ``rounds - 1``). In that round the local step runs on
  the global downloaded at its start; the evaluated personal model then pairs the local adapter with the global
  aggregated at the end of that round (one more FedIT step). The default depends on the run's ``rounds``: a run
  resumed with a larger ``rounds`` trains the local adapter in the old last round and again from the new last round
  on; set ``local_from_round`` explicitly to make extension-by-resume equal to a longer run.
* ``local_from_round``: overrides the round the local step starts in, for either variant.
* ``local_weight`` ``a`` in ``(0, 1]``: the local adapter's share during the local step (reference ``--local_weight``,
  default 0.5); the frozen global gets ``1 - a``.
* ``local_init``: the local adapter a client starts from at its first participation. ``shared``: the run's initial
  ``local`` adapter (A drawn once from the run seed, B = 0), the same for every client. ``per_client``: A drawn from
  a seed of (run seed, client id), B = 0 — the reference adds a fresh ``local`` adapter per client at round 1 from
  the global torch RNG, i.e. different draws per client. Either way ``B_l A_l = 0`` at the start.
* ``inference_weight`` ``w`` and ``weight_on``: see above; the reference's default ``max_weight``/``half`` is 0.5.

Both steps use the run's local training settings (epochs or steps, batch size, optimiser, learning rate; a fresh
optimiser per step), as the reference builds the same ``Trainer`` twice; a FedDPA-T client therefore processes its
data twice per round from round 1 on (``samples_seen`` counts both steps).

Not implemented: the paper's instance-wise dynamic weighting (``--auto``: ``w = c·mean_i cos(e_test, e_i)`` over
embeddings of the test instance and of ``instance_num`` random local training instances, computed with the local
adapter active). A fixed weight ``w`` is used for every instance; the reference's ``glocal`` mode is not reproduced.
Deviation from the reference: with partial participation the reference reloads the local adapter from round
``t - 1`` only, so a client that skipped that round restarts from a fresh one (unless ``client_selection_strategy``
is ``subset``); here a client always resumes from the local adapter it trained last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlora.adapters.state import AdapterState, subset
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

LOCAL = "local"
"""Namespace (and peft adapter name) of the client's private adapter."""


@dataclass(frozen=True)
class FedDPAOptions:
    variant: str = option(
        "iterative",
        "iterative = FedDPA-T (local step every round from round 1); sequential = FedDPA-F (global step every round, "
        "local fine-tune on top of the received global from local_from_round, default the last round)",
        choices=("iterative", "sequential"),
    )
    local_weight: float = option(
        0.5,
        "a: weight of the local adapter in the local step, the frozen global gets 1-a (reference --local_weight)",
        minimum=0.0,
        maximum=1.0,
    )
    local_from_round: int | None = option(
        None, "first round (0-based) with a local step; default: 1 (iterative) or rounds-1 (sequential)", minimum=0
    )
    inference_weight: float = option(
        0.5,
        "w: fixed mixing weight at inference; the other adapter gets 1-w (the paper's instance-wise dynamic "
        "weighting is not implemented)",
        minimum=0.0,
        maximum=1.0,
    )
    weight_on: str = option(
        "global",
        "which adapter w multiplies at inference: global (the reference code) or local (the paper's motivation)",
        choices=("global", "local"),
    )
    local_init: str = option(
        "shared",
        "a client's first local adapter: shared (the run's initial local adapter) or per_client (A drawn per client, "
        "B = 0, like the reference's fresh adapter per client)",
        choices=("shared", "per_client"),
    )

    def __post_init__(self) -> None:
        if not self.local_weight > 0.0:
            raise ValueError(f"local_weight={self.local_weight!r} must be > 0: at 0 the local adapter gets no gradient")


@register_method
class FedDPA(FedMethod):
    id = "feddpa"
    family = "personalised (dual global/local adapters)"
    paper = "Yang et al., NeurIPS 2024, arXiv:2403.19211"
    up = "global adapter A, B, heads (the local adapter never leaves the client)"
    down = "global adapter A, B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "uniform"
    has_personal_state = True
    extra_adapters = (LOCAL,)
    Options = FedDPAOptions

    # ----------------------------------------------------------------- keys and schedule
    def global_keys(self) -> tuple[str, ...]:
        """The federated adapter: the default adapter's A, B and heads."""
        return self.layout.all_keys

    def local_keys(self) -> tuple[str, ...]:
        """The client's private adapter: ``local/…`` A and B."""
        return self.extra_layouts[LOCAL].lora_keys

    def local_from(self) -> int:
        """The first round with a local step."""
        if self.options.local_from_round is not None:
            return self.options.local_from_round
        return 1 if self.options.variant == "iterative" else max(self.ctx.rounds - 1, 0)

    def stages(self, rnd: int) -> tuple[Stage, ...]:
        """Round ``rnd``'s training passes: [local step (global frozen, mixed), ] global step (global alone)."""
        global_step = Stage(frozenset(self.global_keys()), {"": 1.0})
        if rnd < self.local_from():
            return (global_step,)
        a = self.options.local_weight
        local_step = Stage(frozenset(self.local_keys()), {"": 1.0 - a, LOCAL: a})
        return (local_step, global_step)

    # ----------------------------------------------------------------- server side
    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.global_keys()
        return self.make_plan(
            rnd, client_id, server, download=subset(server.adapter, keys), upload_keys=keys, stages=self.stages(rnd)
        )

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        return AggregateResult(adapter=self.average_keys(self.global_keys(), updates, w))

    # ----------------------------------------------------------------- client side
    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        """The download, the client's own local adapter (kept from its last round), or at its first participation
        the initial one (``shared``) or a draw of its own (``per_client``)."""
        state = super().start_state(plan, initial, personal)
        if personal is None and self.options.local_init == "per_client":
            seed = derive_seed(self.seed, "feddpa.local", plan.client_id)
            drawn = self.fresh_factors(seed, plan.ranks, self.extra_layouts[LOCAL])
            state.update({k: v.to(initial[k].dtype) for k, v in drawn.items()})
        return state

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        return subset(trained, plan.upload_keys), subset(trained, self.local_keys())

    def inference_weights(self, client_id: int) -> Mapping[str, float]:
        w = self.options.inference_weight
        if self.options.weight_on == "global":
            return {"": w, LOCAL: 1.0 - w}
        return {"": 1.0 - w, LOCAL: w}
