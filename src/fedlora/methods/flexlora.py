"""FlexLoRA: aggregate the products, redistribute their truncated SVD at each client's rank (METHODS.md §6).

Paper: J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv:2402.11505.

Per module ``ΔW = Σ p_k s_k B_k A_k`` with each client's own scale ``s_k`` (the reference code hard-codes
alpha = 16; §6), decomposed by the factored SVD (never forming m×n). The global adapter has the global rank R:
``A = Vᵀ[:R]`` (orthonormal rows) and ``B = U[:, :R]·diag(S[:R]) / s_R``. Client k receives the truncation at its
own rank: ``A[:r_k]`` and ``B[:, :r_k]·s_R/s_k``, so ``s_k·B_k@A_k`` is the best rank-r_k approximation of ΔW
(the reference code computes these truncations but never trains other ranks; §6). W0 never changes. Heads are
averaged. Mixed client ranks are supported. When fewer singular directions exist than the rank asks for, the rest
of A is completed with orthonormal random rows and B with zeros (:meth:`fedlora.adapters.SVDFactors.to_lora`).
Robust aggregators are refused (the SVD is of a weighted sum of products); ``max_weight_ratio`` caps ``p_k``.
Up: A, B, heads (``r_k(m+n)``). Down: the rank-matched truncated factors and heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters.algebra import factored_svd
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
class FlexLoRA(FedMethod):
    id = "flexlora"
    family = "aggregation (product + truncated SVD)"
    paper = "Bai et al., NeurIPS 2024, arXiv:2402.11505"
    up = "A, B, heads"
    down = "truncated-SVD A, B of the aggregated product at the client's rank, heads"
    bytes_up = "r_k(m+n) + heads"
    bytes_down = "r_k(m+n) + heads"
    default_weighting = "num_examples"
    supports_mixed_ranks = True
    supports_robust_aggregation = False
    robust_refusal = (
        "it re-factorises the weighted sum of the clients' products (sum_k p_k s_k B_k A_k) by a truncated SVD; that "
        "sum is not an average of the uploaded factors"
    )

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        rank = self.client_rank(client_id, server)
        download = subset(server.adapter, self.layout.other_keys)
        for spec in self.layout.modules:
            r = spec.rank if rank is None else rank
            a, b = server.adapter[spec.a_key], server.adapter[spec.b_key]
            download[spec.a_key] = a[:r].clone()
            factor = spec.scaling() / spec.scaling(r)
            download[spec.b_key] = (b[:, :r].float() * factor).to(b.dtype)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=self.layout.all_keys, rank=rank)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        for spec in self.layout.modules:
            svd = factored_svd(self.product_terms(spec, updates, w))
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "flexlora-complete", rnd, spec.name))
            a_new, b_new = svd.to_lora(spec.rank, spec.scaling(), gen)
            adapter[spec.a_key] = a_new.to(server.adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b_new.to(server.adapter[spec.b_key].dtype)
        return AggregateResult(adapter=adapter)
