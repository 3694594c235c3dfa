"""Fed-SB: fixed orthonormal A and B from a gradient set-up, only the small r×r matrix R trains and travels
(METHODS.md §37).

Paper: R. Singhal, K. Ponkshe, R. Vartak, L. R. Varshney, P. Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning", arXiv:2502.15436 (2025), built
on LoRA-SB (K. Ponkshe, R. Singhal et al., arXiv:2411.19557).

Every adapted module is ``ΔW = s·B·R·A`` with ``A`` (r×n, orthonormal rows) and ``B`` (m×r, orthonormal columns)
fixed for the whole run and identical on every client, and ``R`` (r×r) the only LoRA tensor that trains. Server:
``R = Σ_k p_k R_k`` (uniform ``p_k = 1/K`` by default, as in the reference code), heads averaged the same way. This
is exact: ``s·B·(Σ p_k R_k)·A = Σ p_k s·B·R_k·A``. Each round's aggregate uses that round's uploads only (the
reference code appends every round's client matrices to one list it never clears and averages all of them, so
round t's R is the mean over rounds 1..t; §37).

How R trains in a peft LoRA. The client's peft factors are ``A = A0`` (frozen) and ``B = B0·R``; B trains with its
gradient projected onto the column space of B0 (``g ← B0 B0ᵀ g``) and, after each optimiser step, B is projected back
(``B ← B0 B0ᵀ B``), so B stays ``B0·R`` and the client uploads ``R_k = B0ᵀ B``. Under plain SGD this is exactly SGD
on R (``∂L/∂R = B0ᵀ ∂L/∂B``, gradient norm and clipping included); under AdamW the per-coordinate step is taken in
B's coordinates and projected back (the reference code runs AdamW on R itself). Under DP-SGD each example's gradient
is clipped before the projection (its norm is at least that of the R gradient, so clipping is conservative), and the
noise, projected onto the r² directions, is the noise DP-SGD on R would add: only r² noised numbers per module, and
``ΔW`` is linear in them.

Set-up (``init="gradient"``, the default). LoRA-SB initialises ``s·B0 R0 A0`` at the best rank-r approximation of
the first full fine-tuning step ``−η·sign(G)`` (G: the gradient of the frozen weight), estimated in the reference code
on pooled training data before the data is split, outside federated learning and outside any privacy guarantee
(§37). Here the set-up is federated and costs the first two rounds, a randomised range finder (Halko, Martinsson,
Tropp, SIAM Review 2011) over the clients' gradients at the frozen model (``ΔW = 0``):

1. *Range round*: clients get ``A = Ω`` (the common initial A) and ``B = 0`` and accumulate B's gradient
   ``s·G_k Ωᵀ`` over one local pass without moving any parameter (the objective zeroes the gradients after summing
   them), then upload ``Y_k = −lr·mean gradient`` (what one full-batch SGD step would make of B). The server keeps
   ``Q``, an orthonormal basis of ``Σ p_k Y_k``.
2. *Projection round*: clients get ``B = Q`` and ``A = 0`` and upload ``Z_k = −lr·s·Qᵀ G_k`` the same way. The server
   forms ``T = Q (Σ p_k Z_k) / s ≈ −lr·G`` (exact when G has rank ≤ r), takes its SVD ``T = U S Vᵀ`` (factored,
   never m×n), and sets ``B0 = U``, ``A0 = Vᵀ``, ``R0 = init_scale·diag(S)/s``, so that ``s·B0 R0 A0 =
   init_scale·trunc_r(T)``.

The sign of G has no linear sketch (it is not an average of the clients' data), so the federated set-up targets the
gradient step ``−lr·G`` (the first full fine-tuning step under SGD) instead of LoRA-SB's ``−η·sign(G)``; the factors
are computed once on the server and broadcast (the reference code recomputes a randomised SVD on every client after
``manual_seed(42)`` and relies on identical results). Both set-up rounds are ordinary rounds: their uploads are
averages (robust aggregators, user-level DP noise and secure aggregation apply, and their privacy cost is counted),
heads keep their initial values during them (``setup_heads=true`` trains them along; measured on the tiny test
model, the gradient at the initial model gave the better start), and the global model's LoRA part stays the initial
one until the second ends. Non-IID clients' gradient sketches can point away from each other, so the round policy's
direction check (``min_cosine``) may leave a client out of the set-up (seen on the tiny test model's Dirichlet split:
cosines −0.38, −0.59); ``--min-cosine null`` keeps everyone. A round whose
replies are all rejected repeats its phase (the phase is read from the server state, not from the round number).
``init="random"`` skips the set-up: ``A0`` = the initial A with orthonormalised rows, ``B0`` random orthonormal
columns (seeded by run seed and module), ``R0 = 0``. The scale ``s`` is the layout's (the reference code forces
``alpha = r``, ``s = 1``; R absorbs any scale).

What travels. Up: ``R_k`` (``r²`` per module, float32) and heads; in the set-up rounds ``Y_k`` (``m·r``) then
``Z_k`` (``r·n``). Down: R and heads; a client that has not yet taken part also gets ``A0`` and ``B0``
(``r(m+n)``) and keeps them (``cache_basis``; ``false`` sends them every round). The server counts a client as
holding them once it has aggregated that client's reply in a round with at least two replies: a round's only reply
may be one that was never the client's (the stand-in through which server-side DP releases noise in a round with no
accepted reply, or secure aggregation's single mean), and a client wrongly counted would never get the basis again;
the price is a basis sent again after a one-reply round. Mixed client ranks are not supported (R is r×r for
everyone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import LowRankTerm, SVDFactors, complete_rows, factored_svd
from fedlora.adapters.state import AdapterState, LoraModuleSpec, namespaced, subset
from fedlora.client.objectives import Objective
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ServerState,
    Stage,
    TrainStats,
    derive_seed,
    option,
    register_method,
)

R_NS = "fed_sb.r"
"""R per module (r×r, float32): the server's, downloaded; a client's trained R_k, uploaded."""
A0_NS = "fed_sb.a0"
"""A0 per module (r×n, orthonormal rows) as it travels to and stays with a client (the server keeps it as A)."""
B0_NS = "fed_sb.b0"
"""B0 per module (m×r, orthonormal columns): server tensor, downloaded once, kept by the client."""
Q_NS = "fed_sb.q"
"""The range round's orthonormal basis Q per module (m×r): server tensor until the set-up ends."""
GRAD_NS = "fed_sb.grad"
"""A client's running sum of a probed factor's gradient during a set-up round (never travels)."""

HOLDERS = "basis_holders"
"""``server.meta`` key: sorted ids of the clients known to hold A0 and B0."""


@dataclass(frozen=True)
class FedSBOptions:
    init: str = option(
        "gradient",
        "how A0, B0, R0 are set: gradient (two federated set-up rounds sketch the clients' gradient at the frozen "
        "model; s*B0 R0 A0 = the best rank-r approximation of -lr*G, LoRA-SB's init with the gradient step in place "
        "of its sign step) or random (orthonormalised initial A, random orthonormal B, R0 = 0; no set-up rounds)",
        choices=("gradient", "random"),
    )
    init_scale: float = option(
        1.0,
        "multiplier of R0 after the gradient set-up (0: start at a zero product in the gradient's subspace)",
        minimum=0.0,
    )
    setup_heads: bool = option(
        False,
        "train (and average) the heads during the set-up rounds, the gradient being summed along their trajectory; "
        "false (default) keeps them at their initial values, so the gradient is the initial model's (the reference)",
    )
    cache_basis: bool = option(
        True,
        "send A0, B0 to a client once and let it keep them (the paper's communication); false sends them every round",
    )


def sb_factors(
    svd: SVDFactors, rank: int, scale: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0, B0, R0)`` with ``s·B0 R0 A0`` the best rank-``rank`` approximation of the matrix ``svd`` describes:
    ``A0`` (r×n) orthonormal rows, ``B0`` (m×r) orthonormal columns, ``R0 = diag(S_r)/s`` diagonal, non-negative and
    non-increasing. Missing directions (fewer than ``rank`` singular values) are completed with random orthonormal
    rows/columns and a zero entry of R0, so the product is unchanged."""
    m, n = svd.u.shape[0], svd.vh.shape[1]
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(m, n)}: no orthonormal basis of that size")
    k = min(rank, svd.s.shape[0])
    a0 = torch.zeros(rank, n)
    b0 = torch.zeros(m, rank)
    a0[:k] = svd.vh[:k].float()
    b0[:, :k] = svd.u[:, :k].float()
    if k < rank:
        a0[k:] = complete_rows(a0[:k], rank - k, generator)
        b0[:, k:] = complete_rows(b0[:, :k].T.contiguous(), rank - k, generator).T
    diag = torch.zeros(rank)
    diag[:k] = svd.s[:k].float().clamp_min(0.0) / scale
    return a0, b0, torch.diag(diag)


def orthonormal_rows(a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthonormal rows spanning the row space of ``a`` (r×n, r <= n), each row's sign kept where it can be (a row
    of ``a`` that depends on the previous ones is replaced by a random orthonormal completion)."""
    q, r = torch.linalg.qr(a.float().T, mode="reduced")
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    rows = (q * sign).T.contiguous()
    keep = torch.diagonal(r).abs() > 1e-6 * max(float(r.abs().max()), 1e-30)
    if bool(keep.all()):
        return rows
    out = rows[keep]
    return torch.cat([out, complete_rows(out, a.shape[0] - out.shape[0], generator)])


class GradientSum(Objective):
    """A set-up round's probe: sums the gradient of each probed tensor into ``buffers`` and zeroes it, so no
    parameter moves and every step's gradient is taken at the start point."""

    def __init__(self, buffers: Mapping[str, torch.Tensor]) -> None:
        self.buffers = dict(buffers)

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        for key, buf in self.buffers.items():
            g = grads.get(key)
            if g is not None:
                buf.add_(g.detach().float())
                g.zero_()


class ColumnSubspace(Objective):
    """Keeps each B in the column space of its fixed orthonormal ``B0``: the gradient is projected before the
    optimiser step (``g ← B0 B0ᵀ g``) and B after it (``B ← B0 B0ᵀ B``), so B stays ``B0·R``."""

    def __init__(self, bases: Mapping[str, torch.Tensor]) -> None:
        self.bases = {k: v.detach().float() for k, v in bases.items()}

    @staticmethod
    def _project(basis: torch.Tensor, t: torch.Tensor) -> None:
        t.copy_((basis @ (basis.T @ t.float())).to(t.dtype))

    def after_backward(self, grads: Mapping[str, torch.Tensor]) -> None:
        for key, basis in self.bases.items():
            if key in grads:
                self._project(basis, grads[key])

    def after_step(self, params: Mapping[str, torch.Tensor], lr: float) -> None:
        for key, basis in self.bases.items():
            if key in params:
                self._project(basis, params[key])


@register_method
class FedSB(FedMethod):
    id = "fed_sb"
    family = "aggregation (single trainable r x r matrix between fixed orthonormal A, B)"
    paper = "Singhal et al., arXiv:2502.15436 (LoRA-SB: arXiv:2411.19557)"
    up = "R (r x r), heads; set-up rounds: B-gradient sketch, then A-gradient sketch"
    down = "R, heads; A0, B0 once per client; set-up rounds: A, B probes"
    bytes_up = "r^2 + heads (set-up: m*r, then r*n)"
    bytes_down = "r^2 + heads (+ r(m+n) at a client's first participation; set-up: r(m+n) per round)"
    default_weighting = "uniform"
    Options = FedSBOptions

    def __init__(self, ctx: MethodContext, options: object = None) -> None:
        super().__init__(ctx, options)
        for spec in self.layout.modules:
            if spec.rank > min(spec.in_features, spec.out_features):
                raise ValueError(
                    f"fed_sb: module {spec.name} has rank {spec.rank} > min(in, out) = "
                    f"{min(spec.in_features, spec.out_features)}; A and B must have orthonormal rows and columns"
                )

    # ----------------------------------------------------------------- keys and phases
    @staticmethod
    def _key(ns: str, spec: LoraModuleSpec) -> str:
        return namespaced(ns, spec.name)

    def _setup_heads(self) -> tuple[str, ...]:
        """The heads trained in a set-up round (none when ``setup_heads`` is off)."""
        return self.layout.other_keys if self.options.setup_heads else ()

    def r_keys(self) -> tuple[str, ...]:
        return tuple(self._key(R_NS, s) for s in self.layout.modules)

    def phase(self, server: ServerState) -> str:
        """``range`` (first set-up round), ``project`` (second) or ``train``, from the server state."""
        first = self.layout.modules[0]
        if self._key(B0_NS, first) in server.tensors:
            return "train"
        if self._key(Q_NS, first) in server.tensors:
            return "project"
        return "range"

    @staticmethod
    def _plan_phase(plan: ClientPlan, spec: LoraModuleSpec) -> str:
        if namespaced(R_NS, spec.name) in plan.upload:
            return "train"
        return "range" if spec.b_key in plan.upload else "project"

    # ----------------------------------------------------------------- server side
    def _random_basis(self, initial: AdapterState) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for spec in self.layout.modules:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "fed_sb-basis", spec.name))
            a0 = orthonormal_rows(initial[spec.a_key], gen)
            b0 = complete_rows(torch.zeros(0, spec.out_features), spec.rank, gen).T.contiguous()
            tensors[self._key(A0_NS, spec)] = a0
            tensors[self._key(B0_NS, spec)] = b0
            tensors[self._key(R_NS, spec)] = torch.zeros(spec.rank, spec.rank)
        return tensors

    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if self.options.init == "gradient":
            return server
        basis = self._random_basis(initial)
        return self._with_basis(server, server.adapter, basis, [])

    def _with_basis(
        self, server: ServerState, adapter: AdapterState, basis: Mapping[str, torch.Tensor], holders: list[int]
    ) -> ServerState:
        """``server`` in the training phase: A = A0, B = B0·R in the adapter; B0 and R as server tensors."""
        adapter = dict(adapter)
        tensors = {k: v for k, v in server.tensors.items() if not k.startswith(Q_NS + "/")}
        for spec in self.layout.modules:
            a0, b0, r = (basis[self._key(ns, spec)] for ns in (A0_NS, B0_NS, R_NS))
            adapter[spec.a_key] = a0.to(adapter[spec.a_key].dtype)
            adapter[spec.b_key] = (b0 @ r).to(adapter[spec.b_key].dtype)
            tensors[self._key(B0_NS, spec)] = b0
            tensors[self._key(R_NS, spec)] = r.float()
        return dataclasses.replace(server, adapter=adapter, tensors=tensors, meta={**server.meta, HOLDERS: holders})

    def basis(self, server: ServerState, spec: LoraModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A0, B0)`` of a module in the training phase (float32)."""
        return server.adapter[spec.a_key].float(), server.tensors[self._key(B0_NS, spec)].float()

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        phase = self.phase(server)
        mods = self.layout.modules
        if phase == "range":  # A = Ω (the common initial A), B = 0: probe B's gradient
            download = {}
            for spec in mods:
                download[spec.a_key] = server.adapter[spec.a_key]
                download[spec.b_key] = torch.zeros_like(server.adapter[spec.b_key])
            download.update(subset(server.adapter, self.layout.other_keys))
            keys = self.layout.b_keys + self._setup_heads()
            return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys)
        if phase == "project":  # B = Q, A = 0: probe A's gradient
            download = {}
            for spec in mods:
                q = server.tensors[self._key(Q_NS, spec)]
                download[spec.a_key] = torch.zeros_like(server.adapter[spec.a_key])
                download[spec.b_key] = q.to(server.adapter[spec.b_key].dtype)
            download.update(subset(server.adapter, self.layout.other_keys))
            keys = self.layout.a_keys + self._setup_heads()
            return self.make_plan(rnd, client_id, server, download=download, upload_keys=keys)
        download = subset(server.adapter, self.layout.other_keys)
        download.update({k: server.tensors[k] for k in self.r_keys()})
        holders = set(server.meta.get(HOLDERS, []))
        if not (self.options.cache_basis and client_id in holders):
            for spec in mods:
                a0, b0 = self.basis(server, spec)
                download[self._key(A0_NS, spec)] = a0
                download[self._key(B0_NS, spec)] = b0
        upload = [*self.r_keys(), *self.layout.other_keys]
        stage = Stage(frozenset((*self.layout.b_keys, *self.layout.other_keys)))
        return self.make_plan(
            rnd,
            client_id,
            server,
            download=download,
            upload_keys=upload,
            stages=[stage],
            reference={**server.adapter, **{k: server.tensors[k] for k in self.r_keys()}},
        )

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        phase = self.phase(server)
        heads = self.layout.other_keys if phase == "train" else self._setup_heads()
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(heads, updates, w))
        if phase == "range":
            tensors = dict(server.tensors)
            for spec in self.layout.modules:
                y = self.combine((u.state[spec.b_key].float() for u in updates), w)
                q, _ = torch.linalg.qr(y, mode="reduced")
                tensors[self._key(Q_NS, spec)] = q.contiguous()
            return AggregateResult(adapter=adapter, tensors=tensors)
        if phase == "project":
            basis: dict[str, torch.Tensor] = {}
            for spec in self.layout.modules:
                s = spec.scaling()
                z = self.combine((u.state[spec.a_key].float() for u in updates), w)
                q = server.tensors[self._key(Q_NS, spec)].float()
                svd = factored_svd([LowRankTerm(b=q, a=z, coeff=1.0 / s)])  # T = Q Z / s ≈ −lr·G
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "fed_sb-complete", spec.name))
                a0, b0, r0 = sb_factors(svd, spec.rank, s, gen)
                basis[self._key(A0_NS, spec)] = a0
                basis[self._key(B0_NS, spec)] = b0
                basis[self._key(R_NS, spec)] = r0 * self.options.init_scale
            done = self._with_basis(server, adapter, basis, [])
            return AggregateResult(adapter=done.adapter, tensors=done.tensors, meta=done.meta)
        tensors = dict(server.tensors)
        for spec in self.layout.modules:
            r = self.combine((u.state[self._key(R_NS, spec)].float() for u in updates), w)  # this round's only
            _, b0 = self.basis(server, spec)
            tensors[self._key(R_NS, spec)] = r
            adapter[spec.b_key] = (b0 @ r).to(server.adapter[spec.b_key].dtype)
        holders = set(server.meta.get(HOLDERS, []))
        if self.options.cache_basis and len(updates) >= 2:  # a sole reply may not be the client's own (module docs)
            holders |= {u.client_id for u in updates}
        meta = {**server.meta, HOLDERS: sorted(holders)}
        return AggregateResult(adapter=adapter, tensors=tensors, meta=meta)

    # ----------------------------------------------------------------- client side
    def start_state(self, plan: ClientPlan, initial: AdapterState, personal: AdapterState | None) -> AdapterState:
        state = super().start_state(plan, initial, personal)
        for spec in self.layout.modules:
            phase = self._plan_phase(plan, spec)
            if phase == "range":
                state[namespaced(GRAD_NS, spec.b_key)] = torch.zeros(spec.b_shape(), dtype=torch.float32)
            elif phase == "project":
                state[namespaced(GRAD_NS, spec.a_key)] = torch.zeros(spec.a_shape(), dtype=torch.float32)
            else:
                a0, b0 = state.get(self._key(A0_NS, spec)), state.get(self._key(B0_NS, spec))
                if a0 is None or b0 is None:
                    raise ValueError(
                        f"fed_sb: client {plan.client_id} holds no A0/B0 of {spec.name} and the plan does not carry "
                        "them (its kept state was lost?); run with --method-option cache_basis=false"
                    )
                r = state[self._key(R_NS, spec)].float()
                state[spec.a_key] = a0.to(initial[spec.a_key].dtype)
                state[spec.b_key] = (b0.float() @ r).to(initial[spec.b_key].dtype)
        return state

    def objective(self, plan: ClientPlan, start: AdapterState, personal: AdapterState | None) -> Objective | None:
        spec = self.layout.modules[0]
        if self._plan_phase(plan, spec) != "train":
            probed = self.layout.b_keys if spec.b_key in plan.upload else self.layout.a_keys
            return GradientSum({k: start[namespaced(GRAD_NS, k)] for k in probed})
        return ColumnSubspace({s.b_key: start[self._key(B0_NS, s)] for s in self.layout.modules})

    def finish(
        self, plan: ClientPlan, trained: AdapterState, personal: AdapterState | None, stats: TrainStats
    ) -> tuple[AdapterState, AdapterState | None]:
        spec = self.layout.modules[0]
        if self._plan_phase(plan, spec) != "train":
            if stats.steps <= 0:
                raise ValueError("fed_sb: a set-up round needs at least one local step")
            factor = -stats.lr / stats.steps  # one full-batch SGD step of the local lr
            upload = subset(trained, self._setup_heads())
            for k in plan.upload_keys:
                if k not in upload:
                    upload[k] = (trained[namespaced(GRAD_NS, k)] * factor).to(plan.upload[k].dtype)
            return upload, None
        upload = subset(trained, self.layout.other_keys)
        keep: AdapterState = {}
        for s in self.layout.modules:
            a0, b0 = trained[self._key(A0_NS, s)], trained[self._key(B0_NS, s)]
            upload[self._key(R_NS, s)] = (b0.float().T @ trained[s.b_key].float()).contiguous()
            keep[self._key(A0_NS, s)] = a0.clone()  # the client's own copy (the download may be shared)
            keep[self._key(B0_NS, s)] = b0.clone()
        return upload, keep if self.options.cache_basis else None
