"""FedSVD: clients train B with A frozen; the server re-factorises ``B·A`` by an SVD so that A has orthonormal rows
(METHODS.md §38).

Paper: S. Lee, S. Park, D. B. Lee, D. Wagner, H. Seong, T. Bocklet, J. Lee, S. J. Hwang, "FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025, arXiv:2505.12805 (reference code
``seanie12/fed-svd@36650e2``).

Client: FFA-style, A frozen (identical on every client within a round), B trained. Server:
``B ← Σ_k p_k B_k`` (``p_k = n_k/Σ n_j`` over the round's clients, the reference's default), exact for the shared A:
``s·(Σ p_k B_k)·A == Σ p_k s·B_k·A``. Then, in the rounds the schedule says, per module the product ``B·A`` is
re-factorised: with its thin SVD ``B A = U Σ Vᵀ`` (rank ≤ r; computed from the factors, never m×n:
:func:`fedlora.adapters.algebra.factored_svd`) the new factors are ``A = Vᵀ[:r]`` (orthonormal rows) and
``B = U[:, :r]·diag(σ)`` (all singular values in B). The product, hence the global model, is unchanged (the scale
``s`` multiplies both sides, so it plays no part). Each re-factorised pair ``(B[:, i], A[i])`` has its sign chosen
so that ``A[i]`` points the way the previous ``A[i]`` did (an SVD fixes singular vectors only up to sign; the flip
changes neither the product nor training); when ``B·A`` has rank below r the missing rows of A are completed with
orthonormal directions (seeded) and B's columns there are zero. With a robust ``aggregator`` B is the coordinate-wise
statistic of the ``B_k`` and the re-factorisation is applied to it: the re-factorisation is post-processing of the
aggregate (it uses only the aggregated B and the previous A), which is also why user-level DP with server noise and
secure aggregation apply (the paper's argument: A is recomputed from privatised aggregates at no privacy cost).

Choices the spec leaves to the reference code, as options: ``svd_period`` (re-factorise every that many rounds; 0
never, which is FFA-LoRA), ``svd_warmup`` (rounds before the first re-factorisation; both defaults are the reference
scripts': every round from the first). ``orthonormal_start`` re-factorises the initial adapter before round 0 (with
B = 0 this orthonormalises A's rows, same row space, zero product), so A is orthonormal from the first round, which
is what bounds B's gradient norm under DP (the reference trains round 0 on peft's random A: ``false``).
``train_heads``: the reference code freezes the classification head at its random initialisation; by default the
heads train and are averaged like B, as in every other method here (``false`` reproduces the reference).
Up: B (``m·r`` per module) and heads. Down: A and B (``r(m+n)``) and heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import LowRankTerm, factored_svd
from fedlora.adapters.state import AdapterState, subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    derive_seed,
    option,
    register_method,
)


@dataclass(frozen=True)
class FedSVDOptions:
    svd_period: int = option(
        1, "re-factorise B*A every this many rounds (the reference scripts: 1; 0: never, i.e. FFA-LoRA)", minimum=0
    )
    svd_warmup: int = option(0, "rounds before the first re-factorisation (the reference: 0)", minimum=0)
    orthonormal_start: bool = option(
        True,
        "re-factorise the initial adapter before round 0 (A's rows orthonormalised, product unchanged); false: round "
        "0 trains on the initial random A, as the reference code",
    )
    train_heads: bool = option(
        True, "train and average the task heads; false keeps them at their initial values (the reference code)"
    )


def refactorise(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' A' == B A``, ``A'`` orthonormal rows and ``B' = U·diag(σ)`` (float32); each pair's sign
    makes ``A'[i]·A[i] >= 0``."""
    rank = a.shape[0]
    svd = factored_svd([LowRankTerm(b=b.float(), a=a.float())])
    a_new, b_new = svd.to_lora(rank, 1.0, generator)
    flip = (a_new * a.float()).sum(dim=1) < 0
    a_new[flip] = -a_new[flip]
    b_new[:, flip] = -b_new[:, flip]
    return a_new, b_new


@register_method
class FedSVD(FedMethod):
    id = "fedsvd"
    family = "aggregation (single factor, SVD re-factorisation of B*A)"
    paper = "Lee et al., NeurIPS 2025, arXiv:2505.12805"
    up = "B, heads"
    down = "A (orthonormal rows after re-factorisation), B, heads"
    bytes_up = "m*r + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"
    Options = FedSVDOptions

    def shared_keys(self) -> tuple[str, ...]:
        """What clients train and upload: every B, and the heads when they train."""
        return self.layout.b_keys + (self.layout.other_keys if self.options.train_heads else ())

    def refactorises(self, rnd: int) -> bool:
        """Whether the aggregate of round ``rnd`` (0-based) is re-factorised."""
        period, warmup = self.options.svd_period, self.options.svd_warmup
        return period > 0 and rnd >= warmup and (rnd - warmup) % period == 0

    def _refactorised(self, adapter: AdapterState, previous: AdapterState, tag: str) -> AdapterState:
        out = dict(adapter)
        for spec in self.layout.modules:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "fedsvd-complete", tag, spec.name))
            a_new, b_new = refactorise(previous[spec.a_key], adapter[spec.b_key], gen)
            out[spec.a_key] = a_new.to(previous[spec.a_key].dtype)
            out[spec.b_key] = b_new.to(adapter[spec.b_key].dtype)
        return out

    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if not self.options.orthonormal_start:
            return server
        return dataclasses.replace(server, adapter=self._refactorised(server.adapter, server.adapter, "init"))

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.shared_keys()
        download = subset(server.adapter, self.layout.all_keys)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)  # A stays the one every client held this round
        adapter.update(self.average_keys(self.shared_keys(), updates, w))
        if self.refactorises(rnd):
            adapter = self._refactorised(adapter, server.adapter, str(rnd))
        return AggregateResult(adapter=adapter)
