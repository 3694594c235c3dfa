"""SLoRA: a sparse fine-tuning warm-up, then LoRA initialised from the SVD of the accumulated update (METHODS.md §11).

Paper: S. Babakniya, A. R. Elkordy, Y. H. Ezzeldin, Q. Liu, K.-B. Song, M. El-Khamy, S. Avestimehr, "SLoRA: Federated
Parameter Efficient Fine-Tuning of Language Models", arXiv:2308.06522. No author code; re-implementation read:
``alibaba/FederatedScope@1cb1ab7`` (FlexLoRA branch: ``fed_utils/client.py``, ``fed_utils/adaptive_peft.py``).

Stage 1 (the first ``warmup_rounds`` rounds): sparse fine-tuning of the frozen weights themselves, averaged with
FedAvg and accumulated into them. fedlora's client loop trains adapter tensors only, so the sparse update of each
adapted weight ``W`` (m×n) is trained through its LoRA slot with A frozen to a selection matrix: ``A = E_S`` (row i
is the unit vector of input column ``S_i``, ``|S| = r`` columns drawn at random), B trained from 0. Then
``s·B E_S`` is exactly a dense update of the r columns S of W and zero elsewhere, and the gradient of B is s times
the gradient of those columns: sparse fine-tuning of W with a column mask of density ``r/n`` (``m·r`` trained
values per module against LoRA's ``r(m+n)``). All clients of a round share S, so FedAvg of the sparse full-weight
updates is exactly ``s·(Σ p_k B_k) E_S``; it is merged into W every round (it travels factored, ``(s·B̄, E_S)``),
B is reset to 0, and heads are trained and averaged throughout. Deviation, documented: the paper's mask is an
unstructured per-parameter Bernoulli mask (density chosen to match LoRA's parameter count); a column mask is what
the adapter slot can express. Option ``mask``: ``round`` (default) draws new columns every round, so the
accumulated update spreads over up to ``R1·r`` columns like an unstructured mask spreads over all of W; ``fixed``
keeps one set of columns for the whole warm-up (then the update has rank ≤ r and the SVD below is exact). Not
copied from the re-implementation: each of its clients draws its own mask every round (averaging then dilutes each
coordinate by how many clients drew it), and its stage-1 optimiser decays every weight, masked or not.

Transition (after the last warm-up round): per module ``ΔW = W_stage1 − W_pre`` (the server's cumulative base
change plus this round's), ``U S Vᵀ = svd(ΔW)``; the global adapter becomes ``A = V_rᵀ`` (orthonormal rows) and
``B = U_r S_r / s`` (singular values and ``1/s`` in B as in the re-implementation, with the run's own scale ``s``
instead of its hard-coded ``alpha = 16``), and the frozen weights go back to ``W_pre`` (the change
``−(W_stage1 − W_pre)`` travels once, dense ``m·n``). The model is then ``W_pre + s·BA = W_pre + trunc_r(ΔW)``.
Stage 2: FedIT from that initialisation (clients continue from the global adapter; ``p_k ∝ n_k``).

Option ``warmup_rounds`` (R1): the re-implementation uses 5, the paper 1–10% of the rounds; the default is 10% of
the run's rounds (at least 1). A run with ``warmup_rounds >= rounds`` is sparse fine-tuning throughout: the
transition is made only when a LoRA round follows it.
Up: stage 1 B, heads (``m·r``); stage 2 A, B, heads (``r(m+n)``). Down: stage 1 ``E_S``, B = 0, heads and the
merged ``(s·B̄, E_S)`` (``r·n + m·r`` and ``r(m+n)``); the transition ``m·n`` once; stage 2 A, B, heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedlora.adapters.algebra import dense_svd
from fedlora.adapters.peft_io import dense_delta
from fedlora.adapters.state import LoraModuleSpec, subset
from fedlora.methods.base import (
    AggregateResult,
    BaseDelta,
    ClientPlan,
    ClientUpdate,
    MethodContext,
    ServerState,
    derive_seed,
    option,
    register_method,
)
from fedlora.methods.fedit import FedIT

STAGE = "slora/stage"
"""Server meta: ``sparse`` during the warm-up, ``lora`` after the transition."""
SWITCHED = "slora/switched_after_round"
"""Server meta: the 0-based round whose aggregation made the SVD initialisation."""


@dataclass(frozen=True)
class SLoRAOptions:
    warmup_rounds: int | None = option(
        None,
        "rounds of sparse fine-tuning before the SVD initialisation (R1); none: 10% of the rounds, at least 1",
        minimum=1,
    )
    mask: str = option(
        "round",
        "the r input columns of each weight trained in the warm-up: round = drawn anew every round (common to the "
        "round's clients); fixed = one draw for the whole warm-up",
        choices=("round", "fixed"),
    )


@register_method
class SLoRA(FedIT):
    id = "slora"
    aliases = ()
    family = "initialisation (sparse warm-up + SVD of the update)"
    paper = "Babakniya et al., arXiv:2308.06522"
    up = "warm-up: B (the masked columns of W), heads; then A, B, heads"
    down = "warm-up: mask E_S, heads, the merged sparse update; once the dense revert m*n; then A, B, heads"
    bytes_up = "m*r + heads (warm-up), r(m+n) + heads"
    bytes_down = "r(m+n) + heads, + r(m+n) merged per warm-up round, + m*n once"
    default_weighting = "num_examples"
    changes_base = True
    Options = SLoRAOptions

    def __init__(self, ctx: MethodContext, options: object = None) -> None:
        super().__init__(ctx, options)
        for spec in self.layout.modules:
            if spec.rank > spec.in_features:
                raise ValueError(
                    f"{self.id}: the warm-up trains r = {spec.rank} input columns of {spec.name}, which has only "
                    f"{spec.in_features}"
                )

    # ------------------------------------------------------------------ stages
    def warmup_rounds(self) -> int:
        """R1: rounds of sparse fine-tuning before the SVD initialisation."""
        if self.options.warmup_rounds is not None:
            return self.options.warmup_rounds
        return max(1, math.ceil(0.1 * self.ctx.rounds))

    @staticmethod
    def in_warmup(server: ServerState) -> bool:
        return server.meta.get(STAGE, "sparse") == "sparse"

    def mask(self, spec: LoraModuleSpec, rnd: int) -> torch.Tensor:
        """``E_S`` (r×n): row i is the unit vector of the i-th trained input column of ``spec`` in round ``rnd``."""
        parts = (self.seed, "slora-mask", spec.name) + (() if self.options.mask == "fixed" else (rnd,))
        gen = torch.Generator().manual_seed(derive_seed(*parts))
        columns = torch.randperm(spec.in_features, generator=gen)[: spec.rank].sort().values
        e = torch.zeros(spec.rank, spec.in_features)
        e[torch.arange(spec.rank), columns] = 1.0
        return e

    # ------------------------------------------------------------------ server
    def init_server(self, initial: dict[str, torch.Tensor]) -> ServerState:
        """Round 0 starts the warm-up: the global adapter adds nothing (B = 0) to the pretrained weights."""
        server = super().init_server(initial)
        adapter = dict(server.adapter)
        for spec in self.layout.modules:
            adapter[spec.a_key] = self.mask(spec, 0).to(adapter[spec.a_key].dtype)
            adapter[spec.b_key] = torch.zeros_like(adapter[spec.b_key])
        return replace(server, adapter=adapter, meta={STAGE: "sparse"})

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        if not self.in_warmup(server):
            return super().plan(rnd, client_id, server)
        download = subset(server.adapter, self.layout.other_keys)
        for spec in self.layout.modules:
            download[spec.a_key] = self.mask(spec, rnd).to(server.adapter[spec.a_key].dtype)
            download[spec.b_key] = torch.zeros_like(server.adapter[spec.b_key])
        keys = self.layout.b_keys + self.layout.other_keys
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if not self.in_warmup(server):
            return super().aggregate(rnd, server, updates)
        w = self.weights(updates)
        avg = self.average_keys(self.layout.b_keys + self.layout.other_keys, updates, w)
        adapter = dict(server.adapter)
        adapter.update({k: avg[k] for k in self.layout.other_keys})
        step: dict[str, BaseDelta] = {}
        for spec in self.layout.modules:  # FedAvg of the sparse updates of W: s·(Σ p_k B_k)·E_S, exactly
            step[spec.name] = (spec.scaling() * avg[spec.b_key].float(), self.mask(spec, rnd))
        r1 = self.warmup_rounds()
        if rnd + 1 < r1 or r1 >= self.ctx.rounds:  # the warm-up goes on: merge, and B back to 0
            for spec in self.layout.modules:
                adapter[spec.b_key] = torch.zeros_like(server.adapter[spec.b_key])
            return AggregateResult(adapter=adapter, base_delta=step)
        revert: dict[str, BaseDelta] = {}
        for spec in self.layout.modules:
            before = server.base_delta.get(spec.name)
            total = dense_delta(step[spec.name]) + (before.float() if before is not None else 0.0)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "slora-complete", spec.name))
            a, b = dense_svd(total).to_lora(spec.rank, spec.scaling(), gen)
            adapter[spec.a_key] = a.to(server.adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b.to(server.adapter[spec.b_key].dtype)
            if before is not None:
                revert[spec.name] = -before.float()
        meta = {**server.meta, STAGE: "lora", SWITCHED: rnd}
        return AggregateResult(adapter=adapter, base_delta=revert or None, meta=meta)
