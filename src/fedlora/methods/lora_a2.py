"""LoRA-A²: alternating freeze (B first) plus adaptive selection of the rank slices each client uploads (§5).

Paper: J. Koo, M. Jang, J. Ok, "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients", arXiv:2410.22815 (2024). There is no public code (METHODS.md §5, §35); this follows the paper as far as
METHODS.md could recover it, and every detail it marks as reconstructed is an option below.

Rounds alternate as in RoLoRA (:mod:`fedlora.methods.rolora`): ``t`` even trains B with A frozen, ``t`` odd trains A
with B frozen; the heads train every round. Every client downloads the whole global adapter (rank ``r``) and trains
every rank slice of the active factor. Client ``k`` has an upload budget ``r_k`` (``upload_ranks``): after training
it scores every rank slice ``i`` of every module ``l`` by its contribution to the change of ``ΔW_l = s_l·B_l A_l``,

* B-round: ``S_{l,i} = s_l·‖ΔB_l[:, i]‖₂·‖A_l[i, :]‖₂`` (``ΔB = B_k − B`` received, ``A`` the frozen factor),
* A-round: ``S_{l,i} = s_l·‖ΔA_l[i, :]‖₂·‖B_l[:, i]‖₂``,

keeps the ``Σ_l min(r_k, r_l)`` best slices over all modules together (``r_k·M`` when every module has rank
``>= r_k``) and uploads only those: every other slice of its upload equals what it received, so its change is zero.
Ties (e.g. A-round slices whose B column is zero) go to the larger ``‖Δ‖``, then to the earlier module and slice.

Server: ``B_l ← B_l + Σ_k p_k (M_{k,l} ⊙ ΔB_{k,l})`` (A likewise in A-rounds), ``p_k ∝ n_k``. Since each upload is
``B_l + M_{k,l} ⊙ ΔB_{k,l}``, that is the weighted mean of the uploads (:meth:`FedMethod.average_keys`), so with every
slice selected (``r_k >= r``) the update is RoLoRA's exactly. The frozen factor is bit-identical before and after.

Choices METHODS.md leaves open (options):

* ``upload_ranks``: the budgets. One number, or ``a,b,c`` cycled over client ids (as ``client_ranks``' tiers);
  empty: ``⌈r/4⌉`` for every client (our default, the paper's budgets are not recoverable; a quarter of the slices
  is where the sparse upload below saves half of the bytes). A budget at or above a
  module's rank uploads all of it. Budgets are not ``client_ranks``: every client *trains* at the global rank.
* ``selection``: ``global`` (the best slices over all modules together, the paper as reconstructed) or ``module``
  (``min(r_k, r_l)`` per module).
* ``score``: ``product`` (the formula above, reconstructed; verify against the paper's eq. 2) or ``delta``
  (``‖Δ‖`` of the slice alone, ignoring the frozen factor).
* ``renormalize_per_rank`` (default off): divide each slice's update by the weight of the clients that uploaded it,
  ``Σ_{k: i∈sel_k} p_k``, instead of by all (the slice is then the weighted mean over its uploaders; a slice nobody
  uploaded keeps its value). Uploaders are the clients whose slice differs from what the server sent. Under secure
  aggregation the server sees only the mean of the uploads, so this cannot apply there (it is the plain mean).
* ``lr_a``, ``lr_b``: multipliers of the local learning rate in A-rounds and B-rounds (the paper trains A and B with
  different learning rates, LoRA+-style; the ratio is not recoverable, default 1). Applied by scaling each optimiser
  step of the active factor, which is the same as scaling its learning rate for AdamW (decay included) and SGD.
* ``sparse_upload`` (default on): the reply travels with the ``topk`` codec sized to the budget, so only the selected
  slices (and the heads) are sent, as float32 values with int32 indices; the codec keeps the largest changes, and
  the changes outside the selection are exactly zero, so nothing selected is lost. Its size is set from the largest
  possible selection (the ``Σ_l min(r_k, r_l)`` longest slices), and it is used only when that is smaller than the
  whole reply (8 bytes per kept entry against 4 per float32 entry). It replaces the run's upload codec, so a run that
  sets another upload codec is refused unless ``sparse_upload=false`` (then the whole active factor travels, its
  unselected slices unchanged). With client-side DP noise every entry changes, and the codec keeps the largest
  noised ones.

With a robust ``aggregator`` (``median``, ``trimmed_mean:<beta>``) the uploads are combined coordinate-wise
(unweighted); a slice fewer than half of the clients uploaded then keeps (median) its value. The round's direction
check (``min_cosine``) compares each update with the coordinate-wise median update, which is zero outside the heads
and the slices most clients chose, so honest updates of small budgets sit near cosine 0 (the tiny test task, seed 0:
−0.014 for one client in round 1): with small budgets consider ``min_cosine=null`` or a negative threshold.
Up: the selected slices of the active factor (``r_k·m`` (B-rounds) or ``r_k·n`` (A-rounds) per module on average,
values + int32 indices) and the heads. Down: A, B and the heads (``r(m+n)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.state import AdapterState, subset
from fedlora.client.codecs import parse_codec, roundtrip
from fedlora.client.objectives import Objective
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ServerState,
    TrainStats,
    option,
    register_method,
)


@dataclass(frozen=True)
class LoRAA2Options:
    upload_ranks: str = option(
        "",
        "upload budget r_k (rank slices per module, on average) of each client: one number, or a,b,c cycled over "
        "client ids; empty: ceil(r/4) of the global rank r",
    )
    selection: str = option(
        "global",
        "which slices a client uploads: the best over all modules together (global) or min(r_k, r_l) per module",
        choices=("global", "module"),
    )
    score: str = option(
        "product",
        "slice score: product (s*||delta slice||*||frozen slice||, reconstructed from the paper) or delta (||delta||)",
        choices=("product", "delta"),
    )
    renormalize_per_rank: bool = option(
        False, "average each slice over the clients that uploaded it (weights renormalised), not over all clients"
    )
    lr_a: float = option(1.0, "multiplier of the local learning rate in A-rounds (odd rounds)", minimum=0.0)
    lr_b: float = option(1.0, "multiplier of the local learning rate in B-rounds (even rounds)", minimum=0.0)
    sparse_upload: bool = option(
        True, "send only the selected slices (topk codec sized to the budget); false: the whole active factor"
    )


def parse_budgets(text: str) -> list[int]:
    """``"4"`` or ``"2,4,8"`` → the budgets (cycled over client ids); ``""`` → ``[]`` (the default budget)."""
    text = text.strip()
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"lora_a2: upload_ranks={text!r} must be integers like 4 or 2,4,8") from None
    if not values or min(values) < 1:
        raise ValueError(f"lora_a2: upload_ranks={text!r}: give at least one budget, each >= 1")
    return values


class StepScale(Objective):
    """Multiply every optimiser step of ``keys`` by ``factor`` (the same as multiplying their learning rate, for any
    optimiser whose step is proportional to it: AdamW with its decoupled decay, SGD with momentum). The parameters are
    remembered when the loss is formed, and moved back onto ``start + factor·(new − start)`` after the step."""

    def __init__(self, keys: Sequence[str], factor: float) -> None:
        self.keys = tuple(keys)
        self.factor = float(factor)
        self.before: dict[str, torch.Tensor] = {}

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        self.before = {k: params[k].detach().clone() for k in self.keys if k in params}
        return None

    def after_step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        for key, start in self.before.items():
            p = params[key]
            p.copy_(start + self.factor * (p - start))


@register_method
class LoRAA2(FedMethod):
    id = "lora_a2"
    family = "aggregation (alternating factor, adaptive rank-slice upload)"
    paper = "Koo et al., arXiv:2410.22815"
    up = "the selected rank slices of B (even rounds) or A (odd rounds) + indices, heads"
    down = "A, B, heads"
    bytes_up = "~2*r_k*m (even rounds) or ~2*r_k*n (odd rounds), values + int32 indices, + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"
    Options = LoRAA2Options

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__(ctx, options)
        self.budgets = parse_budgets(self.options.upload_ranks)
        top = max(spec.rank for spec in self.layout.modules)
        sparse = any(self.budget(c) < top for c in range(max(ctx.num_clients, len(self.budgets), 1)))
        if self.options.sparse_upload and sparse and parse_codec(ctx.upload_codec).kind != "none":
            raise ValueError(
                f"lora_a2: sparse_upload sends only the selected rank slices with its own topk codec, but the run sets "
                f"upload_codec={ctx.upload_codec!r}; use one of them (method option sparse_upload=false keeps yours)"
            )

    @property
    def upload_codec(self) -> str:
        """The upload codec of this method's plans: ``topk`` (client 0's budget in a B-round, heads left out: the
        exact density differs per client and round) when it sends selected slices, else the run's codec. Secure
        aggregation reads it to refuse a sparse upload before the run starts."""
        ranks = self.module_ranks(None)
        total = sum(sum(ls) for ls in self.slice_lengths(0, ranks))
        needed = self.upload_entries(0, 0, ranks)
        if not self.options.sparse_upload or 8 * needed >= 4 * total:
            return self.ctx.upload_codec
        return f"topk:{needed / total!r}"

    # ----------------------------------------------------------------- budgets and slices
    def budget(self, client_id: int) -> int:
        """Client ``client_id``'s upload budget ``r_k``."""
        if self.budgets:
            return self.budgets[client_id % len(self.budgets)]
        return max(1, math.ceil(max(spec.rank for spec in self.layout.modules) / 4))

    @staticmethod
    def b_round(rnd: int) -> bool:
        return rnd % 2 == 0

    def trained_keys(self, rnd: int) -> tuple[str, ...]:
        factor = self.layout.b_keys if self.b_round(rnd) else self.layout.a_keys
        return factor + self.layout.other_keys

    def slice_lengths(self, rnd: int, ranks: Mapping[str, Any]) -> list[list[int]]:
        """Per module, the number of entries of each of its rank slices of the active factor."""
        b = self.b_round(rnd)
        return [[spec.out_features if b else spec.in_features] * ranks[spec.name].rank for spec in self.layout.modules]

    def quota(self, client_id: int, ranks: Mapping[str, Any]) -> list[int]:
        """How many slices client ``client_id`` keeps per module (``module``) or in total (``global``: one entry)."""
        r_k = self.budget(client_id)
        per_module = [min(r_k, ranks[spec.name].rank) for spec in self.layout.modules]
        return per_module if self.options.selection == "module" else [sum(per_module)]

    def upload_entries(self, rnd: int, client_id: int, ranks: Mapping[str, Any]) -> int:
        """The largest number of factor entries a selection of this client can change."""
        lengths = self.slice_lengths(rnd, ranks)
        quota = self.quota(client_id, ranks)
        if self.options.selection == "module":
            return sum(sum(sorted(ls, reverse=True)[:q]) for ls, q in zip(lengths, quota, strict=True))
        return sum(sorted((x for ls in lengths for x in ls), reverse=True)[: quota[0]])

    # ----------------------------------------------------------------- server side
    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        keys = self.trained_keys(rnd)
        plan = self.make_plan(
            rnd, client_id, server, download=subset(server.adapter, self.layout.all_keys), upload_keys=keys
        )
        if not self.options.sparse_upload:
            return plan
        total = sum(math.prod(spec.shape) for spec in plan.upload.values())
        dense = sum(
            math.prod(spec.shape) * torch.empty(0, dtype=spec.dtype).element_size() for spec in plan.upload.values()
        )
        heads = sum(math.prod(plan.upload[k].shape) for k in self.layout.other_keys)
        needed = self.upload_entries(rnd, client_id, plan.ranks) + heads
        if 8 * needed >= dense:  # float32 values + int32 indices would not be smaller than the whole reply
            return plan  # the run's codec; unselected slices still travel unchanged
        return dataclasses.replace(plan, upload_codec=f"topk:{(needed + 0.5) / total!r}")

    def received(self, server: ServerState) -> AdapterState:
        """What the clients decoded from the download (the server's adapter through the download codec)."""
        state = subset(server.adapter, self.layout.all_keys)
        codec = parse_codec(self.ctx.download_codec)
        return state if codec.kind == "none" else roundtrip(codec, state)

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        keys = self.trained_keys(rnd)
        adapter = dict(server.adapter)
        if not self.options.renormalize_per_rank:
            adapter.update(self.average_keys(keys, updates, w))
            return AggregateResult(adapter=adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        received = self.received(server)
        dim = 1 if self.b_round(rnd) else 0  # B's slices are columns, A's are rows
        for spec in self.layout.modules:
            key = spec.b_key if dim == 1 else spec.a_key
            ref = received[key].float()
            tensors = [u.state[key] for u in updates]
            owners = torch.stack([t.float().ne(ref).any(dim=1 - dim) for t in tensors])  # (K, r): uploaded slice i
            adapter[key] = self.combine_owned(tensors, w, owners, dim=dim, fallback=server.adapter[key])
        return AggregateResult(adapter=adapter)

    # ----------------------------------------------------------------- client side
    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        b = self.b_round(plan.round)
        factor = self.options.lr_b if b else self.options.lr_a
        if factor == 1.0:
            return None
        return StepScale(self.layout.b_keys if b else self.layout.a_keys, factor)

    def scores(self, plan: ClientPlan, trained: AdapterState) -> list[tuple[float, float, int, int]]:
        """``(score, ‖Δ‖, module index, slice)`` for every rank slice of the active factor."""
        b = self.b_round(plan.round)
        out = []
        for li, spec in enumerate(self.layout.modules):
            if b:
                delta = (trained[spec.b_key].float() - plan.download[spec.b_key].float()).norm(dim=0)
                frozen = plan.download[spec.a_key].float().norm(dim=1)
            else:
                delta = (trained[spec.a_key].float() - plan.download[spec.a_key].float()).norm(dim=1)
                frozen = plan.download[spec.b_key].float().norm(dim=0)
            scale = abs(plan.ranks[spec.name].scale)
            for i in range(delta.shape[0]):
                d = float(delta[i])
                score = scale * d * float(frozen[i]) if self.options.score == "product" else d
                out.append((score, d, li, i))
        return out

    def select(self, plan: ClientPlan, trained: AdapterState) -> dict[int, list[int]]:
        """Per module index, the rank slices client ``plan.client_id`` uploads."""
        ranked = sorted(self.scores(plan, trained), key=lambda t: (-t[0], -t[1], t[2], t[3]))
        quota = self.quota(plan.client_id, plan.ranks)
        chosen: dict[int, list[int]] = {li: [] for li in range(len(self.layout.modules))}
        if self.options.selection == "module":
            for _, _, li, i in ranked:
                if len(chosen[li]) < quota[li]:
                    chosen[li].append(i)
        else:
            for _, _, li, i in ranked[: quota[0]]:
                chosen[li].append(i)
        return {li: sorted(v) for li, v in chosen.items()}

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        upload = subset(trained, plan.upload_keys)
        b = self.b_round(plan.round)
        for li, slices in self.select(plan, trained).items():
            spec = self.layout.modules[li]
            key = spec.b_key if b else spec.a_key
            out = plan.download[key].detach().clone()  # unselected slices: exactly what was received
            if slices:
                index = torch.tensor(slices, dtype=torch.long)
                dim = 1 if b else 0
                out.index_copy_(dim, index, trained[key].detach().index_select(dim, index).to(out.dtype))
            upload[key] = out
        return upload, None
