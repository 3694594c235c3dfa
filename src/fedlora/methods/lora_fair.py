"""LoRA-FAIR: average A and B, then refine B̄ on the server so that B̄'Ā comes closer to the ideal update (§9).

Paper: J. Bian, L. Wang, L. Zhang, J. Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv:2411.14961. There is no public code (METHODS.md §9, §35); the dissimilarity ``S`` and
the weight ``λ`` of the paper are not verified, so both are options.

Clients continue from the global adapter (Avg-Initial) and train A and B; they upload both. Per module the server
forms ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k`` (``p_k ∝ n_k``) and the ideal update ``ΔW = Σ p_k s_k B_k A_k`` (each
client's own scale). Written in B's units, ``M = ΔW / s`` with ``s`` the global scale, it looks for a correction

    ``ΔB* = argmin_ΔB  S(M, (B̄ + ΔB) Ā) + λ·‖ΔB‖²``

and sends down ``(Ā, B̄' = B̄ + ΔB*)``: A is sent unchanged, B stays close to the plain average (so the clients' warm
start survives), and ``s·B̄'Ā`` comes closer to ``ΔW``. The heads are averaged.

* ``solver=gradient`` (default, the paper's "a few gradient steps on the server"): ``steps`` steps of steepest
  descent from ``ΔB = 0``. For ``similarity=frobenius`` (``S = ‖(B̄+ΔB)Ā − M‖²_F``) each step uses the exact line
  search of the quadratic, so every step decreases the objective and the iterates converge to the closed form below.
  For ``similarity=cosine`` (``S = 1 − cos(M, (B̄+ΔB)Ā)``, scale-free, with the penalty ``λ·‖ΔB‖²/‖B̄‖²`` made scale-free
  the same way) each step backtracks (Armijo) from a step the size of ``B̄``; a module whose ``M`` or ``B̄Ā`` is zero
  is left unchanged (the cosine is undefined there).
* ``solver=closed_form``: the exact minimiser of the Frobenius objective, ridge least squares,
  ``ΔB* = (M − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹`` (a pseudo-inverse at ``λ = 0``): METHODS.md's test oracle.

Nothing forms an ``m×n`` matrix: ``M`` is kept as the stacked factors ``B_s A_s`` of the clients' products
(:func:`fedlora.adapters.algebra.stack_terms`) and every inner product is computed through ``r×r`` Gram matrices.
With ``λ → 0`` and the Frobenius objective ``‖s·B̄'Ā − ΔW‖_F ≤ ‖s·B̄Ā − ΔW‖_F`` (never worse than FedIT). The round's
metrics report the relative error ``‖B̄Ā − M‖/‖M‖`` averaged over modules before (``lora_fair_gap_fedit``) and after
(``lora_fair_gap``) the correction. Robust aggregators are refused (the target is the weighted mean of the clients'
products); ``max_weight_ratio`` caps ``p_k``. Clients train one rank.
Up: A, B, heads (``r(m+n)`` per module). Down: Ā, B̄', heads (the same size: the correction costs no communication).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import stack_terms
from fedlora.methods.base import AggregateResult, ClientUpdate, FedMethod, ServerState, option, register_method


@dataclass(frozen=True)
class LoRAFAIROptions:
    solver: str = option(
        "gradient",
        "how the correction of B is found: gradient (steps of steepest descent on the server, the paper) or "
        "closed_form (the exact minimiser of the frobenius objective, ridge least squares)",
        choices=("gradient", "closed_form"),
    )
    similarity: str = option(
        "frobenius",
        "the dissimilarity S(M, (B+dB)A) the gradient solver lowers: frobenius (squared error) or cosine "
        "(1 - cosine similarity; the paper's S is unverified)",
        choices=("frobenius", "cosine"),
    )
    lam: float = option(
        1e-2,
        "λ of the penalty λ*||dB||^2 (cosine: λ*||dB||^2/||B_avg||^2) that keeps B close to the average",
        minimum=0.0,
    )
    steps: int = option(20, "server gradient steps per module (solver=gradient)", minimum=1)


class Target:
    """One module's problem in B's units: ``M = B_s A_s`` (stacked client products over the global scale), the
    averages ``B̄``, ``Ā``, and the Gram matrices every inner product needs (float64)."""

    def __init__(self, b_s: torch.Tensor, a_s: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor) -> None:
        self.b_bar = b_bar.double()
        self.a_bar = a_bar.double()
        self.gram = self.a_bar @ self.a_bar.T  # ĀĀᵀ (r×r)
        self.m_at = b_s.double() @ (a_s.double() @ self.a_bar.T)  # M Āᵀ (m×r)
        b64, a64 = b_s.double(), a_s.double()
        self.m_sq = float(((b64.T @ b64) * (a64 @ a64.T)).sum().clamp_min(0.0))  # ‖M‖²

    def sq_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``‖X Ā‖²``."""
        return ((x.T @ x) * self.gram).sum()

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """``⟨X Ā, M⟩``."""
        return (x * self.m_at).sum()

    def gap(self, x: torch.Tensor) -> float:
        """``‖X Ā − M‖`` relative to ``‖M‖`` (0 when M is zero)."""
        if self.m_sq <= 0:
            return 0.0
        sq = float(self.sq_norm(x) - 2 * self.inner(x)) + self.m_sq
        return math.sqrt(max(sq, 0.0) / self.m_sq)


def closed_form(t: Target, lam: float) -> torch.Tensor:
    """``B̄ + (M − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹``: the minimiser of ``‖(B̄+ΔB)Ā − M‖² + λ‖ΔB‖²`` (pseudo-inverse at λ = 0)."""
    rhs = t.m_at - t.b_bar @ t.gram  # (M − B̄Ā)Āᵀ
    r = t.gram.shape[0]
    if lam > 0:
        delta = torch.linalg.solve(t.gram + lam * torch.eye(r, dtype=t.gram.dtype), rhs.T).T
    else:
        delta = rhs @ torch.linalg.pinv(t.gram, hermitian=True)
    return t.b_bar + delta


def frobenius_descent(t: Target, lam: float, steps: int) -> torch.Tensor:
    """Steepest descent with exact line search on ``‖XĀ − M‖² + λ‖X − B̄‖²`` from ``X = B̄``."""
    x = t.b_bar.clone()
    for _ in range(steps):
        g = 2 * (x @ t.gram - t.m_at + lam * (x - t.b_bar))
        gg = float((g * g).sum())
        if gg == 0.0:
            break
        curvature = 2 * (float(t.sq_norm(g)) + lam * gg)
        if curvature <= 0.0:
            break
        x = x - (gg / curvature) * g
    return x


def cosine_descent(t: Target, lam: float, steps: int) -> torch.Tensor:
    """Gradient descent with Armijo backtracking on ``1 − cos(XĀ, M) + λ‖X − B̄‖²/‖B̄‖²`` from ``X = B̄``."""
    b_sq = float((t.b_bar * t.b_bar).sum())
    if t.m_sq <= 0 or b_sq <= 0 or float(t.sq_norm(t.b_bar)) <= 0:
        return t.b_bar.clone()
    m_norm = math.sqrt(t.m_sq)

    def objective(x: torch.Tensor) -> torch.Tensor:
        norm = t.sq_norm(x).clamp_min(1e-300).sqrt()
        return 1 - t.inner(x) / (norm * m_norm) + lam * ((x - t.b_bar) ** 2).sum() / b_sq

    x = t.b_bar.clone()
    for _ in range(steps):
        xg = x.clone().requires_grad_(True)
        f = objective(xg)
        (g,) = torch.autograd.grad(f, xg)
        gg = float((g * g).sum())
        if gg == 0.0:
            break
        step = 0.5 * math.sqrt(b_sq / gg)  # a first try the size of half of B̄
        with torch.no_grad():
            for _ in range(40):
                cand = x - step * g
                if float(objective(cand)) <= float(f) - 1e-4 * step * gg:
                    x = cand
                    break
                step /= 2
            else:
                break
    return x.detach()


@register_method
class LoRAFAIR(FedMethod):
    id = "lora_fair"
    family = "aggregation (factor average + server-side correction of B)"
    paper = "Bian et al., ICCV 2025, arXiv:2411.14961"
    up = "A, B, heads"
    down = "A_avg, corrected B, heads"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"
    supports_robust_aggregation = False
    robust_refusal = (
        "it corrects the averaged B towards the weighted mean of the clients' products (sum_k p_k s_k B_k A_k), which "
        "is not an average of the uploaded factors"
    )
    Options = LoRAFAIROptions

    def correct(self, t: Target) -> torch.Tensor:
        """``B̄' = B̄ + ΔB*`` (float64) under the options."""
        o = self.options
        if o.solver == "closed_form":
            return closed_form(t, o.lam)
        if o.similarity == "cosine":
            return cosine_descent(t, o.lam, o.steps)
        return frobenius_descent(t, o.lam, o.steps)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.all_keys, updates, w))
        before, after = [], []
        for spec in self.layout.modules:
            b_s, a_s = stack_terms(self.product_terms(spec, updates, w))
            t = Target(b_s / spec.scaling(), a_s, adapter[spec.b_key], adapter[spec.a_key])
            b_new = self.correct(t)
            before.append(t.gap(t.b_bar))
            after.append(t.gap(b_new))
            adapter[spec.b_key] = b_new.to(server.adapter[spec.b_key].dtype)
        metrics = {"lora_fair_gap_fedit": sum(before) / len(before), "lora_fair_gap": sum(after) / len(after)}
        return AggregateResult(adapter=adapter, metrics=metrics)
