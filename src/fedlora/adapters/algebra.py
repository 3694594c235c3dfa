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

    def to_lora(
        self, rank: int, scaling: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``scaling·B@A`` = best rank-``rank`` approximation; A has orthonormal rows.

        Singular values and ``1/scaling`` go into B (the FlexLoRA/SLoRA convention, METHODS.md §6, §34).
        When fewer than ``rank`` singular directions exist (few clients of small rank), the missing rows of A are
        filled with random directions orthonormal to the others (drawn from ``generator``) and the matching columns
        of B are zero: the product is unchanged, and every rank slot can still train (a zero row of A with a zero
        column of B would have zero gradient forever).
        """
        k = min(rank, self.s.shape[0])
        m, n = self.u.shape[0], self.vh.shape[1]
        a = self.vh.new_zeros(rank, n)
        b = self.u.new_zeros(m, rank)
        a[:k] = self.vh[:k]
        b[:, :k] = self.u[:, :k] * (self.s[:k] / scaling)
        if k < rank:
            a[k:] = complete_rows(a[:k], rank - k, generator)
        return a, b


def complete_rows(rows: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` unit rows orthogonal to ``rows`` (orthonormal, k×n) and to each other, as far as n allows."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = rows.shape[1]
    g = torch.randn(count, n, generator=gen, dtype=torch.float32).to(rows.dtype)
    if rows.shape[0]:
        g = g - (g @ rows.T) @ rows
    room = n - rows.shape[0]
    if room >= count:
        q, _ = torch.linalg.qr(g.T, mode="reduced")
        return q.T.contiguous()
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` zero-padded to ``rank`` (rows of A, columns of B); ``B@A`` is unchanged."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if r == rank:
        return a, b
    return torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)


def rankwise_average(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, dim: int, size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average factors of different ranks along rank axis ``dim`` (0 for A, 1 for B), padded to ``size``.

    ``mode="zero"``: ``Σ w_k pad0(X_k) / Σ w_k`` (rank i is diluted by the weight of clients without it);
    ``mode="replicate"``: each rank index is averaged over the clients that own it only (RBLA, METHODS.md §16).
    Returns the average (float32) and the total weight per rank index (0 where no client owns it).
    """
    if mode not in ("zero", "replicate"):
        raise ValueError(f"mode={mode!r}; allowed: 'zero', 'replicate'")
    num: torch.Tensor | None = None
    owners = torch.zeros(size)
    total = 0.0
    for t, w in zip(tensors, weights, strict=True):
        r = t.shape[dim]
        pad = [0, 0] * (t.dim() - dim - 1) + [0, size - r]
        term = torch.nn.functional.pad(t.float(), pad) * float(w)
        num = term if num is None else num.add_(term)
        owners[:r] += float(w)
        total += float(w)
    if num is None:
        raise ValueError("rankwise_average of no tensors")
    if mode == "zero":
        return num / total, owners
    den = owners.clamp_min(1e-30)
    shape = [1] * num.dim()
    shape[dim] = size
    return num / den.view(shape), owners


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
