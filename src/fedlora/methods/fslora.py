"""FSLoRA: Federated Sketching LoRA — each client trains a random sketch of the global adapter's rank slots (§42).

Paper: W. Fang, D.-J. Han, L. Yuan, S. Hosseinalipour, C. G. Brinton, "Federated Sketching LoRA: A Flexible Framework
for Heterogeneous Collaborative Fine-Tuning of LLMs", arXiv:2501.19389. Reference code:
wenzhifang/Federated-Sketching-LoRA-Implementation@ac24177 (``src/LoRA_Sketching.py``).

The server keeps one global LoRA of rank r (``B`` m×r, ``A`` r×n) and the heads. Client i has a budget ``k_i ≤ r``
(its rank in ``client_ranks``; default r). Each round the server draws, per module, a uniformly random index set
``I_i ⊂ {0..r−1}`` with ``|I_i| = k_i`` (seeded by run seed, round, client and module, so plan and aggregation draw
the same set and a resumed run draws it again), the same for A and B of that module. The sketch is
``S_i = (r/k_i)·diag(1[j ∈ I_i])`` (``E[S_i] = I``) and the client's model is ``W0 + s·B S_i A =
W0 + s·(r/k_i)·B[:, I_i] A[I_i, :]``: a rank-``k_i`` LoRA with the factor ``r/k_i`` folded into its scale
(``ModuleRank(k_i, s·r/k_i)`` in the plan, whatever the alpha rule: the alpha rule only fixes the global ``s``).

* Down: the sketched sub-matrices ``A[I_i, :]``, ``B[:, I_i]`` (``k_i(m+n)`` per module) and the heads.
* Client: trains exactly those sub-matrices and the heads (continue, a fresh optimiser per round), uploads them:
  ``k_i(m+n)`` per module and the heads. Every other entry of the global adapter is untouched by construction.
* Server: scatter each reply back into its rank slots and take one server-optimiser step with the gradient
  ``g = Σ_i p_i·mask_i ⊙ (θ − θ_i)`` (``p_i = 1/K`` by default: the reference divides by the number of clients
  sampled, **not** by the number that touched an entry; here K counts the accepted replies). ``server_optimizer=sgd``:
  ``θ ← θ − η·g``; with ``η = 1`` and ``k_i = r`` for all this is FedIT with uniform weights. ``adamw``: torch's
  AdamW (the reference's server optimiser; betas 0.9/0.999, eps 1e-8), its moments and step count in the server's
  named tensors and meta (``fslora.exp_avg/…``, ``fslora.exp_avg_sq/…``, ``fslora.steps``), so resume is exact.
  With a robust ``aggregator`` the masked differences ``mask_i ⊙ (θ_i − θ)`` are combined coordinate-wise (a rank
  slot that fewer than half of the round's clients drew has median 0 and does not move, as FLASC's sparse uploads).

Reference-code bugs not copied (METHODS.md §42): the sketch is applied (the reference compares the literal strings
``'lora_B'``/``'lora_A'`` with full parameter names, never equal, so every client trains the full rank whatever
``k_i``: plain FedAvg with a server AdamW); the index set is the same for A and B of a module (the reference draws one
per tensor); the sub-matrices are trained directly at scale ``s·r/k_i``, which is exactly training B under the forward
``B S A`` for any optimiser (the reference's ``S²`` gradient trick is exact for SGD only, and its weight decay acts on
``B S``).

Choices the specification leaves open, each an option:

* ``server_optimizer`` / ``server_lr``: ``sgd`` with η = 1 by default (every round then moves the model as far as the
  clients did; the reference's AdamW at 3e-4 barely moves a short run); ``adamw`` uses the reference's lr 3e-4 and
  weight decay 0.01 unless ``server_lr`` / ``weight_decay`` say otherwise (that decay shrinks every adapter tensor
  every round, heads included).
* ``index_draw``: one index set per module (default) or one per client shared by all its modules (the paper's
  notation ``S_i`` has no module index; unverified).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, LoraModuleSpec, namespaced
from fedlora.methods.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ModuleRank,
    ServerState,
    derive_seed,
    option,
    register_method,
)

EXP_AVG = "fslora.exp_avg"
"""Namespace of the server AdamW's first moments in ``ServerState.tensors``."""
EXP_AVG_SQ = "fslora.exp_avg_sq"
"""Namespace of its second moments."""
MOMENTS = (EXP_AVG, EXP_AVG_SQ)
STEPS = "fslora.steps"
"""``ServerState.meta`` key: server AdamW steps taken so far."""


@dataclass(frozen=True)
class FSLoRAOptions:
    server_optimizer: str = option(
        "sgd", "the server step on the masked pseudo-gradient: sgd, or adamw (the reference)", choices=("sgd", "adamw")
    )
    server_lr: float | None = option(
        None, "server learning rate (default: 1.0 for sgd, 3e-4 for adamw as the reference)", minimum=0.0
    )
    weight_decay: float = option(0.01, "decoupled weight decay of the server adamw (torch's default)", minimum=0.0)
    index_draw: str = option(
        "per_module",
        "the random rank slots a client trains: drawn per module (default) or one set per client for all its modules",
        choices=("per_module", "per_client"),
    )


def sketch_indices(rank: int, budget: int, generator: torch.Generator) -> torch.Tensor:
    """``budget`` distinct rank slots of ``0..rank-1`` drawn uniformly (sorted, int64)."""
    if not 1 <= budget <= rank:
        raise ValueError(f"sketch budget {budget} must be in 1..{rank}")
    if budget == rank:
        return torch.arange(rank)
    return torch.randperm(rank, generator=generator)[:budget].sort().values


def sketch_matrix(rank: int, indices: torch.Tensor) -> torch.Tensor:
    """``S = (r/k)·diag(1[j ∈ I])`` (r×r), the sketch a client with index set ``I`` (``k = |I|``) applies."""
    diag = torch.zeros(rank, dtype=torch.float64)
    diag[indices] = rank / len(indices)
    return torch.diag(diag)


@register_method
class FSLoRA(FedMethod):
    id = "fslora"
    family = "heterogeneous ranks (random rank sketches)"
    paper = "Fang et al., arXiv:2501.19389"
    up = "the client's sketched sub-matrices A[I_k, :], B[:, I_k], heads"
    down = "the sketched sub-matrices A[I_k, :], B[:, I_k] of the global adapter, heads"
    bytes_up = "r_k(m+n) + heads (r_k: the client's sketch budget)"
    bytes_down = "r_k(m+n) + heads (r_k: the client's sketch budget)"
    default_weighting = "uniform"
    supports_mixed_ranks = True
    Options = FSLoRAOptions

    # ----------------------------------------------------------------- sketches
    def lr(self) -> float:
        o = self.options
        if o.server_lr is not None:
            return o.server_lr
        return 1.0 if o.server_optimizer == "sgd" else 3e-4

    def indices(self, rnd: int, client_id: int, spec: LoraModuleSpec, budget: int) -> torch.Tensor:
        """The rank slots client ``client_id`` trains in module ``spec`` in round ``rnd`` (a seeded draw)."""
        where = spec.name if self.options.index_draw == "per_module" else ""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "fslora.sketch", rnd, client_id, where))
        return sketch_indices(spec.rank, budget, gen)

    def budget(self, client_id: int, server: ServerState | None, spec: LoraModuleSpec) -> int:
        rank = self.client_rank(client_id, server)
        return spec.rank if rank is None else rank

    # ----------------------------------------------------------------- server side
    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if self.options.server_optimizer != "adamw":
            return server
        tensors = dict(server.tensors)
        for key in self.layout.all_keys:
            for ns in MOMENTS:
                tensors[namespaced(ns, key)] = torch.zeros(server.adapter[key].shape, dtype=torch.float32)
        return dataclasses.replace(server, tensors=tensors, meta={**server.meta, STEPS: 0})

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        download: AdapterState = {k: server.adapter[k] for k in self.layout.other_keys}
        ranks = {}
        for spec in self.layout.modules:
            k = self.budget(client_id, server, spec)
            idx = self.indices(rnd, client_id, spec, k)
            download[spec.a_key] = server.adapter[spec.a_key][idx].clone()
            download[spec.b_key] = server.adapter[spec.b_key][:, idx].clone()
            ranks[spec.name] = ModuleRank(k, spec.scaling() * spec.rank / k)  # s·r/k: the sketch folded in
        plan = self.make_plan(
            rnd,
            client_id,
            server,
            download=download,
            upload_keys=self.layout.all_keys,
            rank=self.client_rank(client_id, server),
        )
        return dataclasses.replace(plan, ranks=ranks)

    def masked_differences(self, rnd: int, server: ServerState, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """``mask_i ⊙ (θ_i − θ)`` per key, float32 at the global shapes: the client's sub-matrices scattered back
        into the rank slots it drew, zero elsewhere (heads: the plain difference)."""
        out = {k: update.state[k].float() - server.adapter[k].float() for k in self.layout.other_keys}
        for spec in self.layout.modules:
            a, b = server.adapter[spec.a_key].float(), server.adapter[spec.b_key].float()
            idx = self.indices(rnd, update.client_id, spec, int(update.state[spec.a_key].shape[0]))
            da, db = torch.zeros_like(a), torch.zeros_like(b)
            da[idx] = update.state[spec.a_key].float() - a[idx]
            db[:, idx] = update.state[spec.b_key].float() - b[:, idx]
            out[spec.a_key], out[spec.b_key] = da, db
        return out

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        diffs = [self.masked_differences(rnd, server, u) for u in updates]
        adapter = dict(server.adapter)
        tensors = dict(server.tensors)
        steps = int(server.meta.get(STEPS, 0))
        sq = 0.0
        for key in self.layout.all_keys:
            grad = -self.combine((d[key] for d in diffs), w)  # g = Σ p_i mask_i ⊙ (θ − θ_i)
            sq += float(grad.square().sum())
            theta = server.adapter[key]
            if self.options.server_optimizer == "sgd":
                new = theta.float() - self.lr() * grad
            else:
                new, moments = self._adamw(
                    theta, grad, {ns: server.tensors[namespaced(ns, key)] for ns in MOMENTS}, steps
                )
                tensors.update({namespaced(ns, key): v for ns, v in moments.items()})
            adapter[key] = new.to(theta.dtype)
        if self.options.server_optimizer == "sgd":
            return AggregateResult(adapter=adapter, metrics={"pseudo_gradient_norm": sq**0.5})
        meta = {**server.meta, STEPS: steps + 1}
        return AggregateResult(adapter=adapter, tensors=tensors, meta=meta, metrics={"pseudo_gradient_norm": sq**0.5})

    def _adamw(
        self, theta: torch.Tensor, grad: torch.Tensor, moments: dict[str, torch.Tensor], steps: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step of torch's AdamW from the stored moments (``{namespace: tensor}``) after ``steps`` steps:
        the new θ (float32) and moments."""
        p = torch.nn.Parameter(theta.detach().float().clone())
        p.grad = grad.float().clone()
        opt = torch.optim.AdamW(
            [p], lr=self.lr(), betas=(0.9, 0.999), eps=1e-8, weight_decay=self.options.weight_decay, foreach=False
        )
        opt.state[p] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": moments[EXP_AVG].float().clone(),
            "exp_avg_sq": moments[EXP_AVG_SQ].float().clone(),
        }
        opt.step()
        return p.detach(), {EXP_AVG: opt.state[p]["exp_avg"], EXP_AVG_SQ: opt.state[p]["exp_avg_sq"]}
