"""FedProx: FedIT clients with a proximal term towards the round's global adapter (METHODS.md §36.1).

Paper: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127.

Client k minimises ``F_k(θ) + (μ/2)·Σ_{X∈T} ‖X − X_g‖²`` where the sum runs over the tensors the plan trains (T: every
LoRA A and B, and the heads) and ``X_g`` is each one's value at round start, i.e. the global adapter just downloaded
(re-anchored every round). For LoRA this anchors the factors, not the product ``BA``. Tensors the plan does not train
never enter the penalty. The term is added to the loss (:class:`fedlora.client.objectives.ProximalTerm`), so under
``optimizer="sgd"`` the step is the official code's perturbed gradient step ``X ← X − η(∇F + μ(X − X_g))``, and under
the default AdamW the prox gradient is Adam-normalised as in OpenFedLLM. ``mu = 0`` gives no term at all (FedIT's
trajectory). The server is FedIT: ``θ = Σ p_k θ_k`` with ``p_k ∝ n_k`` (the official code's num_samples, OpenFedLLM's
n_k). With a robust ``aggregator`` the server takes the coordinate-wise median / trimmed mean of each tensor instead (as
FedIT). The official code's stragglers (a fraction of clients running fewer epochs) are not simulated.
Up: A, B, heads (``r(m+n)`` per module). Down: the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.adapters.state import AdapterState
from fedlora.client.objectives import Objective, ProximalTerm
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    option,
    register_method,
)


@dataclass(frozen=True)
class FedProxOptions:
    mu: float = option(0.01, "proximal coefficient μ (0: FedIT; OpenFedLLM's default 0.01)", minimum=0.0)


@register_method
class FedProx(FedMethod):
    id = "fedprox"
    family = "client regulariser (proximal term)"
    paper = "Li et al., MLSys 2020, arXiv:1812.06127"
    up = "A, B, heads"
    down = "A, B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"
    Options = FedProxOptions

    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        if self.options.mu == 0.0:
            return None
        return ProximalTerm(self.options.mu, {k: start[k] for k in sorted(plan.train_keys)})

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        return AggregateResult(adapter=self.average_keys(self.layout.all_keys, updates, w))
