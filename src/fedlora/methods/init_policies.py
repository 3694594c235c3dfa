"""Round-start policies (Avg-Initial, Re-Initial, Local-Initial) as mixins any aggregator can wear (METHODS.md §13).

Paper: J. Bian, L. Wang, L. Zhang, J. Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, arXiv:2411.14961 (its study of client-side initialisation; no code was
published, so the policies follow METHODS.md §13 at paper level).

A round-start policy decides what a client trains from at the start of round t; the aggregator decides what the
server makes of the replies. The two are independent, so each policy is a mixin placed *before* a method class:

* ``AvgInitial`` (``init_avg``): every client starts from the aggregate ``θ_t = Σ p_k θ_{t-1}^k`` (FedIT, FedEx-LoRA,
  FFA-LoRA, FlexLoRA, RoLoRA already do this; the mixin changes nothing and exists to name the policy).
* ``ReInitial`` (``init_re``): after every ``reinit_period()``-th aggregation the aggregated update is merged into the
  frozen weights, ``W'_t = W'_{t-1} + s·B_t A_t`` (factored ``(s·B_t, A_t)`` per module, so it travels as
  ``r(m+n)``), and the next round every client starts from a fresh LoRA: A drawn as ``init_lora_weights`` says,
  B = 0, from one seed common to all clients of the round (the plan's ``reinit_seed``; the factors themselves never
  travel). The seed is common because the aggregators here average A: independently drawn A's would average to a
  shrunken random matrix. The server's adapter holds the same fresh factors, so a method that keeps A on the server
  (FFA-LoRA) aggregates against the A its clients really trained with, and the global model is unchanged by the
  merge (B = 0). A base change the inner method makes in the same round (FedEx-LoRA's residual) is added to the
  merge. FedLoRU (§14) is this policy with period τ (:mod:`fedlora.methods.fedloru`).
* ``LocalInitial`` (``init_local``): after each aggregation one of the round's accepted clients, ``c``, is drawn
  uniformly (seeded by run seed and round) and every client of the next round starts from c's uploaded LoRA factors
  ``(A^c, B^c)`` instead of the aggregate; W0 is unchanged, task heads come from the aggregate, and the global model
  (evaluated, exported) is still the aggregate. Open (METHODS.md §13, unverified): the paper's text was not available
  to check that Local-Initial broadcasts one client's factors with W0 unchanged; this follows METHODS.md.

Combining a policy with another aggregator: subclass both, the policy first, give the new class its own id (and no
aliases), and register it if it should appear in the registry::

    from fedlora.methods import register_method
    from fedlora.methods.ffa_lora import FFALoRA
    from fedlora.methods.init_policies import ReInitial

    @register_method
    class FFAReInit(ReInitial, FFALoRA):
        id = "ffa_lora_init_re"
        aliases = ()
        paper = FFALoRA.paper

The policy wraps the method's own ``plan`` (it replaces what the client starts from: the LoRA keys of the download)
and ``aggregate`` (it post-processes the result), so the method's aggregation rule, weighting, upload and options
stay its own. The mixins refuse mixed client ranks (the fresh or broadcast factors have the global rank). Re-Initial
needs a method whose server state is one global default adapter that clients start from (not personal or extra
adapters, not a method that re-initialises already, like FLoRA); Local-Initial needs a method whose plan downloads
the LoRA factors it wants replaced. Re-Initial refuses robust aggregators (it merges the product ``s·B̄Ā`` of the
aggregated factors into W0, and the merged product is not bounded by what the honest clients sent); Local-Initial
refuses them too (every client starts from one client's own upload, which no aggregator bounds), and with them
server-side DP noise and secure aggregation (:func:`fedlora.privacy.user_level.average_refusal`).

The registered ids pair each policy with FedIT's aggregation (``A = Σ p_k A_k``, ``B = Σ p_k B_k``, ``p_k ∝ n_k``).
Up: A, B, heads (``r(m+n)``). Down: ``init_avg`` A, B, heads; ``init_re`` heads + the merged factors
``(s·B̄, Ā)`` as a base change (``r(m+n)``); ``init_local`` client c's A, B and the aggregated heads.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any, ClassVar

from fedlora.adapters.peft_io import dense_delta
from fedlora.methods.base import (
    AggregateResult,
    BaseDelta,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ServerState,
    derive_seed,
    register_method,
)
from fedlora.methods.fedit import FedIT

START_POLICIES = ("avg", "re", "local")
"""``avg``: start from the aggregate; ``re``: merge the aggregate into W0 and start from a fresh LoRA; ``local``:
start from one client's uploaded factors."""

FRESH_SEED = "round_start/fresh_seed"
"""Server meta: the seed of the fresh LoRA the next round's clients start from (Re-Initial, after a merge)."""
LOCAL_CLIENT = "round_start/local_client"
"""Server meta: the client whose factors the next round starts from (Local-Initial)."""
LOCAL_PREFIX = "round_start.local/"
"""Server tensors: that client's uploaded LoRA factors, under this prefix."""


class RoundStart(FedMethod):
    """The shared part of the round-start mixins: the policy's name and the checks of what it can wear."""

    start_policy: ClassVar[str] = "avg"
    supports_mixed_ranks = False

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        if self.start_policy not in START_POLICIES:
            raise ValueError(f"{self.id}: start_policy={self.start_policy!r}; allowed: {', '.join(START_POLICIES)}")
        if self.start_policy != "avg" and (self.extra_adapters or self.has_personal_state):
            raise ValueError(
                f"{self.id}: the {self.start_policy!r} round start replaces the one global adapter clients start from; "
                "it does not fit a method with personal state or further adapters"
            )
        super().__init__(ctx, options)

    def start_from(self, plan: ClientPlan, server: ServerState) -> ClientPlan:
        """The plan with the policy's starting point in place of the method's (unchanged for Avg-Initial)."""
        return plan

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        return self.start_from(super().plan(rnd, client_id, server), server)


class AvgInitial(RoundStart):
    """Avg-Initial: every client starts from the aggregate (what the method already sends)."""

    start_policy = "avg"


class ReInitial(RoundStart):
    """Re-Initial: merge the aggregated update into W0 every :meth:`reinit_period` aggregations; the next round's
    clients start from a fresh LoRA drawn from one common seed."""

    start_policy = "re"
    changes_base = True
    supports_robust_aggregation = False
    robust_refusal = (
        "it merges the product s*B@A of the aggregated factors into the frozen weights; with a median or trimmed mean "
        "that product is the product of two coordinate-wise statistics, and the merged base change is not bounded by "
        "what the honest clients sent"
    )

    def reinit_period(self) -> int:
        """Merge and re-initialise after every this many rounds (1: every round)."""
        return 1

    def merges_after(self, rnd: int) -> bool:
        """Whether the aggregation of round ``rnd`` (0-based) merges into W0 and re-initialises."""
        return (rnd + 1) % self.reinit_period() == 0

    def start_from(self, plan: ClientPlan, server: ServerState) -> ClientPlan:
        if plan.reinit_seed is not None:
            raise ValueError(f"{self.id}: the method it wears re-initialises LoRA itself; Re-Initial would do it twice")
        seed = server.meta.get(FRESH_SEED)
        if seed is None:
            return plan
        lora = set(self.layout.lora_keys)
        download = {k: v for k, v in plan.download.items() if k not in lora}
        return dataclasses.replace(plan, download=download, reinit_seed=int(seed))

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        result = super().aggregate(rnd, server, updates)
        meta = dict(server.meta if result.meta is None else result.meta)
        meta.pop(FRESH_SEED, None)
        if not self.merges_after(rnd):
            return dataclasses.replace(result, meta=meta)
        adapter = dict(result.adapter)
        deltas: dict[str, BaseDelta] = dict(result.base_delta or {})
        seed = derive_seed(self.seed, self.id, "reinit", rnd)
        fresh = self.fresh_factors(seed, self.module_ranks(None))
        for spec in self.layout.modules:
            a, b = adapter[spec.a_key].float(), adapter[spec.b_key].float()
            merged = (spec.scaling() * b, a)
            if spec.name in deltas:  # the inner method changed this weight too: one dense change
                deltas[spec.name] = dense_delta(deltas[spec.name]) + merged[0] @ merged[1]
            else:
                deltas[spec.name] = merged
            adapter[spec.a_key] = fresh[spec.a_key].to(adapter[spec.a_key].dtype)
            adapter[spec.b_key] = fresh[spec.b_key].to(adapter[spec.b_key].dtype)
        meta[FRESH_SEED] = seed
        return dataclasses.replace(result, adapter=adapter, base_delta=deltas, meta=meta)


class LocalInitial(RoundStart):
    """Local-Initial: the next round's clients start from the LoRA factors one accepted client uploaded."""

    start_policy = "local"
    supports_robust_aggregation = False
    robust_refusal = (
        "every client starts the next round from one client's own upload, which no aggregator bounds (and which "
        "secure aggregation and server-side noise do not reveal)"
    )

    def start_from(self, plan: ClientPlan, server: ServerState) -> ClientPlan:
        picked = {k[len(LOCAL_PREFIX) :]: v for k, v in server.tensors.items() if k.startswith(LOCAL_PREFIX)}
        if not picked:
            return plan
        download = {k: (picked[k].clone() if k in picked else v) for k, v in plan.download.items()}
        return dataclasses.replace(plan, download=download)

    def pick(self, rnd: int, updates: Sequence[ClientUpdate]) -> ClientUpdate:
        """The accepted client whose factors the next round starts from: uniform, seeded by run seed and round."""
        ordered = sorted(updates, key=lambda u: u.client_id)
        rng = random.Random(derive_seed(self.seed, self.id, "local", rnd))
        return ordered[rng.randrange(len(ordered))]

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        result = super().aggregate(rnd, server, updates)
        chosen = self.pick(rnd, updates)
        tensors = dict(server.tensors if result.tensors is None else result.tensors)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(LOCAL_PREFIX)}
        lora = set(self.layout.lora_keys)
        tensors.update({LOCAL_PREFIX + k: v.clone() for k, v in chosen.state.items() if k in lora})
        meta = dict(server.meta if result.meta is None else result.meta)
        meta[LOCAL_CLIENT] = chosen.client_id
        return dataclasses.replace(result, tensors=tensors, meta=meta)


_FEDIT_UP = "A, B, heads"


@register_method
class InitAvg(AvgInitial, FedIT):
    id = "init_avg"
    aliases = ()
    family = "initialisation (client side: Avg-Initial)"
    paper = "Bian et al., ICCV 2025, arXiv:2411.14961 (round-start study); aggregation: FedIT"
    up = _FEDIT_UP
    down = "A, B (the aggregate), heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"


@register_method
class InitRe(ReInitial, FedIT):
    id = "init_re"
    aliases = ()
    family = "initialisation (client side: Re-Initial)"
    paper = "Bian et al., ICCV 2025, arXiv:2411.14961 (round-start study); aggregation: FedIT"
    up = _FEDIT_UP
    down = "heads + the merged update (s*B, A) as a base change; the fresh LoRA as a seed"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"


@register_method
class InitLocal(LocalInitial, FedIT):
    id = "init_local"
    aliases = ()
    family = "initialisation (client side: Local-Initial)"
    paper = "Bian et al., ICCV 2025, arXiv:2411.14961 (round-start study); aggregation: FedIT"
    up = _FEDIT_UP
    down = "A, B of one client of the last round, aggregated heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
