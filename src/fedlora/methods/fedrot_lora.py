"""FedRot-LoRA: each client rotates its trained factors onto the global ones before they are averaged (METHODS.md §41).

Paper: H. Zhang, D. Kim, S. Cha, H. Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA",
ICML 2026, arXiv:2602.23638. Reference code: haoran-zh/FedRot-LoRA@36a67ef (a FederatedScope fork:
``federatedscope/rotation_alignment_tools.py``, client hook in ``federatedscope/core/workers/client.py``).

``B A = (B R)(Rᵀ A)`` for every orthogonal ``R``: two clients may learn the same product in differently rotated
factors, and averaging A and B separately then mixes unrelated rank directions. FedRot-LoRA removes that freedom
before the average. Client k continues from the global ``(A_g, B_g)``, trains ``A_k, B_k`` (and the heads), then per
module solves an orthogonal Procrustes problem against the factor it received at the start of this round:

* on A: ``M = A_k A_gᵀ`` (r×r), ``R`` minimises ``‖Rᵀ A_k − A_g‖_F``;
* on B: ``M = B_kᵀ B_g`` (r×r), ``R`` minimises ``‖B_k R − B_g‖_F``;

with ``M = U S Vᵀ`` and ``R = U Vᵀ``, and uploads ``A_k' = Rᵀ A_k``, ``B_k' = B_k R`` (same product, so the client's own
model is unchanged; no extra communication; ``O(r²(m+n) + r³)`` client compute per module). The SVD runs in float64;
when it fails or ``M`` is not finite or is zero (nothing to align to) ``R = I``, as the reference falls back to the
identity. The server is FedIT: ``A = Σ p_k A_k'``, ``B = Σ p_k B_k'`` and heads, with ``p_k`` the samples processed this
round (FederatedScope's weighting, ≈ uniform with equal local steps). Alignment reduces, but does not remove, the
FedIT product error ``Σ p_k B_k A_k − B̄ Ā``. No alignment in round 0 (the reference's ``state > 0``).
A robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) takes the coordinate-wise statistic of the aligned
factors. Up: aligned A, B (``r(m+n)`` per module) and heads. Down: A, B and heads.

Choices the specification leaves open, each an option:

* ``align_on``: ``alternate`` (the reference code: the factor alternates with the round's parity), or always ``A`` /
  always ``B`` (the reference's ``lora.ablation``). Whether the paper prescribes the alternation is unverified.
* ``odd_round_factor``: under ``alternate``, the factor odd rounds align on: ``A`` is the reference's
  ``initialshare: 'A'`` (odd rounds A, even rounds B), ``B`` swaps the parity (``initialshare: 'B'``).
* ``rotate_lambda`` λ: ``> 1`` (reference default 1.5) is the hard variant, ``R ∈ O(r)`` (reflections allowed);
  ``λ ≤ 1`` is the soft variant: ``R`` is forced into SO(r) (the last row of ``Vᵀ`` flipped when ``det(U Vᵀ) < 0``),
  then ``R_λ`` = the orthogonal polar factor of ``(1−λ)I + λR`` (its SVD ``U' S' V'ᵀ`` gives ``U' V'ᵀ``); at ``λ = 1``
  it is that proper rotation, at ``λ = 0`` the identity (factors uploaded as trained). ``λ = 1`` and ``λ = 1.5`` are
  different algorithms (the parameterisation is not monotone at 1), as in the reference.

Not implemented: the reference's ablations with a random rotation and with a scalar rescaling instead of a rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, subset
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    TrainStats,
    option,
    register_method,
)


@dataclass(frozen=True)
class FedRotOptions:
    align_on: str = option(
        "alternate",
        "the factor each module is aligned on: alternate (by round parity, the reference code), or always A / B "
        "(the reference's ablation)",
        choices=("alternate", "A", "B"),
    )
    odd_round_factor: str = option(
        "A",
        "under align_on=alternate, the factor of odd rounds (A: the reference's initialshare='A', even rounds B; "
        "B swaps the parity)",
        choices=("A", "B"),
    )
    rotate_lambda: float = option(
        1.5,
        "λ > 1: hard Procrustes, R in O(r); λ <= 1: soft, R forced into SO(r) and replaced by the polar factor of "
        "(1-λ)I + λR (λ = 0: no rotation)",
        minimum=0.0,
    )


def procrustes_rotation(m: torch.Tensor, *, rotate_lambda: float = 1.5) -> torch.Tensor:
    """The orthogonal ``R`` (float64, r×r) maximising ``tr(Rᵀ M)``, i.e. ``U Vᵀ`` for ``M = U S Vᵀ``.

    ``rotate_lambda > 1``: that ``R`` (a reflection when ``det < 0``). Otherwise ``R`` is made proper (the last row of
    ``Vᵀ`` flipped when ``det(U Vᵀ) < 0``) and, for ``λ < 1``, replaced by the polar factor of ``(1−λ)I + λR``;
    ``λ = 0`` gives the identity exactly. The identity as well when ``M`` is zero or not finite, or an SVD fails.
    """
    m64 = m.detach().double()
    eye = torch.eye(m64.shape[0], dtype=torch.float64)
    if rotate_lambda == 0.0 or not bool(torch.isfinite(m64).all()) or not bool((m64 != 0).any()):
        return eye
    try:
        u, _, vh = torch.linalg.svd(m64)
    except torch.linalg.LinAlgError:
        return eye
    r = u @ vh
    if rotate_lambda > 1.0:
        return r
    if float(torch.linalg.det(r)) < 0:
        vh = vh.clone()
        vh[-1] = -vh[-1]
        r = u @ vh
    if rotate_lambda == 1.0:
        return r
    try:
        u_s, _, vh_s = torch.linalg.svd((1.0 - rotate_lambda) * eye + rotate_lambda * r)
    except torch.linalg.LinAlgError:
        return r  # the reference keeps the proper rotation when re-orthogonalising fails
    return u_s @ vh_s


def align_factors(
    a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor, factor: str, *, rotate_lambda: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Rᵀ A, B R)`` with ``R`` aligning A (``factor="A"``, ``reference`` = the global A, r×n) or B (``"B"``,
    ``reference`` = the global B, m×r) onto ``reference``; the product ``B A`` is unchanged. Computed in float64, cast
    back to the factors' dtypes."""
    if factor == "A":
        m = a.double() @ reference.double().T
    elif factor == "B":
        m = b.double().T @ reference.double()
    else:
        raise ValueError(f"factor={factor!r}; allowed: 'A', 'B'")
    rot = procrustes_rotation(m, rotate_lambda=rotate_lambda)
    return (rot.T @ a.double()).to(a.dtype), (b.double() @ rot).to(b.dtype)


@register_method
class FedRotLoRA(FedMethod):
    id = "fedrot_lora"
    family = "aggregation (corrective: rotational alignment)"
    paper = "Zhang et al., ICML 2026, arXiv:2602.23638"
    up = "A, B rotated onto the received global factors, heads"
    down = "A, B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "samples_seen"
    Options = FedRotOptions

    def align_factor(self, rnd: int) -> str | None:
        """The factor round ``rnd``'s clients align on (None in round 0: nothing to align to yet)."""
        if rnd == 0:
            return None
        o = self.options
        if o.align_on != "alternate":
            return o.align_on
        other = "B" if o.odd_round_factor == "A" else "A"
        return o.odd_round_factor if rnd % 2 == 1 else other

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        return AggregateResult(adapter=self.average_keys(self.layout.all_keys, updates, w))

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        """The trained adapter with each module's factors rotated onto the global ones received this round."""
        upload = subset(trained, plan.upload_keys)
        factor = self.align_factor(plan.round)
        if factor is None:
            return upload, None
        for spec in self.layout.modules:
            ref = plan.download[spec.a_key if factor == "A" else spec.b_key]
            upload[spec.a_key], upload[spec.b_key] = align_factors(
                upload[spec.a_key], upload[spec.b_key], ref, factor, rotate_lambda=self.options.rotate_lambda
            )
        return upload, None
