"""RoLoRA: alternate the trained factor by round, B first (METHODS.md §4).

Paper: S. Chen, Y. Ju, H. Dalal, Z. Zhu, A. Khisti, "Robust Federated Finetuning of Foundation Models via
Alternating Minimization of LoRA", arXiv:2409.02346 (NeurIPS 2025 version: arXiv:2502.01755).

Round ``t`` even: A frozen, B trained; ``t`` odd: B frozen, A trained (B must go first: with B = 0 the gradient of
A is zero). The server averages only the trained factor; the frozen one is identical on every client, so
``Σ p_k B_k A == (Σ p_k B_k) A`` exactly. Heads are trained and averaged every round. With a robust ``aggregator``
(``median``, ``trimmed_mean:<beta>``) the trained factor is the coordinate-wise statistic of the clients' (unweighted)
and this identity no longer holds: the median of ``B_k`` times ``A`` is not the median of the products ``B_k A``.
Up: the trained factor (``m·r`` or ``r·n``) and heads. Down: A, B and heads (a client that skipped rounds needs
both factors; with full participation only the factor updated last round would have to travel).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.adapters.state import subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    register_method,
)


@register_method
class RoLoRA(FedMethod):
    id = "rolora"
    family = "aggregation (alternating factor)"
    paper = "Chen et al., arXiv:2409.02346"
    up = "B (even rounds) or A (odd rounds), heads"
    down = "A, B, heads"
    bytes_up = "m*r (even rounds) or r*n (odd rounds) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"

    def trained_keys(self, rnd: int) -> tuple[str, ...]:
        factor = self.layout.b_keys if rnd % 2 == 0 else self.layout.a_keys
        return factor + self.layout.other_keys

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.trained_keys(rnd)
        download = subset(server.adapter, self.layout.all_keys)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.trained_keys(rnd), updates, w))
        return AggregateResult(adapter=adapter)
