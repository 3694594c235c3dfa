"""FLoRA: stack the clients' factors, merge the exact sum into W0, re-initialise LoRA (METHODS.md §7).

Paper: Z. Wang, Z. Shen, Y. He, G. Sun, H. Wang, L. Lyu, A. Li, "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976.

Per module the server stacks ``B_stack = [p_1 s_1 B_1, …, p_K s_K B_K]`` and ``A_stack = [A_1; …; A_K]`` (the
reference code puts ``p_k`` on A instead; the product is the same, and folding each client's own scale ``s_k`` in
keeps mixed ranks and scales exact, which the reference code's single ``alpha/r`` does not; §7) with
``B_stack @ A_stack = Σ p_k s_k B_k A_k``, and merges it: ``W0 ← W0 + Σ p_k s_k B_k A_k``. The stacked factors
are what travels down (``Σ_k r_k (m+n)`` per module). Every round each client starts from a freshly drawn LoRA
of its own rank (A drawn as ``init_lora_weights`` says, B = 0; seeded by run seed, round and client) on the merged
base: a Re-Initial scheme. Heads are averaged. The global adapter keeps B = 0. Mixed client ranks are supported.
Robust aggregators are refused (a sum of products is not an average of what travels); ``max_weight_ratio`` caps
``p_k``. Up: A, B, heads (``r_k(m+n)``). Down: heads + the stacked factors.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.adapters.algebra import stack_terms
from fedlora.adapters.state import subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    derive_seed,
    register_method,
)


@register_method
class FLoRA(FedMethod):
    id = "flora"
    family = "aggregation (exact, stacking + merge, re-init)"
    paper = "Wang et al., NeurIPS 2024, arXiv:2409.05976"
    up = "A, B, heads"
    down = "heads + stacked A, B of all clients (merged into W0)"
    bytes_up = "r_k(m+n) + heads"
    bytes_down = "sum_k r_k (m+n) + heads"
    default_weighting = "num_examples"
    reinit_label = "flora-reinit"
    """Names the seed stream of the fresh factors each client starts a round from."""
    changes_base = True
    supports_mixed_ranks = True
    supports_robust_aggregation = False
    robust_refusal = (
        "it merges the exact weighted sum of the clients' products (sum_k p_k s_k B_k A_k) into W0 by stacking their "
        "factors; stacked factors have no coordinate-wise median or trimmed mean"
    )

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        return self.make_plan(
            rnd,
            client_id,
            server,
            download=subset(server.adapter, self.layout.other_keys),
            upload_keys=self.layout.all_keys,
            reinit_seed=derive_seed(self.seed, self.reinit_label, rnd, client_id),
        )

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        merged = {}
        for spec in self.layout.modules:
            merged[spec.name] = stack_terms(self.product_terms(spec, updates, w))
            adapter[spec.b_key] = server.adapter[spec.b_key].new_zeros(server.adapter[spec.b_key].shape)
        return AggregateResult(adapter=adapter, base_delta=merged)
