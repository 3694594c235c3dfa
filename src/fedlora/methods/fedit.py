"""FedIT / FedAvg-LoRA: separate weighted averaging of A and B (METHODS.md §1).

Paper: J. Zhang et al., "Towards Building the FederatedGPT: Federated Instruction Tuning", ICASSP 2024,
arXiv:2305.05644.

Clients continue from the global adapter and train A and B; the server sets ``A = Σ p_k A_k`` and
``B = Σ p_k B_k`` (``p_k ∝ n_k`` in the reference code). The implied model ``W0 + s·B A`` differs from the ideal
``W0 + s·Σ p_k B_k A_k`` (aggregation discordance); that is the method, not a bug.
With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) A and B are each the coordinate-wise statistic
of the clients' factors, unweighted: ``B̄Ā`` is then a product of two medians, the median of no client's product.
Up: A, B (``r(m+n)`` per module) and heads. Down: the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.methods.base import AggregateResult, ClientUpdate, FedMethod, ServerState, register_method


@register_method
class FedIT(FedMethod):
    id = "fedit"
    aliases = ("fedavg_lora",)
    family = "aggregation (naive)"
    paper = "Zhang et al., ICASSP 2024, arXiv:2305.05644"
    up = "A, B, heads"
    down = "A, B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        return AggregateResult(adapter=self.average_keys(self.layout.all_keys, updates, w))
