"""FLoRIST: the SVD of the stacked client adapters, truncated where the singular values reach an energy threshold,
merged into the frozen weights (METHODS.md §39).

Paper: H. Ramesh, J. Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated Fine-Tuning of
Large Language Models", arXiv:2506.09199 (reference code ``Anonymous-user-00/FLoRIST@ec3e9bc``).

Every round each client trains a freshly drawn LoRA of its own rank (A drawn as ``init_lora_weights`` says, B = 0;
seeded by run seed, round and client) on the current merged base, and uploads ``A_k, B_k`` and heads. Per module
the server takes the thin SVD of ``Σ_k p_k s_k B_k A_k = U Σ Vᵀ`` (``p_k = n_k/Σ n_j`` over the round's clients)
from the stacked factors without forming the m×n matrix (:func:`fedlora.adapters.algebra.factored_svd`: QR of the
stacked B and Aᵀ, then the SVD of a small core; the paper's SVDs of each stack followed by an SVD of their product
is the same decomposition), keeps the smallest ``k*`` with ``Σ_{j≤k*} σ_j² ≥ τ·Σ_j σ_j²`` (``threshold`` τ,
chosen per module; all of them when rounding leaves the ratio just below τ = 1; none when every product is zero),
and merges ``B_g A_g`` into the frozen weight, with ``B_g = U[:, :k*]·diag(σ_1..σ_k*)`` (m×k*) and ``A_g = Vᵀ[:k*]``
(k*×n, orthonormal rows): ``W0 ← W0 + B_g A_g``. Each client's own scale ``s_k`` is folded into its term, so clients
of different ranks and scales merge exactly (the reference code merges with the last client's scale, right only
because all its clients have ``alpha_k/r_k = 2``, and tells A from B by shape, which misfires when m or n equals a
client's rank; §39). The truncation error is ``‖Σ p_k s_k B_k A_k − B_g A_g‖_F² = Σ_{j>k*} σ_j²``; τ = 1 merges the
exact sum (FLoRA). ``florist_rank`` in ``metrics.jsonl`` is the mean ``k*`` over modules. The global adapter keeps
B = 0 (the merged base holds the model); heads are averaged with the same weights. Mixed client ranks are supported.
Robust aggregators are refused (an SVD of a weighted sum of products), and so, with them, server-side DP noise and
secure aggregation. The README's experiments are one-round; more rounds repeat this re-initialise-and-merge step.
Up: A, B, heads (``r_k(m+n)``). Down: heads and the truncated factors ``B_g, A_g`` (``k*(m+n)`` per module, merged
into W0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import factored_svd
from fedlora.methods.base import (
    AggregateResult,
    ClientUpdate,
    ServerState,
    option,
    register_method,
)
from fedlora.methods.flora import FLoRA


@dataclass(frozen=True)
class FLoRISTOptions:
    threshold: float = option(
        0.9,
        "energy threshold tau in (0, 1]: keep the fewest singular values whose squares reach tau of the total "
        "(the reference code's default 0.9; its experiments use 0.80-0.99; 1 merges the exact sum)",
        minimum=0.0,
        maximum=1.0,
    )

    def __post_init__(self) -> None:
        if not self.threshold > 0.0:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1]")


def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` with ``Σ_{j≤k} σ_j² / Σ_j σ_j² ≥ threshold`` (σ in descending order); all of them when
    rounding keeps the ratio below the threshold; 0 when every σ is zero."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    if not total > 0.0:
        return 0
    ratio = torch.cumsum(energy, 0) / total
    reached = torch.nonzero(ratio >= threshold).flatten()
    return int(reached[0]) + 1 if reached.numel() else int(singular_values.shape[0])


@register_method
class FLoRIST(FLoRA):
    """FLoRA's round (fresh factors per client, merge into W0) with a thresholded SVD of the sum instead of the
    stacked factors."""

    id = "florist"
    family = "aggregation (stacking + SVD energy thresholding, merge, re-init)"
    paper = "Ramesh & Dass, arXiv:2506.09199"
    up = "A, B, heads"
    down = "heads + truncated SVD factors B_g, A_g of the weighted sum of products (merged into W0)"
    bytes_up = "r_k(m+n) + heads"
    bytes_down = "k*(m+n) + heads (k* <= min(m, n, sum_k r_k), set per module by the energy threshold)"
    reinit_label = "florist-reinit"
    robust_refusal = (
        "it merges a truncated SVD of the weighted sum of the clients' products (sum_k p_k s_k B_k A_k) into W0; "
        "that sum is not an average of the uploaded factors"
    )
    Options = FLoRISTOptions

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        merged = {}
        kept = []
        for spec in self.layout.modules:
            svd = factored_svd(self.product_terms(spec, updates, w))
            k = energy_rank(svd.s, self.options.threshold)
            kept.append(k)
            adapter[spec.b_key] = torch.zeros_like(server.adapter[spec.b_key])
            if k:
                merged[spec.name] = ((svd.u[:, :k] * svd.s[:k]).contiguous(), svd.vh[:k].contiguous())
        metrics = {"florist_rank": sum(kept) / len(kept)} if kept else {}
        return AggregateResult(adapter=adapter, base_delta=merged or None, metrics=metrics)
