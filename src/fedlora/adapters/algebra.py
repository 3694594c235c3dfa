"""LoRA algebra, in one place: sums of low-rank products, their (factored) SVD, truncation, fresh factors.

Every server-side operation that forms ``B@A`` goes through here with each client's own scale ``s_k``
(METHODS.md §34: never hard-code ``alpha``). Matrices are in nn.Linear layout ``(out, in)``; the layout of a
Conv1D base weight is handled only where an update is written into the base (:mod:`fedlora.adapters.peft_io`).

The factored SVD of ``M = Σ_k c_k B_k A_k`` (``B_k`` m×r_k, ``A_k`` r_k×n) never forms the m×n matrix:
stack ``B = [c_1 B_1 … c_K B_K]`` (m×R) and ``A = [A_1; …; A_K]`` (R×n), take reduced QRs ``B = Q_b R_b`` and
``Aᵀ = Q_a R_a``, so ``M = Q_b (R_b R_aᵀ) Q_aᵀ``; an SVD of the small core ``R_b R_aᵀ = U_c S V_cᵀ`` gives
``M = (Q_b U_c) S (Q_a V_c)ᵀ``. Cost ``O((m+n)R²)`` time and ``O((m+n)R)`` memory instead of ``O(mn·min(m,n))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankTerm:
    """One term ``coeff · B @ A`` of a sum of low-rank products (coeff includes weight and LoRA scale)."""

    b: torch.Tensor  # (m, r)
    a: torch.Tensor  # (r, n)
    coeff: float = 1.0


@dataclass(frozen=True)
class SVDFactors:
    """A thin SVD ``U diag(S) Vh`` (U m×k, S k, Vh k×n), singular values in descending order."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def dense(self, rank: int | None = None) -> torch.Tensor:
        k = self.s.shape[0] if rank is None else rank
        return (self.u[:, :k] * self.s[:k]) @ self.vh[:k]

    def to_lora(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``scaling·B@A`` = best rank-``rank`` approximation; A has orthonormal rows.

        Singular values and ``1/scaling`` go into B (the FlexLoRA/SLoRA convention, METHODS.md §6, §34).
        Ranks beyond the available singular values are filled with zero rows/columns.
        """
        k = min(rank, self.s.shape[0])
        m, n = self.u.shape[0], self.vh.shape[1]
        a = self.vh.new_zeros(rank, n)
        b = self.u.new_zeros(m, rank)
        a[:k] = self.vh[:k]
        b[:, :k] = self.u[:, :k] * (self.s[:k] / scaling)
        return a, b


def stack_terms(terms: Sequence[LowRankTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_stack, A_stack)`` with ``B_stack @ A_stack == Σ coeff_k B_k A_k`` exactly (coeff folded into B)."""
    if not terms:
        raise ValueError("no low-rank terms to stack")
    b = torch.cat([t.b.float() * t.coeff for t in terms], dim=1)
    a = torch.cat([t.a.float() for t in terms], dim=0)
    return b, a


def dense_sum(terms: Sequence[LowRankTerm]) -> torch.Tensor:
    """``Σ coeff_k B_k A_k`` as a dense float32 matrix."""
    b, a = stack_terms(terms)
    return b @ a


def factored_svd(terms: Sequence[LowRankTerm]) -> SVDFactors:
    """Thin SVD of ``Σ coeff_k B_k A_k`` without forming the dense matrix (see module docstring)."""
    b, a = stack_terms(terms)
    q_b, r_b = torch.linalg.qr(b, mode="reduced")
    q_a, r_a = torch.linalg.qr(a.T, mode="reduced")
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return SVDFactors(u=q_b @ u_c, s=s, vh=vh_c @ q_a.T)


def dense_svd(matrix: torch.Tensor) -> SVDFactors:
    """Thin SVD of a dense matrix (the reference the factored path is tested against)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return SVDFactors(u=u, s=s, vh=vh)


def fresh_lora_factors(
    out_features: int, in_features: int, rank: int, generator: torch.Generator, init: str = "default"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new ``(A, B)`` drawn as peft initialises LoRA: A kaiming-uniform(a=√5) (or N(0, 1/r) for
    ``init="gaussian"``), B = 0; so ``B@A = 0``. Randomness comes only from ``generator``."""
    if init == "gaussian":
        a = torch.randn(rank, in_features, generator=generator) / rank
    elif init == "default":
        # kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight: bound = gain*sqrt(3/fan_in), gain = sqrt(2/(1+5))
        bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / in_features)
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    else:
        raise ValueError(f"unknown LoRA init {init!r}; allowed: 'default', 'gaussian'")
    return a, torch.zeros(out_features, rank)
