"""FedEx-LoRA: average A and B, and write the exact residual into the frozen weights (METHODS.md §8).

Paper: R. Singhal, K. Ponkshe, P. Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, arXiv:2410.09432.

Per module: ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k`` and ``W0 ← W0 + (Σ p_k s_k B_k A_k − s·B̄Ā)``, hence
``W0_new + s·B̄Ā == W0_old + Σ p_k s_k B_k A_k`` exactly (each client's own scale ``s_k`` from its reply). The
residual is returned in nn.Linear layout; it is transposed only when written into a Conv1D weight (the reference
code transposes for nn.Linear too; §8 bug). Weights default to uniform ``1/K`` as in the reference code.
Robust aggregators are refused: the exactness is the point of the method, and it is a statement about the weighted
mean of products, which a coordinate-wise median of A and B breaks; ``max_weight_ratio`` caps ``p_k``.
Up: A, B, heads. Down: Ā, B̄, heads and the dense residual (``m·n`` per module, generally full rank).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.adapters.algebra import dense_sum
from fedlora.adapters.state import factors
from fedlora.methods.base import AggregateResult, ClientUpdate, FedMethod, ServerState, register_method


@register_method
class FedExLoRA(FedMethod):
    id = "fedex_lora"
    family = "aggregation (exact, residual into W0)"
    paper = "Singhal et al., ACL 2025, arXiv:2410.09432"
    up = "A, B, heads"
    down = "A, B, heads + dense residual m*n per module"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + m*n + heads"
    default_weighting = "uniform"
    changes_base = True
    supports_robust_aggregation = False
    robust_refusal = (
        "its residual makes W0 + s*mean(B)@mean(A) exactly the weighted average of the clients' products; a median or "
        "trimmed mean of A and B has no such exact counterpart, and the residual would still carry every client's "
        "product in full"
    )

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = self.average_keys(self.layout.all_keys, updates, w)
        residual = {}
        for spec in self.layout.modules:
            ideal = dense_sum(self.product_terms(spec, updates, w))
            a_bar, b_bar = factors(adapter, spec)
            residual[spec.name] = ideal - spec.scaling() * (b_bar.float() @ a_bar.float())
        return AggregateResult(adapter=adapter, base_delta=residual)
