"""FlexLoRA: aggregate the products, redistribute their truncated SVD (METHODS.md §6).

Paper: J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv:2402.11505.

Per module ``ΔW = Σ p_k s_k B_k A_k`` with each client's own scale ``s_k = alpha/r_k`` (the reference code
hard-codes alpha = 16; §6), decomposed by the factored SVD (never forming m×n). The global adapter of rank r is
``A = Vᵀ[:r]`` (orthonormal rows) and ``B = U[:, :r]·diag(S[:r]) / s_r``, so ``s_r·B@A`` is the best rank-r
approximation of ΔW; W0 never changes. Heads are averaged.
Up: A, B, heads (``r_k(m+n)``). Down: the rank-matched truncated factors and heads.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.adapters.algebra import factored_svd
from fedlora.methods.base import AggregateResult, ClientUpdate, FedMethod, ServerState, register_method


@register_method
class FlexLoRA(FedMethod):
    id = "flexlora"
    family = "aggregation (product + truncated SVD)"
    paper = "Bai et al., NeurIPS 2024, arXiv:2402.11505"
    up = "A, B, heads"
    down = "truncated-SVD A, B of the aggregated product, heads"
    default_weighting = "num_examples"

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        for spec in self.layout.modules:
            svd = factored_svd(self.product_terms(spec, updates, w))
            a_new, b_new = svd.to_lora(spec.rank, spec.scaling(spec.rank))
            adapter[spec.a_key] = a_new.to(server.adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b_new.to(server.adapter[spec.b_key].dtype)
        return AggregateResult(adapter=adapter)
