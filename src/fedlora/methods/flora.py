"""FLoRA: stack the clients' factors, merge the exact sum into W0, re-initialise LoRA (METHODS.md §7).

Paper: Z. Wang, Z. Shen, Y. He, G. Sun, H. Wang, L. Lyu, A. Li, "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976.

Per module the server stacks ``B_stack = [p_1 s_1 B_1, …, p_K s_K B_K]`` and ``A_stack = [A_1; …; A_K]`` (the
reference code puts ``p_k`` on A instead; the product is the same, and folding each client's own scale in keeps
mixed ranks or scales exact) with
``B_stack @ A_stack = Σ p_k s_k B_k A_k``, and merges it: ``W0 ← W0 + Σ p_k s_k B_k A_k``. Every round each
client starts from a freshly drawn LoRA (A random, B = 0; the draw is seeded by run seed, round and client) on
the merged base: a Re-Initial scheme. Heads are averaged. The global adapter keeps B = 0.
Up: A, B, heads (``r_k(m+n)``). Down: heads + the stacked factors (``Σ_k r_k (m+n)`` per module).
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
    default_weighting = "num_examples"
    changes_base = True

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.layout.all_keys
        return ClientPlan(
            rnd,
            client_id,
            subset(server.adapter, self.layout.other_keys),
            frozenset(keys),
            keys,
            reinit_seed=derive_seed(self.seed, "flora-reinit", rnd, client_id),
        )

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        merged = {}
        wire = 0
        for spec in self.layout.modules:
            b_stack, a_stack = stack_terms(self.product_terms(spec, updates, w))
            merged[spec.name] = b_stack @ a_stack
            wire += (b_stack.numel() + a_stack.numel()) * 4
            adapter[spec.b_key] = server.adapter[spec.b_key].new_zeros(server.adapter[spec.b_key].shape)
        return AggregateResult(adapter=adapter, base_delta=merged, base_delta_wire_bytes=wire)
