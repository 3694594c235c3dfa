"""Zero- and replication-padding aggregation for heterogeneous client ranks (METHODS.md §16).

Papers: S. Chen, O. Tavallaie, N. Nazemi, A. Y. Zomaya, "RBLA: Rank-Based-LoRA-Aggregation for Fine-tuning
Heterogeneous Models in FLaaS", ICWS 2024, arXiv:2408.08699 (replication: ``pad_replicate``, alias ``rbla``);
Y. Byun, J. Lee, "Towards Federated Low-Rank Adaptation of Language Models with Rank Heterogeneity", NAACL 2025,
arXiv:2406.17477 (zero vs replication padding). Zero padding is the HetLoRA/FLoRA baseline.

Down: client k of rank ``r_k`` receives the top-left slice ``A[:r_k]``, ``B[:, :r_k]`` of the global adapter
(nothing rescaled) and the heads, and continues training from them.
Up: ``A_k, B_k`` at rank ``r_k`` (``r_k(m+n)`` per module) and the heads.

Server, per module, with client weights ``w_k`` under the method's weighting (uniform by default: RBLA's
default of 1.0 per client; ``--weighting`` changes it), A and B separately (rank axis: rows of A, columns of B):

* ``pad_zero``: ``X = Σ_k w_k pad0(X_k) / Σ_k w_k``: rank index i is diluted by ``Σ_{k: r_k > i} w_k / Σ_k w_k``.
  A rank index no client of the round owns comes out zero (in A and B, so it has zero gradient from then on:
  the dilution taken to its end, left as the method is).
* ``pad_replicate`` (RBLA's NaN padding): each rank index is averaged over the clients that own it,
  ``X[i] = Σ_{k: r_k > i} w_k X_k[i] / Σ_{k: r_k > i} w_k`` (the missing entries are "replicated" with the owners'
  weighted mean; Byun & Lee's exact replication source is unverified, §16). A rank index no client of the round
  owns keeps its previous global value (our choice; RBLA's code would leave NaN there).

For rank indices below every client's rank both rules agree. Robust aggregators (``median``, ``trimmed_mean``) are
refused: over the padding they would erase the rank slots most clients lack; ``max_weight_ratio`` caps ``w_k``.
Heads: plain weighted average with the same weights.
Each client's scale is its own (``alpha_rule``); the factors are averaged as they are, so under the ``constant``
rule clients of different ranks would read the same slice at different scales (the methods share factors, not
products). ``alpha_rule=auto`` therefore resolves to ``proportional`` for these methods (one scale for every rank;
tiny end-to-end setting, ranks 2,4,8, two seeds: final accuracy 0.29-0.40 with proportional, 0.26-0.34 with
constant); ``--alpha-rule constant`` restores peft's per-rank scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedlora.adapters.algebra import rankwise_average
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    register_method,
    slice_to_rank,
)


class RankPadding(FedMethod):
    """Rank-sliced download, rank-wise padded averaging of A and B (``mode``: ``zero`` or ``replicate``)."""

    mode: ClassVar[str]
    up = "A, B at the client's rank, heads"
    down = "top-left r_k slice of the global A, B, heads"
    bytes_up = "r_k(m+n) + heads"
    bytes_down = "r_k(m+n) + heads"
    default_weighting = "uniform"
    supports_mixed_ranks = True
    preferred_alpha_rule = "proportional"
    supports_robust_aggregation = False
    robust_refusal = (
        "it averages factors of different ranks rank slot by rank slot (zero-padded, or over each slot's owners); a "
        "coordinate-wise median or trimmed mean over the padding would erase every rank slot fewer than half of the "
        "clients own"
    )

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        rank = self.client_rank(client_id, server)
        ranks = self.module_ranks(rank)
        keys = self.layout.all_keys
        download = {k: slice_to_rank(k, server.adapter[k], ranks).clone() for k in keys}
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys, rank=rank)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        for spec in self.layout.modules:
            for key, dim in ((spec.a_key, 0), (spec.b_key, 1)):
                old = server.adapter[key]
                avg, owners = rankwise_average(
                    [u.state[key] for u in updates], w, dim=dim, size=spec.rank, mode=self.mode
                )
                if self.mode == "replicate":
                    unowned = owners == 0
                    if bool(unowned.any()):
                        if dim == 0:
                            avg[unowned] = old[unowned].float()
                        else:
                            avg[:, unowned] = old[:, unowned].float()
                adapter[key] = avg.to(old.dtype)
        return AggregateResult(adapter=adapter)


@register_method
class PadZero(RankPadding):
    id = "pad_zero"
    family = "heterogeneous ranks (zero padding)"
    paper = "Byun & Lee, NAACL 2025, arXiv:2406.17477 (zero-padding baseline of HetLoRA/FLoRA)"
    mode = "zero"


@register_method
class PadReplicate(RankPadding):
    id = "pad_replicate"
    aliases = ("rbla",)
    family = "heterogeneous ranks (replication padding, RBLA)"
    paper = "Chen et al., ICWS 2024, arXiv:2408.08699; Byun & Lee, NAACL 2025, arXiv:2406.17477"
    mode = "replicate"
