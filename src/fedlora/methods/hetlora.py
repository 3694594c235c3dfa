"""HetLoRA: heterogeneous client ranks, a self-pruning regulariser, norm-weighted zero-padded aggregation (§15).

Paper: Y. J. Cho, L. Liu, Z. Xu, A. Fahrezi, G. Joshi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv:2401.06432. There is no official code (METHODS.md §15, §35); this follows
the paper and METHODS.md, and every choice the spec leaves open is listed below.

Down: client k of current rank ``r_k`` receives the top-left slice of the global adapter, ``A[:r_k]`` and
``B[:, :r_k]`` (nothing rescaled), and the heads. It continues training from them.

Client: the task loss plus ``λ·Σ_modules ‖B_k[:, t:]‖_F·‖A_k[t:, :]‖_F`` with ``t = max(min_rank, ⌊γ·r_k⌋)``,
computed on the differentiable tensors (a real gradient; the FlexLoRA-branch re-implementation used ``.data`` and
was inert, §6). After training, if ``prune`` is on and that tail quantity (summed over modules, λ left out) is
smaller than at the start of the round, the client cuts every module to rank ``t`` and uploads ``A_k[:t]``,
``B_k[:, :t]``: its reply has the lower rank (the plan allows it: ``rank_may_shrink``), at the scale it trained
with. The paper only says the rank is reduced when the regularised tail has become small and implementations
differ (§15); this "the tail shrank during the round" test is our choice. A client's rank is one number for all
its modules (the regulariser is one sum too); it only ever decreases and is kept in ``server.meta["ranks"]``
(``{client id: rank}``), initialised from the configured client ranks (or the global rank), updated from the
ranks of accepted replies (the round's metrics report their mean, ``mean_client_rank``). A client with
``t >= r_k`` (already at ``min_rank``) has no tail: no regulariser, never pruned.
Up: ``A_k, B_k`` at the client's (possibly just pruned) rank (``r_k(m+n)`` per module) and the heads.

Server: per module every client is zero-padded to the global rank R and weighted by the norm of its own product,
``w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F`` with each client's own scale ``s_k`` (from its reply), computed
without forming m×n (``‖BA‖_F² = Σ (BᵀB) ⊙ (AAᵀ)``); then ``A = Σ w_k pad(A_k)`` and ``B = Σ w_k pad(B_k)``
(separately: the FedIT discordance remains, as in the paper). The paper weighs per module; the third-party codes
sum norms over modules (§15): per module here. When every reply's product of a module is zero (no B moved off zero) the
norm weights are undefined and the method's client weighting is used instead. The norm weights are capped like
client weights (``max_weight_ratio``: a client with a huge product cannot own the round); robust aggregators are
refused (the norm-weighted padded average is not a plain average of what travels). Heads are averaged with the
method's client weighting (``num_examples`` by default). Rank indices no client of the round owns come out zero.

Also open in the spec, chosen here: a rank a client receives with both its row of A and its column of B exactly
zero (a rank no client trained last round) has zero gradient forever; with ``revive`` (default on) the client
re-draws that row of A as a fresh LoRA init would (seeded by run seed, round, client, module) and keeps the zero
column of B, so the product it starts from is unchanged and the rank can train again. With the ``constant``
alpha rule, clients of different ranks would multiply the same slice by different scales ``alpha/r_k`` (the method
shares factors, not products); ``alpha_rule=auto`` therefore resolves to ``proportional`` (one scale for every rank)
for this method, and ``--alpha-rule constant`` restores peft's per-rank scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import fresh_lora_factors, rankwise_average
from fedlora.adapters.state import AdapterState, LoraModuleSpec, subset
from fedlora.client.objectives import Objective
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    TrainStats,
    derive_seed,
    option,
    register_method,
    slice_to_rank,
)


@dataclass(frozen=True)
class HetLoRAOptions:
    lam: float = option(1e-2, "weight λ of the rank self-pruning regulariser λ·‖B[:, t:]‖·‖A[t:]‖", minimum=0.0)
    gamma: float = option(
        0.99, "pruning factor γ: the tail starts at t = max(min_rank, ⌊γ·r_k⌋)", minimum=0.0, maximum=1.0
    )
    prune: bool = option(True, "after training, cut the rank to t when the tail norm product shrank this round")
    min_rank: int = option(1, "a client's rank never goes below this", minimum=1)
    revive: bool = option(
        True, "re-draw A rows of ranks that arrive with zero A row and zero B column (product unchanged)"
    )


def tail_norm_product(a: torch.Tensor, b: torch.Tensor, start: int) -> torch.Tensor:
    """``‖B[:, start:]‖_F · ‖A[start:, :]‖_F`` (differentiable; zero gradient where a factor is zero)."""
    return torch.linalg.vector_norm(b[:, start:]) * torch.linalg.vector_norm(a[start:])


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖B @ A‖_F`` without forming ``B @ A``: ``‖BA‖_F² = tr((BᵀB)(AAᵀ)) = Σ (BᵀB) ⊙ (AAᵀ)``."""
    a64, b64 = a.double(), b.double()
    sq = ((b64.T @ b64) * (a64 @ a64.T)).sum()
    return float(sq.clamp_min(0.0).sqrt())


class SelfPruningTerm(Objective):
    """``λ·Σ_modules ‖B[:, t:]‖_F·‖A[t:, :]‖_F`` on the client's tensors at its rank (HetLoRA's regulariser)."""

    def __init__(self, lam: float, tails: Mapping[str, tuple[str, str, int]], start: Mapping[str, torch.Tensor]):
        self.lam = float(lam)
        self.tails = dict(tails)
        """module name -> (A key, B key, tail start t)."""
        self.fixed = {k: start[k].detach() for a, b, _ in self.tails.values() for k in (a, b)}
        """Start values, used for a factor that does not train (it still multiplies the other's norm)."""

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        total = None
        for a_key, b_key, t in self.tails.values():
            if a_key not in params and b_key not in params:
                continue  # neither factor trains in this stage: a constant
            a = params[a_key] if a_key in params else self.fixed[a_key]
            b = params[b_key] if b_key in params else self.fixed[b_key]
            term = tail_norm_product(a, b, t)
            total = term if total is None else total + term
        return None if total is None else self.lam * total


@register_method
class HetLoRA(FedMethod):
    id = "hetlora"
    family = "heterogeneous ranks (self-pruning, norm-weighted zero padding)"
    paper = "Cho et al., EMNLP 2024, arXiv:2401.06432"
    up = "A, B at the client's (possibly pruned) rank, heads"
    down = "top-left r_k slice of the global A, B, heads"
    bytes_up = "r_k(m+n) + heads (r_k after pruning)"
    bytes_down = "r_k(m+n) + heads"
    default_weighting = "num_examples"
    supports_mixed_ranks = True
    preferred_alpha_rule = "proportional"
    supports_robust_aggregation = False
    robust_refusal = (
        "it weights each client's zero-padded factors by the norm of its own product ||s_k B_k A_k|| and averages "
        "rank slots only some clients own; a coordinate-wise median or trimmed mean over the padding would erase "
        "every rank slot fewer than half of the clients own"
    )
    Options = HetLoRAOptions

    # ----------------------------------------------------------------- ranks
    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if self.ctx.client_ranks:
            ranks = {str(c): int(r) for c, r in enumerate(self.ctx.client_ranks)}
        else:
            global_ranks = sorted({spec.rank for spec in self.layout.modules})
            # modules of different global ranks and no configured client ranks: every module at its own rank
            # until a client prunes (then one rank for all of its modules)
            one = global_ranks[0] if len(global_ranks) == 1 else None
            ranks = {str(c): one for c in range(self.ctx.num_clients)} if one is not None else {}
        return dataclasses.replace(server, meta={**server.meta, "ranks": ranks})

    def client_rank(self, client_id: int, server: ServerState | None = None) -> int | None:
        """The client's current rank: what it pruned itself to (server meta), else the configured one."""
        if server is not None:
            kept = server.meta.get("ranks", {}).get(str(client_id))
            if kept is not None:
                return int(kept)
        return super().client_rank(client_id, server)

    def tail_start(self, plan: ClientPlan) -> int:
        """``t = max(min_rank, ⌊γ·r_k⌋)`` for the client's rank ``r_k`` (the smallest of its modules' ranks)."""
        r = min(plan.ranks[spec.name].rank for spec in self.layout.modules)
        return max(self.options.min_rank, math.floor(self.options.gamma * r + 1e-9))

    # ----------------------------------------------------------------- server side
    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        rank = self.client_rank(client_id, server)
        ranks = self.module_ranks(rank)
        keys = self.layout.all_keys
        download = {k: slice_to_rank(k, server.adapter[k], ranks).clone() for k in keys}
        return self.make_plan(
            rnd, client_id, server, download=download, upload_keys=keys, rank=rank, rank_may_shrink=self.options.prune
        )

    def norm_weights(self, spec: LoraModuleSpec, updates: Sequence[ClientUpdate]) -> list[float]:
        """``w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F`` (each client's own scale), capped at
        ``max_weight_ratio / K`` like the client weights; the client weighting when every product is zero."""
        norms = [abs(self.scale_of(u, spec)) * product_norm(u.state[spec.a_key], u.state[spec.b_key]) for u in updates]
        total = sum(norms)
        if not total > 0 or not math.isfinite(total):
            return self.weights(updates)
        return self.cap([n / total for n in norms])

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, self.weights(updates)))
        for spec in self.layout.modules:
            w = self.norm_weights(spec, updates)
            a, _ = rankwise_average([u.state[spec.a_key] for u in updates], w, dim=0, size=spec.rank, mode="zero")
            b, _ = rankwise_average([u.state[spec.b_key] for u in updates], w, dim=1, size=spec.rank, mode="zero")
            adapter[spec.a_key] = a.to(server.adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b.to(server.adapter[spec.b_key].dtype)
        ranks = dict(server.meta.get("ranks", {}))
        for u in updates:
            got = {int(u.state[spec.a_key].shape[0]) for spec in self.layout.modules}
            if len(got) == 1:
                ranks[str(u.client_id)] = got.pop()
        meta = {**server.meta, "ranks": ranks}
        metrics = {"mean_client_rank": sum(ranks.values()) / len(ranks)} if ranks else {}
        return AggregateResult(adapter=adapter, meta=meta, metrics=metrics)

    # ----------------------------------------------------------------- client side
    def _revived(self, plan: ClientPlan, state: AdapterState) -> AdapterState:
        """``state`` with every rank whose A row and B column are both zero given a freshly drawn A row."""
        if not self.options.revive:
            return state
        out = dict(state)
        for spec in self.layout.modules:
            a, b = state[spec.a_key], state[spec.b_key]
            dead = (a == 0).all(dim=1) & (b == 0).all(dim=0)
            if not bool(dead.any()):
                continue
            gen = torch.Generator().manual_seed(
                derive_seed(self.seed, "hetlora-revive", plan.round, plan.client_id, spec.name)
            )
            fresh, _ = fresh_lora_factors(
                spec.out_features, spec.in_features, a.shape[0], gen, self.ctx.init_lora_weights
            )
            a = a.clone()
            a[dead] = fresh[dead].to(a.dtype)
            out[spec.a_key] = a
        return out

    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        return self._revived(plan, super().start_state(plan, initial, personal))

    def _tails(self, plan: ClientPlan) -> dict[str, tuple[str, str, int]]:
        t = self.tail_start(plan)
        return {
            spec.name: (spec.a_key, spec.b_key, t) for spec in self.layout.modules if t < plan.ranks[spec.name].rank
        }

    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        tails = self._tails(plan)
        if self.options.lam == 0.0 or not tails:
            return None
        return SelfPruningTerm(self.options.lam, tails, start)

    def _tail_total(self, plan: ClientPlan, state: Mapping[str, torch.Tensor]) -> float:
        tails = self._tails(plan).values()
        return sum(
            float(tail_norm_product(state[a].detach().float(), state[b].detach().float(), t)) for a, b, t in tails
        )

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        upload = subset(trained, plan.upload_keys)
        if not self.options.prune or not self._tails(plan):
            return upload, None
        start = self._revived(plan, {k: plan.download[k] for k in self.layout.lora_keys})
        if not self._tail_total(plan, trained) < self._tail_total(plan, start):
            return upload, None
        t = self.tail_start(plan)
        for spec in self.layout.modules:
            upload[spec.a_key] = trained[spec.a_key][:t].clone()
            upload[spec.b_key] = trained[spec.b_key][:, :t].clone()
        return upload, None
