"""FFA-LoRA: A frozen at its common random initialisation, only B is trained and averaged (METHODS.md §2).

Paper: Y. Sun, Z. Li, Y. Li, B. Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv:2403.12313.

Every client holds the same A (the common initial adapter, drawn from the run seed), so
``s·(Σ p_k B_k)·A == Σ p_k s·B_k·A``: the ideal aggregate with no SVD. Weighting defaults to the samples
processed this round, as in the FederatedScope reference (≈ uniform with equal local steps).
With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) B is the coordinate-wise statistic of the
``B_k`` (unweighted); the model ``s·B̄·A`` is still that B with the common A, but no longer the same statistic of
the clients' products ``s·B_k·A`` (a coordinate-wise median does not commute with ``·A``).
Up: B and heads (``m·r`` per module). Down: B and heads.
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
class FFALoRA(FedMethod):
    id = "ffa_lora"
    family = "aggregation (single factor)"
    paper = "Sun et al., ICLR 2024, arXiv:2403.12313"
    up = "B, heads"
    down = "B, heads"
    bytes_up = "m*r + heads"
    bytes_down = "m*r + heads"
    default_weighting = "samples_seen"

    def _shared_keys(self) -> tuple[str, ...]:
        return self.layout.b_keys + self.layout.other_keys

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self._shared_keys()
        return self.make_plan(rnd, client_id, server, download=subset(server.adapter, keys), upload_keys=keys)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)  # A stays the common initial A
        adapter.update(self.average_keys(self._shared_keys(), updates, w))
        return AggregateResult(adapter=adapter)
