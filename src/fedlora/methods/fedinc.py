"""FedInc: cluster the clients' rank-one terms with k-means; the centroids are the new adapter's ranks (METHODS.md §10).

Paper: H. Qin, Y. Li, "FedInc: One-shot Federated Tuning for Collaborative Incident Recognition", ICANN 2024 (LNCS,
pp. 174-185). No arXiv id, no public code, and the paper text was not available (METHODS.md §10, §35): this follows
the survey's eq. (8), and every choice the paper leaves open is documented below (the tunable ones as options).

Client ``k`` trains its LoRA (``A_k`` ``r_k×n``, ``B_k`` ``m×r_k``) and uploads it. Per module the server turns every
rank of every client into a vector ``z_{k,i} = [A_k[i, :], B_k[:, i]ᵀ] ∈ R^{n+m}`` (the survey's ``C_k = [A_k, B_kᵀ]``),
clusters the ``Σ_k r_k`` vectors with Euclidean k-means into ``N`` clusters and writes cluster ``j``'s centroid
``μ_j`` as rank ``j`` of the global adapter: ``A[j, :] = μ_j[:n]``, ``B[:, j] = μ_j[n:]``. The heads are averaged.
Up: A, B, heads (``r_k(m+n)`` per module). Down: the global adapter at the client's rank (``r_k(m+n)``), heads.

Choices the paper leaves open (all documented; the tunable ones are options):

* **Rounds.** FedInc is one-shot (``rounds=1`` reproduces it, from the common initial adapter). With more rounds
  every round repeats it, each client continuing from the clustered adapter.
* **N** is the global adapter's rank ``r`` (``lora_r``) per module, so the adapter keeps its shape; clients may train
  lower ranks (``client_ranks``; a client of rank ``r_k`` receives the first ``r_k`` ranks, ``B`` rescaled by
  ``s/s_k`` so its product is theirs, as FlexLoRA does). With fewer vectors than ``N`` (or clusters left empty by
  k-means) the missing ranks get a fresh LoRA row of A (``init_lora_weights``, seeded) and a zero column of B: the
  product is unchanged and the rank can train again.
* **Scale.** A client's scale ``s_k`` is folded in first: both halves of its vectors are multiplied by
  ``sqrt(s_k/s)`` (``s`` the global scale), so every vector's rank-one term is in the global adapter's units.
* **Scale ambiguity** (``balance``, default on): ``(c·a, b/c)`` is the same rank-one term as ``(a, b)`` but a different
  point, so each pair is rescaled to ``‖a‖ = ‖b‖`` before clustering (a zero term is the zero vector); off clusters
  the raw concatenations, as the survey writes them. **Sign** (``sign``, default on): ``(−a, −b)`` is the same term
  too, so each pair is flipped to make its entry of largest magnitude positive (the first such entry on ties).
* **k-means**: :func:`fedlora.methods.fl_tac.kmeans` (k-means++ seeding, ``n_init`` restarts, Lloyd iterations,
  float64), seeded by ``derive_seed(seed, "fedinc", round, module)``, vectors in client-id order. The assignment is
  k-means'; each centroid is then the mean of its members weighted by their clients' weights ``p_k``.
* **Weighting** (``cluster_weight``): a centroid's term is one rank of the adapter, so ``N`` centroids sum, they do not
  average. ``members`` (default) multiplies centroid ``j``'s halves by ``sqrt(W_j)``, ``W_j`` = the total weight
  ``Σ p_k`` of its members, so with one vector per cluster ``Σ_j B[:, j]A[j, :] = Σ_k p_k (s_k/s) B_k A_k`` (the
  weighted mean of the clients' terms, FedAvg's scale) and identical uploads come back unchanged. ``none`` uses the
  raw centroids (the survey's formula: with one vector per cluster that is the *sum* ``Σ_k (s_k/s) B_k A_k``). Within
  a cluster the A-part and B-part are averaged separately, so a cluster of different terms keeps FedIT's
  discordance. ``p_k`` is the run's weighting (``num_examples`` by default; the paper's is unknown).
* **Order**: the ranks are sorted by the size ``‖B[:, j]‖·‖A[j, :]‖`` of their term, largest first (ties: the cluster
  holding the earliest vector), so a client of lower rank receives the largest terms.

Robust aggregators are refused (an outlying vector forms a cluster of its own and becomes a rank of the adapter);
``max_weight_ratio`` caps ``p_k``. The balanced adapter has A and B of equal norms per rank, unlike peft's
initialisation; the product is what the method defines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.algebra import fresh_lora_factors
from fedlora.adapters.state import LoraModuleSpec, subset
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
from fedlora.methods.fl_tac import kmeans


@dataclass(frozen=True)
class FedIncOptions:
    balance: bool = option(
        True, "rescale each rank pair to ||a|| = ||b|| before clustering (the term is unchanged); false: raw vectors"
    )
    sign: bool = option(True, "flip each rank pair so that its largest-magnitude entry is positive (term unchanged)")
    cluster_weight: str = option(
        "members",
        "a centroid's weight: members (sqrt of its members' total client weight on both halves: one vector per "
        "cluster gives the weighted mean of the clients' terms) or none (raw centroids, the survey: their sum)",
        choices=("members", "none"),
    )
    n_init: int = option(10, "k-means restarts (k-means++ seeding each); the lowest inertia wins", minimum=1)
    max_iter: int = option(300, "cap on Lloyd iterations per restart", minimum=1)


def rank_vectors(a: torch.Tensor, b: torch.Tensor, fold: float, *, balance: bool, sign: bool) -> torch.Tensor:
    """The ``r`` vectors ``[a_i·c_i, b_i/c_i]·sqrt(fold)`` (float64, ``r×(n+m)``) of one client's module: ``fold`` is
    the scale folded in, ``c_i = sqrt(‖b_i‖/‖a_i‖)`` balances the halves (``balance``), and the pair is negated when
    its largest-magnitude entry is negative (``sign``). Every vector's term ``b_i a_iᵀ`` is ``fold·B[:, i]A[i, :]``."""
    rows = a.double() * math.sqrt(fold)
    cols = b.double().T * math.sqrt(fold)
    if balance:
        na, nb = rows.norm(dim=1), cols.norm(dim=1)
        live = (na > 0) & (nb > 0)
        c = torch.where(live, (nb / na.where(live, torch.ones_like(na))).sqrt(), torch.zeros_like(na))
        rows = rows * c[:, None]
        cols = cols * torch.where(live, 1 / c.where(live, torch.ones_like(c)), torch.zeros_like(c))[:, None]
    z = torch.cat([rows, cols], dim=1)
    if sign:
        idx = z.abs().argmax(dim=1, keepdim=True)
        flip = torch.where(z.gather(1, idx) < 0, -1.0, 1.0).to(z.dtype)
        z = z * flip
    return z


@register_method
class FedInc(FedMethod):
    id = "fedinc"
    family = "aggregation (rank-wise clustering, one-shot)"
    paper = "Qin & Li, ICANN 2024 (LNCS pp. 174-185)"
    up = "A, B at the client's rank, heads"
    down = "the clustered adapter's first r_k ranks, heads"
    bytes_up = "r_k(m+n) + heads"
    bytes_down = "r_k(m+n) + heads (N = r clusters per module)"
    default_weighting = "num_examples"
    supports_mixed_ranks = True
    supports_robust_aggregation = False
    robust_refusal = (
        "it clusters the clients' individual rank-one terms with k-means: an outlying term forms a cluster of its "
        "own and becomes a rank of the global adapter"
    )
    Options = FedIncOptions

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        rank = self.client_rank(client_id, server)
        download = subset(server.adapter, self.layout.other_keys)
        for spec in self.layout.modules:
            r = spec.rank if rank is None else rank
            a, b = server.adapter[spec.a_key], server.adapter[spec.b_key]
            download[spec.a_key] = a[:r].clone()
            download[spec.b_key] = (b[:, :r].float() * (spec.scaling() / spec.scaling(r))).to(b.dtype)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=self.layout.all_keys, rank=rank)

    def cluster(
        self, rnd: int, spec: LoraModuleSpec, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's new ``(A, B)`` (float32, global rank) from the round's uploads."""
        o = self.options
        order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
        vectors, owner = [], []
        for i in order:
            u = updates[i]
            fold = self.scale_of(u, spec) / spec.scaling()
            z = rank_vectors(u.state[spec.a_key], u.state[spec.b_key], fold, balance=o.balance, sign=o.sign)
            vectors.append(z)
            owner.extend([i] * z.shape[0])
        points = torch.cat(vectors)
        n, size = spec.in_features, spec.rank
        k = min(size, points.shape[0])
        labels, _ = kmeans(
            points, k, n_init=o.n_init, max_iter=o.max_iter, seed=derive_seed(self.seed, "fedinc", rnd, spec.name)
        )
        terms = []  # (size of the term, first member, a, b)
        for j in sorted(set(labels)):
            members = [v for v, lab in enumerate(labels) if lab == j]
            w = torch.tensor([float(weights[owner[v]]) for v in members], dtype=torch.float64)
            total = float(w.sum())
            mu = (w[:, None] * points[members]).sum(0) / total if total > 0 else points[members].mean(0)
            if o.cluster_weight == "members":
                mu = mu * math.sqrt(max(total, 0.0))
            a_row, b_col = mu[:n], mu[n:]
            terms.append((float(a_row.norm() * b_col.norm()), members[0], a_row, b_col))
        terms.sort(key=lambda t: (-t[0], t[1]))
        a_new = torch.zeros(size, n, dtype=torch.float64)
        b_new = torch.zeros(spec.out_features, size, dtype=torch.float64)
        for j, (_, _, a_row, b_col) in enumerate(terms):
            a_new[j], b_new[:, j] = a_row, b_col
        if len(terms) < size:  # ranks left without a cluster: fresh A rows, zero B columns (the product is unchanged)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "fedinc-fill", rnd, spec.name))
            fill, _ = fresh_lora_factors(spec.out_features, n, size - len(terms), gen, init=self.ctx.init_lora_weights)
            a_new[len(terms) :] = fill.double()
        return a_new.float(), b_new.float()

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        w = self.weights(updates)
        adapter = dict(server.adapter)
        adapter.update(self.average_keys(self.layout.other_keys, updates, w))
        for spec in self.layout.modules:
            a, b = self.cluster(rnd, spec, updates, w)
            adapter[spec.a_key] = a.to(server.adapter[spec.a_key].dtype)
            adapter[spec.b_key] = b.to(server.adapter[spec.b_key].dtype)
        return AggregateResult(adapter=adapter)
