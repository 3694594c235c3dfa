"""CoLR (Correlated Low-Rank): a shared random projection, redrawn every round, only B trained (METHODS.md §3).

Paper: N.-H. Nguyen, T.-A. Nguyen, T. Nguyen, V. T. Hoang, D. D. Le, K.-S. Wong, "Towards Efficient Communication
and Secure Federated Recommendation System via Low-rank Training", WWW 2024, doi:10.1145/3589334.3645702
(arXiv:2401.03748). Reference code ``NNHieu/CoLR-FedRec@d5ec076`` (``fedrec/fedmf_colr.py``), written for the
item-embedding table of a matrix-factorisation recommender; here it is applied to every LoRA module.

Naming: the reference code calls the trainable, zero-initialised factor ``_A`` and the frozen random one ``_B``. In
the library's convention (``ΔW = s·B@A``, B ``m×r`` zero-initialised, A ``r×n``) CoLR trains **B** and freezes a
random projection **A**: FFA-LoRA whose frozen factor is redrawn and merged every round (a Re-Initial scheme).

Round ``t``. Every client starts from the same fresh pair: ``A_t`` drawn from a seed the plan carries
(``reinit_seed = derive_seed(seed, "colr", t)``, the same for every client of the round; one draw per module) and
``B = 0``. It trains B and the heads; ``A_t`` stays frozen. Up: ``B_k`` and the heads. The server averages
``B̄ = Σ_k p_k B_k`` (row-wise over the clients that touched a row, below), merges ``W0 ← W0 + s·B̄·A_t`` (the
``base_delta`` ``(s·B̄, A_t)``, factored, nn.Linear layout) and keeps the global adapter's ``B = 0``, so the global
model is the merged base. Because ``A_t`` is shared, ``s·B̄·A_t`` is exactly the same average of the clients'
products ``s·B_k·A_t``: no SVD, no discordance. The heads are averaged.

Choices (options; the paper's setting is a recommender, so a transformer needs these made explicit):

* ``projection``: ``orthnorm`` (the reference's ``init_B_strategy='orthnorm'``: ``G ~ N(0, 1)^{r×n}``,
  ``U S Vᵀ = svd(G)``, ``A = U Vᵀ·sqrt(n/r)``, so ``A Aᵀ = (n/r)·I_r``; needs ``r <= n``) or ``lora_init`` (drawn as a
  fresh peft LoRA would be, per ``init_lora_weights``). Orthonormal rows scaled by ``sqrt(n/r)`` are much larger than
  peft's kaiming-uniform rows (entries ``~1/sqrt(r)`` against ``~1/sqrt(3n)``), so the same local learning rate moves
  the model further.
* ``grad_scale``: multiply B's gradient by ``sqrt(r/n)`` on every local step (the reference code's gradient hook).
  Under SGD this is the reference's effective step; AdamW normalises it away (up to epsilon).
* ``rows``: ``touched`` (the reference's ``div_``: row ``i`` of ``B̄`` is the weighted mean over the clients whose
  ``B_k[i]`` is non-zero, i.e. that touched it; a row nobody touched stays zero) or ``all`` (the plain weighted mean).
  In a dense linear layer every client touches every row and both agree; they differ with a sparsifying upload
  codec (``topk``) or rows whose gradient is exactly zero.
* Weighting defaults to ``uniform``: the reference ignores the weight it is handed (``add_``); any run weighting
  applies, renormalised over a row's owners.

With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) ``B̄`` (each row over its owners) and the heads are
the coordinate-wise statistic; the merge is still ``s·B̄·A_t`` with the shared ``A_t``.
Up: B (``m·r`` per module) and heads. Down: heads, and the merged update as factors ``(s·B̄, A_t)``: ``r(m+n)`` per
module (``A_t`` could be regenerated from the seed, so ``m·r`` would do; the library ships the factors it merges).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.algebra import fresh_lora_factors
from fedlora.adapters.state import AdapterState, LoraModuleSpec, subset
from fedlora.client.objectives import Objective
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ModuleRank,
    ServerState,
    derive_seed,
    option,
    register_method,
)


@dataclass(frozen=True)
class CoLROptions:
    projection: str = option(
        "orthnorm",
        "the shared frozen A: orthnorm (orthonormal rows of a Gaussian draw times sqrt(n/r), the reference code) or "
        "lora_init (drawn as a fresh peft LoRA A, per init_lora_weights)",
        choices=("orthnorm", "lora_init"),
    )
    grad_scale: bool = option(
        True, "multiply B's gradient by sqrt(r/n) every local step (the reference's hook; AdamW normalises it away)"
    )
    rows: str = option(
        "touched",
        "row i of the averaged B: touched (mean over the clients whose row i is non-zero, the reference) or all",
        choices=("touched", "all"),
    )


def orthnorm_projection(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """``U Vᵀ·sqrt(n/r)`` from the SVD of a standard Gaussian ``r×n`` draw: orthonormal rows (when ``r <= n``) scaled
    so that ``A Aᵀ = (n/r)·I_r`` (CoLR's ``orthnorm`` init)."""
    g = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return ((u @ vh) * math.sqrt(in_features / rank)).float()


class GradientScale(Objective):
    """Multiply the gradients of ``factors`` (key → factor) in place after every backward pass."""

    def __init__(self, factors: Mapping[str, float]) -> None:
        self.factors = dict(factors)

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        for key, factor in self.factors.items():
            if key in grads:
                grads[key].mul_(factor)


@register_method
class CoLR(FedMethod):
    id = "colr"
    family = "aggregation (single factor, shared random projection, re-init)"
    paper = "Nguyen et al., WWW 2024, doi:10.1145/3589334.3645702"
    up = "B, heads"
    down = "heads + the merged update as factors (s*B_avg, A_t)"
    bytes_up = "m*r + heads"
    bytes_down = "r(m+n) + heads (m*r would do: A_t is reproducible from the plan's seed)"
    default_weighting = "uniform"
    changes_base = True
    Options = CoLROptions

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__(ctx, options)
        if self.options.projection == "orthnorm":
            wide = [s.name for s in self.layout.modules if s.rank > s.in_features]
            if wide:
                raise ValueError(
                    f"colr: projection=orthnorm needs rank <= in_features (orthonormal rows); not so for {wide[:3]}; "
                    "use projection=lora_init or a lower lora_r"
                )

    # ----------------------------------------------------------------- the shared projection
    def round_seed(self, rnd: int) -> int:
        return derive_seed(self.seed, "colr", rnd)

    def projection(self, spec: LoraModuleSpec, rank: int, seed: int) -> torch.Tensor:
        """Round seed ``seed``'s frozen A of ``spec`` at ``rank`` (float32; one draw per module, order-free)."""
        gen = torch.Generator().manual_seed(derive_seed(seed, spec.name))
        if self.options.projection == "orthnorm":
            return orthnorm_projection(rank, spec.in_features, gen)
        a, _ = fresh_lora_factors(spec.out_features, spec.in_features, rank, gen, init=self.ctx.init_lora_weights)
        return a

    def fresh_factors(self, seed: int, ranks: Mapping[str, ModuleRank]) -> AdapterState:
        """The pair every client of the round starts from (float32): the shared projection A and B = 0. The base
        class's ``start_state`` and ``reference`` draw a re-initialising plan's factors here."""
        out = {}
        for spec in self.layout.modules:
            r = ranks[spec.name].rank
            out[spec.a_key] = self.projection(spec, r, seed)
            out[spec.b_key] = torch.zeros(spec.out_features, r)
        return out

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        """The global adapter keeps B = 0 for the whole run (the model lives in the merged base)."""
        server = super().init_server(initial)
        adapter = dict(server.adapter)
        for key in self.layout.b_keys:
            adapter[key] = torch.zeros_like(adapter[key])
        return dataclasses.replace(server, adapter=adapter)

    def trained_keys(self) -> tuple[str, ...]:
        return self.layout.b_keys + self.layout.other_keys

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        return self.make_plan(
            rnd,
            client_id,
            server,
            download=subset(server.adapter, self.layout.other_keys),
            upload_keys=self.trained_keys(),
            reinit_seed=self.round_seed(rnd),
        )

    def average_b(
        self, spec: LoraModuleSpec, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> torch.Tensor:
        """``B̄`` of one module (float32): row-wise over the clients that touched the row, or over all clients."""
        bs = [u.state[spec.b_key] for u in updates]
        if self.options.rows == "all":
            return self.combine(bs, weights).float()
        owners = torch.stack([b.detach().ne(0).any(dim=1) for b in bs])  # (K, m): client k touched row i
        zero = torch.zeros(spec.out_features, bs[0].shape[1])
        return self.combine_owned(bs, weights, owners, dim=0, fallback=zero)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        seed = self.round_seed(rnd)
        merged = {}
        for spec in self.layout.modules:
            b_bar = self.average_b(spec, updates, w)
            a_t = self.projection(spec, b_bar.shape[1], seed)
            merged[spec.name] = (self.scale_of(updates[0], spec) * b_bar, a_t)
        return AggregateResult(adapter=adapter, base_delta=merged)

    # ----------------------------------------------------------------- client side
    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        if not self.options.grad_scale:
            return None
        return GradientScale(
            {spec.b_key: math.sqrt(plan.ranks[spec.name].rank / spec.in_features) for spec in self.layout.modules}
        )
