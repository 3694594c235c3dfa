"""FedSA-LoRA: A is shared and averaged, B stays with each client (METHODS.md §19).

Paper: P. Guo, S. Zeng, Y. Wang, H. Fan, F. Wang, L. Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025, arXiv:2410.01463.

Each client trains A and B; only A travels. Client k keeps its own ``B_k`` (and, as in the paper's GLUE
configuration, its own classification head when ``local_head=True``) across rounds. Personal tensors are held
per client by the engine and never pass through the server (the reference code's ``share_local_model: True``
silently chains one B through all clients; METHODS.md §19). There is no global model: evaluation is
personalised, on each client's own test split. With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``)
the shared A (and heads) is the coordinate-wise statistic of the clients' (unweighted).
Up: A (``r·n`` per module) [and heads when ``local_head=False``]. Down: A [and heads].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.adapters.state import AdapterState, subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    TrainStats,
    option,
    register_method,
)


@dataclass(frozen=True)
class FedSAOptions:
    local_head: bool = option(True, "keep the task head with each client (the paper's GLUE setting); false shares it")


@register_method
class FedSALoRA(FedMethod):
    id = "fedsa_lora"
    family = "personalised (shared A, local B)"
    paper = "Guo et al., ICLR 2025, arXiv:2410.01463"
    up = "A (heads too if local_head=false)"
    down = "A (heads too if local_head=false)"
    bytes_up = "r*n (+ heads if local_head=false)"
    bytes_down = "r*n (+ heads if local_head=false)"
    default_weighting = "samples_seen"
    has_personal_state = True
    has_global_model = False
    Options = FedSAOptions

    def shared_keys(self) -> tuple[str, ...]:
        return self.layout.a_keys + (() if self.options.local_head else self.layout.other_keys)

    def personal_keys(self) -> tuple[str, ...]:
        return self.layout.b_keys + (self.layout.other_keys if self.options.local_head else ())

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        shared = self.shared_keys()
        return self.make_plan(
            rnd,
            client_id,
            server,
            download=subset(server.adapter, shared),
            upload_keys=shared,
            train_keys=self.layout.all_keys,
        )

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        return subset(trained, plan.upload_keys), subset(trained, self.personal_keys())

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.shared_keys(), updates, w))
        return AggregateResult(adapter=adapter)
