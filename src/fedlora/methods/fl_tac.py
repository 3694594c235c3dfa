"""FL-TAC: the server clusters the submitted adapters with k-means and averages within each cluster (METHODS.md §23).

Paper: S. Ping, Y. Mao, Y. Liu, X.-P. Zhang, W. Ding, "FL-TAC: Enhanced Fine-Tuning in Federated Learning via
Low-Rank, Task-Specific Adapter Clustering", ICLR 2024 workshop, arXiv:2404.15384 (reference code
``siqi2000/FL-TAC@5301f1e``, ``fltac/server.py:cluster_and_aggregate``; a 2026 re-release by the first author).

Each client trains its adapter (LoRA A, B and the heads: ``layout.all_keys``) and uploads it with its sample count.
The server flattens every submission (concatenation of all its tensors in sorted key order, float32), runs
Euclidean k-means with ``N = num_clusters`` clusters on the raw flat vectors, and sets, per cluster ``c``,
``θ_c = Σ_{v∈c} (n_v / Σ_{u∈c} n_u) θ_v`` (A, B and heads separately; the weighting is the run's, default
``num_examples`` as in the reference code). Every client of a cluster receives ``θ_c`` next time and continues
training it. When there are at most ``N`` submissions, each one is its own cluster (so the server is the identity).
Up: A, B, heads (``r(m+n)`` per module + heads). Down: the client's cluster adapter (the same size).

Choices the paper and the reference code leave open (all documented, the tunable ones as options):

* **One adapter per client.** The paper lets a client hold one adapter per local task; here a client is one task
  (one submission per client and round). ``N`` (``num_clusters``) is the known number of tasks, an input.
* **k-means.** Written here in torch (no scikit-learn): ``n_init`` restarts, each with k-means++ seeding (the first
  centre uniform, every further one drawn with probability ∝ squared distance to the nearest chosen centre; when all
  those distances are zero, uniform) followed by Lloyd iterations until the assignment no longer changes (at most
  ``max_iter``); the restart with the lowest inertia wins (the first on ties). Distances are computed in float64 on
  the float32 flat vectors; ties in the assignment go to the lower centre; a centre that loses all its points keeps
  its position (the cluster ends up empty and is dropped, so fewer than ``N`` clusters may come out). The random
  draws are seeded by ``derive_seed(seed, "fl_tac", round)`` (the reference code reuses one ``random_state`` every
  round) and the submissions are ordered by client id first, so the result does not depend on reply order.
* **Stable cluster ids.** Clusters are numbered by their smallest client id (cluster 0 holds the lowest client id
  of all, and so on), which is deterministic and keeps ids as stable across rounds as the membership allows.
* **State.** ``ServerState.tensors`` holds each cluster's adapter under ``"cluster<j>/<key>"``; ``meta["assignment"]``
  maps each client id (a string) to its cluster. A client absent from a round keeps the cluster adapter it was last
  given (the reference code's clients hold their adapters between rounds): the server keeps that cluster's adapter
  as long as some absent client still points to it, numbered among this round's clusters by the same smallest-id
  rule, so more than ``N`` adapters may be held under partial participation.
* **Clients never assigned** start from ``unassigned="global"``: ``server.adapter``, the sample-weighted average of
  all of the latest round's submissions (the initial adapter before the first aggregation), or ``"initial"``: the
  common initial adapter, as in the reference code, kept under ``"initial/<key>"``.
* **Global model.** ``server.adapter`` is the sample-weighted average of all submissions of the round, so the run
  has a global model to report; each client is also evaluated with its own cluster's adapter (personalised metrics).
  ``fl_tac_clusters`` in ``metrics.jsonl`` is the number of clusters formed from the round's submissions.
* **Robust aggregators** (``aggregator=median`` or ``trimmed_mean:<beta>``) replace the average within each cluster
  and the global average by the coordinate-wise statistic (unweighted). The k-means itself is not robust: an outlying
  submission tends to form a cluster of its own, whose adapter is then that submission.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState, clone_state, namespaced, subset
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

INITIAL = "initial"


@dataclass(frozen=True)
class FLTACOptions:
    num_clusters: int = option(2, "N, the number of k-means clusters (the known number of tasks)", minimum=1)
    n_init: int = option(10, "k-means restarts (k-means++ seeding each); the lowest inertia wins", minimum=1)
    max_iter: int = option(300, "cap on Lloyd iterations per restart (scikit-learn's default)", minimum=1)
    unassigned: str = option(
        "global",
        "what a client never assigned to a cluster starts from: global (server.adapter, the average of the latest "
        "round) or initial (the common initial adapter, as in the reference code)",
        choices=("global", "initial"),
    )


def cluster_prefix(j: int) -> str:
    return f"cluster{j}"


def flatten(state: AdapterState) -> torch.Tensor:
    """All tensors of ``state`` concatenated in sorted key order, float32 (the reference code's ``flatten_state``)."""
    return torch.cat([state[k].detach().reshape(-1).float() for k in sorted(state)])


def _sq_dist(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``(S, k)`` squared Euclidean distances, one centre at a time (no ``S×k×D`` temporary)."""
    return torch.stack([(points - c).square().sum(dim=1) for c in centers], dim=1)


def _kmeans_pp(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: ``k`` centres drawn from ``points``."""
    s = points.shape[0]
    first = int(torch.randint(s, (1,), generator=gen))
    chosen = [first]
    d2 = (points - points[first]).square().sum(dim=1)
    while len(chosen) < k:
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        else:  # every point coincides with a chosen centre
            nxt = int(torch.randint(s, (1,), generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (points - points[nxt]).square().sum(dim=1))
    return points[chosen].clone()


def _lloyd(points: torch.Tensor, centers: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from ``centers`` until the assignment is stable; returns labels and inertia."""
    labels = _sq_dist(points, centers).argmin(dim=1)
    for _ in range(max_iter):
        for j in range(centers.shape[0]):
            members = labels == j
            if bool(members.any()):
                centers[j] = points[members].mean(dim=0)
        new = _sq_dist(points, centers).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    for j in range(centers.shape[0]):  # centres of the final assignment
        members = labels == j
        if bool(members.any()):
            centers[j] = points[members].mean(dim=0)
    inertia = float((points - centers[labels]).square().sum())
    return labels, inertia


def kmeans(points: torch.Tensor, k: int, *, n_init: int, max_iter: int, seed: int) -> tuple[list[int], float]:
    """Euclidean k-means of the rows of ``points``: the best of ``n_init`` k-means++/Lloyd runs (float64).

    Returns each row's cluster label (``0..k-1``; some labels may be unused) and the inertia (sum of squared
    distances to the assigned centres)."""
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError("kmeans needs a non-empty (S, D) matrix")
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"kmeans: k={k} must be in 1..{points.shape[0]} (the number of points)")
    x = points.double()
    gen = torch.Generator().manual_seed(seed)
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(n_init):
        labels, inertia = _lloyd(x, _kmeans_pp(x, k, gen), max_iter)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    assert best is not None
    return [int(v) for v in best[0]], best[1]


@register_method
class FLTAC(FedMethod):
    id = "fl_tac"
    family = "clustered (k-means of adapters, per-cluster FedAvg)"
    paper = "Ping et al., ICLR 2024 workshop, arXiv:2404.15384"
    up = "A, B, heads"
    down = "the A, B, heads of the client's cluster"
    bytes_up = "r(m+n) + heads"
    bytes_down = "r(m+n) + heads"
    default_weighting = "num_examples"
    has_global_model = True
    has_personal_state = True
    Options = FLTACOptions

    # ----------------------------------------------------------------- server state
    def init_server(self, initial: AdapterState) -> ServerState:
        server = super().init_server(initial)
        if self.options.unassigned == INITIAL:
            tensors = {namespaced(INITIAL, k): v.clone() for k, v in server.adapter.items()}
            server = dataclasses.replace(server, tensors=tensors)
        return server

    def assigned_adapter(self, client_id: int, server: ServerState) -> AdapterState:
        """The adapter client ``client_id`` receives: its cluster's, or the unassigned start."""
        keys = self.layout.all_keys
        cluster = server.meta.get("assignment", {}).get(str(client_id))
        if cluster is not None:
            prefix = cluster_prefix(int(cluster))
            return {k: server.tensors[namespaced(prefix, k)] for k in keys}
        if self.options.unassigned == INITIAL:
            return {k: server.tensors[namespaced(INITIAL, k)] for k in keys}
        return subset(server.adapter, keys)

    def plan(self, rnd: int, client_id: int, server: ServerState) -> ClientPlan:
        download = self.assigned_adapter(client_id, server)
        return self.make_plan(rnd, client_id, server, download=download, upload_keys=self.layout.all_keys)

    # ----------------------------------------------------------------- aggregation
    def cluster_labels(self, rnd: int, updates: Sequence[ClientUpdate]) -> list[int]:
        """k-means labels of ``updates`` (in the given order); each submission alone when there are at most N."""
        n = self.options.num_clusters
        if len(updates) <= n:
            return list(range(len(updates)))
        points = torch.stack([flatten(u.state) for u in updates])
        labels, _ = kmeans(
            points,
            n,
            n_init=self.options.n_init,
            max_iter=self.options.max_iter,
            seed=derive_seed(self.seed, "fl_tac", rnd),
        )
        return labels

    def aggregate(self, rnd: int, server: ServerState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        keys = self.layout.all_keys
        ordered = sorted(updates, key=lambda u: u.client_id)
        labels = self.cluster_labels(rnd, ordered)
        groups: dict[int, list[ClientUpdate]] = {}
        for u, label in zip(ordered, labels, strict=True):
            groups.setdefault(label, []).append(u)
        # (smallest member id, member ids, adapter) of this round's clusters...
        clusters: list[tuple[int, list[int], AdapterState]] = []
        for members in groups.values():
            adapter = self.average_keys(keys, members, self.weights(members))
            ids = [u.client_id for u in members]
            clusters.append((min(ids), ids, adapter))
        # ...and of last round's clusters that absent clients still hold
        submitted = {u.client_id for u in ordered}
        held: dict[int, list[int]] = {}
        for cid, j in server.meta.get("assignment", {}).items():
            if int(cid) not in submitted:
                held.setdefault(int(j), []).append(int(cid))
        for j, ids in held.items():
            prefix = cluster_prefix(j)
            clusters.append((min(ids), sorted(ids), {k: server.tensors[namespaced(prefix, k)] for k in keys}))
        clusters.sort(key=lambda c: c[0])
        tensors: dict[str, torch.Tensor] = {}
        if self.options.unassigned == INITIAL:
            tensors.update({k: v for k, v in server.tensors.items() if k.startswith(INITIAL + "/")})
        assignment: dict[str, int] = {}
        for j, (_, ids, adapter) in enumerate(clusters):
            prefix = cluster_prefix(j)
            tensors.update({namespaced(prefix, k): v for k, v in adapter.items()})
            assignment.update({str(c): j for c in ids})
        meta = dict(server.meta)
        meta["assignment"] = {k: assignment[k] for k in sorted(assignment, key=int)}
        global_adapter = dict(server.adapter)
        global_adapter.update(self.average_keys(keys, ordered, self.weights(ordered)))
        return AggregateResult(
            adapter=clone_state(global_adapter),
            tensors=tensors,
            meta=meta,
            metrics={"fl_tac_clusters": float(len(groups))},
        )
