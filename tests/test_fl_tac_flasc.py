"""FL-TAC (§23: k-means of adapters, per-cluster averages) and FLASC (§25: sparse up/down, server optimiser) on
hand-built tensors (non-square modules), plus FLASC's byte count through the round logic."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import HEAD, random_state

from fedlora.client.codecs import INDICES, VALUES, encode_state, parse_codec
from fedlora.federation.round import decode_reply, prepare_plan, run_round
from fedlora.methods import ClientUpdate, build_method, derive_seed
from fedlora.methods.fl_tac import _lloyd, flatten, kmeans


def _shifted(state: dict[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    return {k: v + c for k, v in state.items()}


def _numel(layout) -> int:
    return sum(s.rank * (s.in_features + s.out_features) for s in layout.modules) + 15  # head (3, 5)


# ============================================================================================== FL-TAC
def test_kmeans_finds_well_separated_groups() -> None:
    pts = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    for seed in range(5):
        labels, inertia = kmeans(pts, 2, n_init=10, max_iter=100, seed=seed)
        assert labels[0] == labels[1] != labels[2] == labels[3]
        assert inertia == pytest.approx(4.0)  # centres (0, 1), (10, 1): four points at distance 1
    blobs = torch.tensor(
        [[0, 0], [1, 0], [0, 1], [20, 0], [21, 0], [20, 1], [0, 20], [1, 20], [0, 21]], dtype=torch.float
    )
    labels, inertia = kmeans(blobs, 3, n_init=10, max_iter=100, seed=3)
    assert len({labels[0], labels[3], labels[6]}) == 3
    assert labels[0:3] == [labels[0]] * 3 and labels[3:6] == [labels[3]] * 3 and labels[6:9] == [labels[6]] * 3
    assert inertia == pytest.approx(3 * (2 * (1 / 3) ** 2 + 2 * (2 / 3) ** 2 + 2 * (1 / 3) ** 2))


def test_kmeans_restarts_escape_a_bad_local_optimum() -> None:
    # A wide rectangle: Lloyd from centres (0,0), (0,1) stops at the top/bottom split (inertia 100); the best split
    # is left/right (inertia 1). k-means++ rarely seeds the bad pair (p = 1/202), and restarts keep the best.
    pts = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    for seed in range(10):
        _, inertia = kmeans(pts, 2, n_init=10, max_iter=100, seed=seed)
        assert inertia == pytest.approx(1.0)
    # identical points: every distance is zero; no crash, one cluster used (ties go to the lower centre)
    labels, inertia = kmeans(torch.ones(4, 3), 2, n_init=3, max_iter=10, seed=0)
    assert labels == [0, 0, 0, 0] and inertia == 0.0


def test_kmeans_plus_plus_seeding_and_lloyd_iterations() -> None:
    # k-means++ draws the second centre with probability ∝ d²: from any corner of this 100×1 rectangle, the other
    # corner of the same short side has p = 1/20002, so one restart finds the left/right split (a uniform draw
    # would pick the bad pair with p = 1/3 and stop at inertia 10⁴).
    pts = torch.tensor([[0.0, 0.0], [0.0, 1.0], [100.0, 0.0], [100.0, 1.0]])
    for seed in range(20):
        assert kmeans(pts, 2, n_init=1, max_iter=100, seed=seed)[1] == pytest.approx(1.0)
    # Lloyd from centres 0 and 1 on 0, 1, 2, 3, 10, 11: {0} / rest (centre 5.4) -> {0,1,2} / {3,10,11} (centres 1, 8)
    # -> {0,1,2,3} / {10,11} (centres 1.5, 10.5), stable
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]], dtype=torch.float64)
    labels, inertia = _lloyd(line, line[:2].clone(), max_iter=100)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1] and inertia == pytest.approx(2.25 + 0.25 + 0.25 + 2.25 + 0.25 + 0.25)
    labels, inertia = _lloyd(line, line[:2].clone(), max_iter=1)  # the cap stops after one update
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and inertia == pytest.approx(1 + 0 + 1 + 25 + 4 + 9)


def test_kmeans_keeps_the_best_restart() -> None:
    """Five blobs, four clusters: single restarts end in several local optima; ten restarts keep the lowest."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])
    pts = torch.cat([c + 0.5 * torch.randn(4, 2, generator=g) for c in centres])
    singles = [kmeans(pts, 4, n_init=1, max_iter=300, seed=s)[1] for s in range(30)]
    assert max(singles) > min(singles) + 1.0
    for seed in range(5):
        assert kmeans(pts, 4, n_init=10, max_iter=300, seed=seed)[1] == pytest.approx(min(singles))


def test_flatten_concatenates_in_sorted_key_order() -> None:
    st = {"b": torch.tensor([[3.0, 4.0]]), "a": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    out = flatten(st)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0, 3.0, 4.0]


def _tac_updates(layout, x):
    """Clients 0, 2, 4 near x; clients 1, 3 far away (x + 100, x + 103); sizes 10..50."""
    shifts = {0: 0.0, 1: 100.0, 2: 0.3, 3: 103.0, 4: 0.9}
    return [ClientUpdate(k, _shifted(x, shifts[k]), num_examples=10 * (k + 1), samples_seen=5) for k in range(5)]


@pytest.mark.invariant("fl_tac")
def test_fl_tac_clusters_average_within_clusters_and_is_identity_for_large_n(layout, gen) -> None:
    x = random_state(layout, gen)
    m = build_method("fl_tac", layout, seed=11)
    server = m.init_server(random_state(layout, gen))
    ups = _tac_updates(layout, x)
    res = m.aggregate(0, server, ups)
    # cluster ids by smallest client id: {0, 2, 4} -> 0, {1, 3} -> 1
    assert res.meta["assignment"] == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0}
    assert json.loads(json.dumps(res.meta)) == res.meta
    new = dataclasses.replace(server, adapter=res.adapter, tensors=res.tensors, meta=res.meta, round=1)
    # per cluster θ_c = Σ n_v/Σn θ_v (weights sum to one inside the cluster):
    # cluster 0: (10·0 + 30·0.3 + 50·0.9)/90 = 0.6; cluster 1: (20·100 + 40·103)/60 = 102
    for k in layout.all_keys:
        torch.testing.assert_close(res.tensors[f"cluster0/{k}"], x[k] + 0.6)
        torch.testing.assert_close(res.tensors[f"cluster1/{k}"], x[k] + 102.0)
        # the global adapter: all submissions, sample-weighted: (0 + 2000 + 9 + 4120 + 45)/150
        torch.testing.assert_close(res.adapter[k], x[k] + 6174.0 / 150.0)
    # same cluster -> identical adapters, downloaded as the default adapter's keys
    plans = {k: m.plan(1, k, new) for k in range(5)}
    for a, b in [(0, 2), (0, 4), (1, 3)]:
        assert set(plans[a].download) == set(layout.all_keys)
        for k in layout.all_keys:
            assert torch.equal(plans[a].download[k], plans[b].download[k])
    assert not torch.equal(plans[0].download[HEAD], plans[1].download[HEAD])
    # reply order does not matter
    again = m.aggregate(0, server, ups[::-1])
    assert again.meta == res.meta and all(torch.equal(again.tensors[k], v) for k, v in res.tensors.items())
    # N >= #submissions: the server is the identity, every client gets back exactly what it sent (even identical
    # submissions stay separate clusters)
    twins = [ups[0], dataclasses.replace(ups[0], client_id=1), ups[4]]
    assert build_method("fl_tac", layout, options={"num_clusters": 3}).aggregate(0, server, twins).meta == {
        "assignment": {"0": 0, "1": 1, "4": 2}
    }
    for n in (5, 7):
        mi = build_method("fl_tac", layout, seed=11, options={"num_clusters": n})
        ri = mi.aggregate(0, server, ups)
        si = dataclasses.replace(server, adapter=ri.adapter, tensors=ri.tensors, meta=ri.meta, round=1)
        assert ri.meta["assignment"] == {str(k): k for k in range(5)}
        for u in ups:
            down = mi.plan(1, u.client_id, si).download
            for k in layout.all_keys:
                assert torch.equal(down[k], u.state[k])


def test_fl_tac_identical_members_come_back_unchanged(layout, gen) -> None:
    """Weights inside a cluster sum to one: a cluster of identical submissions averages to that submission."""
    x, y = random_state(layout, gen), _shifted(random_state(layout, gen), 50.0)
    ups = [ClientUpdate(k, x if k % 2 else y, num_examples=k + 1, samples_seen=1) for k in range(6)]
    for weighting in ("num_examples", "uniform", "samples_seen"):
        m = build_method("fl_tac", layout, weighting=weighting)
        res = m.aggregate(0, m.init_server(x), ups)
        assert res.meta["assignment"] == {str(k): (1 if k % 2 else 0) for k in range(6)}
        for k in layout.all_keys:
            torch.testing.assert_close(res.tensors[f"cluster0/{k}"], y[k], rtol=0, atol=1e-5)
            torch.testing.assert_close(res.tensors[f"cluster1/{k}"], x[k], rtol=0, atol=1e-5)


def test_fl_tac_absent_clients_keep_their_cluster_and_new_clients_start_from_global(layout, gen) -> None:
    x = random_state(layout, gen)
    initial = random_state(layout, gen)
    m = build_method("fl_tac", layout, seed=2)
    s0 = m.init_server(initial)
    assert all(torch.equal(m.plan(0, 3, s0).download[k], initial[k]) for k in layout.all_keys)
    r0 = m.aggregate(0, s0, _tac_updates(layout, x))
    s1 = dataclasses.replace(s0, adapter=r0.adapter, tensors=r0.tensors, meta=r0.meta, round=1)
    old0 = {k: r0.tensors[f"cluster0/{k}"] for k in layout.all_keys}
    # round 1: only clients 1, 2, 3 reply; 2 moves away from 1 and 3
    ups = [
        ClientUpdate(1, _shifted(x, 200.0), num_examples=1, samples_seen=1),
        ClientUpdate(2, _shifted(x, 5.0), num_examples=1, samples_seen=1),
        ClientUpdate(3, _shifted(x, 202.0), num_examples=3, samples_seen=1),
    ]
    r1 = m.aggregate(1, s1, ups)
    s2 = dataclasses.replace(s1, adapter=r1.adapter, tensors=r1.tensors, meta=r1.meta, round=2)
    # clusters by smallest client id: the held {0, 4} -> 0, {1, 3} -> 1, {2} -> 2
    assert r1.meta["assignment"] == {"0": 0, "1": 1, "2": 2, "3": 1, "4": 0}
    assert r1.metrics["fl_tac_clusters"] == 2.0
    assert len(r1.tensors) == 3 * len(layout.all_keys)
    for k in layout.all_keys:
        assert torch.equal(m.plan(2, 0, s2).download[k], old0[k])
        assert torch.equal(m.plan(2, 4, s2).download[k], old0[k])
        torch.testing.assert_close(m.plan(2, 1, s2).download[k], x[k] + 201.5)
        assert torch.equal(m.plan(2, 2, s2).download[k], ups[1].state[k])
        # a client never assigned starts from the global adapter (average of the round: (200+5+606)/5)
        torch.testing.assert_close(m.plan(2, 9, s2).download[k], x[k] + 811.0 / 5.0)
    # ... or from the initial adapter when asked
    mi = build_method("fl_tac", layout, seed=2, options={"unassigned": "initial"})
    si = mi.init_server(initial)
    ri = mi.aggregate(0, si, _tac_updates(layout, x))
    si = dataclasses.replace(si, adapter=ri.adapter, tensors=ri.tensors, meta=ri.meta, round=1)
    assert all(torch.equal(mi.plan(1, 9, si).download[k], initial[k]) for k in layout.all_keys)


def test_fl_tac_is_seeded(layout, gen) -> None:
    """Ambiguous data: the clustering depends on the seed only through derive_seed(seed, round): repeatable."""
    ups = [ClientUpdate(k, random_state(layout, gen), num_examples=1, samples_seen=1) for k in range(8)]
    m = build_method("fl_tac", layout, seed=5, options={"num_clusters": 3})
    server = m.init_server(ups[0].state)
    a, b = m.aggregate(4, server, ups), m.aggregate(4, server, ups)
    assert a.meta == b.meta and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert sorted(set(a.meta["assignment"].values())) == [0, 1, 2] and a.meta["assignment"]["0"] == 0
    # one restart: the labels are exactly those of kmeans seeded by derive_seed(seed, "fl_tac", round)
    one = build_method("fl_tac", layout, seed=5, options={"num_clusters": 3, "n_init": 1})
    points = torch.stack([flatten(u.state) for u in ups])
    by_round = []
    for rnd in range(6):
        want = kmeans(points, 3, n_init=1, max_iter=300, seed=derive_seed(5, "fl_tac", rnd))[0]
        assert one.cluster_labels(rnd, ups) == want
        by_round.append(want)
    assert len({tuple(x) for x in by_round}) > 1  # the round changes the draw


# ============================================================================================== FLASC
def _adamw_step(theta, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Decoupled-weight-decay Adam, written out: the reference for the server step."""
    theta = theta * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return theta - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _trained(server_theta, gen, scale=0.1):
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in server_theta.items()}


@pytest.mark.invariant("flasc")
def test_flasc_sparse_upload_and_server_adam_step(layout, gen) -> None:
    total = _numel(layout)
    assert total == 71
    m = build_method("flasc", layout, options={"upload_density": 0.25, "server_lr": 0.05, "weight_decay": 0.1})
    assert m.weighting == "uniform"
    server = m.init_server(random_state(layout, gen))
    ups, deltas = [], []
    for cid in range(3):
        plan, _ = prepare_plan(m.plan(0, cid, server), server)
        assert plan.upload_codec == "topk:0.25" and plan.download_codec == "none"
        trained = _trained(plan.download, gen)
        payload = encode_state(parse_codec(plan.upload_codec), trained, plan.download)
        # nnz(upload) == ⌊ul·|θ|⌋ over all tensors jointly: the 17 largest |θ_k − θ_dl|
        nnz = sum(v.numel() for k, v in payload.items() if k.endswith(VALUES))
        assert nnz == math.floor(0.25 * total) == 17
        assert sum(v.numel() for k, v in payload.items() if k.endswith(INDICES)) == 17
        delta = torch.cat([(trained[k] - plan.download[k]).reshape(-1) for k in plan.upload_keys])
        kept = torch.cat([payload[k + VALUES] for k in plan.upload_keys])
        assert sorted(kept.abs().tolist()) == sorted(delta.abs().topk(17).values.tolist())
        # the server sees θ_dl + Δ̂_k (sparse change)
        sparse = {}
        for k in plan.upload_keys:
            d = torch.zeros(plan.download[k].numel())
            d[payload[k + INDICES].long()] = payload[k + VALUES]
            sparse[k] = d.reshape(plan.download[k].shape)
        deltas.append(sparse)
        ups.append(ClientUpdate(cid, {k: plan.download[k] + sparse[k] for k in sparse}, 10 * (cid + 1), 5))
    res = m.aggregate(0, server, ups)
    assert res.meta == {"server_step": 1}
    new = dataclasses.replace(server, adapter=res.adapter, tensors=res.tensors, meta=res.meta, round=1)
    # one AdamW step on g = −mean_k Δ_k (uniform), from zero moments
    for k in layout.all_keys:
        g = -(deltas[0][k] + deltas[1][k] + deltas[2][k]) / 3
        want, m1, v1 = _adamw_step(server.adapter[k], g, torch.zeros_like(g), torch.zeros_like(g), 1, 0.05, 0.1)
        torch.testing.assert_close(res.adapter[k], want)
        torch.testing.assert_close(res.tensors[f"flasc.exp_avg/{k}"], m1)
        torch.testing.assert_close(res.tensors[f"flasc.exp_avg_sq/{k}"], v1)
    # a second round continues the optimiser from its saved moments (bias correction at t=2)
    ups2 = []
    for cid in range(2):
        plan, _ = prepare_plan(m.plan(1, cid, new), new)
        trained = _trained(plan.download, gen)
        payload = encode_state(parse_codec(plan.upload_codec), trained, plan.download)
        ups2.append(ClientUpdate(cid, _decoded(plan, payload), 1, 1))
    res2 = m.aggregate(1, new, ups2)
    assert res2.meta == {"server_step": 2}
    for k in layout.all_keys:
        g = -sum(u.state[k] - new.adapter[k] for u in ups2) / 2
        want, _, _ = _adamw_step(
            new.adapter[k], g, res.tensors[f"flasc.exp_avg/{k}"], res.tensors[f"flasc.exp_avg_sq/{k}"], 2, 0.05, 0.1
        )
        torch.testing.assert_close(res2.adapter[k], want)


def _decoded(plan, payload):
    out = decode_reply(ClientUpdate(plan.client_id, payload, 1, 1, ranks=plan.ranks), plan)
    assert isinstance(out, ClientUpdate), out
    return out.state


@pytest.mark.invariant("flasc")
def test_flasc_dense_sgd_lr1_is_uniform_fedavg(layout, updates, gen) -> None:
    m = build_method("flasc", layout, options={"server_opt": "sgd", "server_lr": 1.0})
    server = m.init_server(random_state(layout, gen))
    assert m.plan(0, 0, server).upload_codec == "none"
    res = m.aggregate(0, server, updates)
    for k in layout.all_keys:
        torch.testing.assert_close(res.adapter[k], sum(u.state[k] for u in updates) / 3)
    assert res.tensors == {}  # plain sgd keeps no state


def test_flasc_restored_optimiser_matches_a_live_one(layout, gen) -> None:
    """Moments and step saved in the server state continue exactly like one optimiser kept alive (resume)."""
    for opt, extra in (("adamw", {}), ("sgd", {"server_momentum": 0.9})):
        m = build_method("flasc", layout, options={"server_opt": opt, "server_lr": 0.02, **extra})
        server = m.init_server(random_state(layout, gen))
        keys = layout.all_keys
        live = {k: torch.nn.Parameter(server.adapter[k].clone()) for k in keys}
        if opt == "adamw":
            torch_opt = torch.optim.AdamW(list(live.values()), lr=0.02, foreach=False)
        else:
            torch_opt = torch.optim.SGD(list(live.values()), lr=0.02, momentum=0.9, foreach=False)
        for rnd in range(3):
            ups = [ClientUpdate(c, _trained(server.adapter, gen), 1, 1) for c in range(2)]
            for k, p in live.items():
                p.grad = -sum(u.state[k] - server.adapter[k] for u in ups) / 2
            torch_opt.step()
            res = m.aggregate(rnd, server, ups)
            meta = json.loads(json.dumps(res.meta))  # as a checkpoint stores it
            server = dataclasses.replace(server, adapter=res.adapter, tensors=res.tensors, meta=meta, round=rnd + 1)
            for k in keys:
                torch.testing.assert_close(server.adapter[k], live[k].detach(), rtol=0, atol=1e-6)


def test_flasc_sparse_download_masks_theta(layout, gen) -> None:
    m = build_method("flasc", layout, options={"download_density": 0.5, "server_opt": "sgd", "server_lr": 1.0})
    theta0 = random_state(layout, gen)
    server = m.init_server(theta0)
    raw = m.plan(0, 0, server)
    assert raw.download_codec == "topk:0.5"
    plan, down = prepare_plan(raw, server)
    assert down == 8 * math.floor(0.5 * 71)  # values float32 + indices int32
    flat = torch.cat([theta0[k].reshape(-1) for k in layout.all_keys])
    thresh = flat.abs().topk(35).values.min()
    for k in layout.all_keys:  # the client receives θ ⊙ M_dl, M_dl = global top-35 of |θ|
        assert torch.equal(plan.download[k], torch.where(theta0[k].abs() >= thresh, theta0[k], 0.0))
    # the global model is what clients receive; the dense θ is kept by the server
    for k in layout.all_keys:
        assert torch.equal(server.adapter[k], plan.download[k])
        assert torch.equal(server.tensors[f"flasc.theta/{k}"], theta0[k])
    ups = [ClientUpdate(c, _trained(plan.download, gen), 1, 1) for c in range(2)]
    res = m.aggregate(0, server, ups)
    # sgd, lr 1: θ' = θ − (θ_dl − mean θ_k): masked-out entries keep θ plus the mean of what clients trained there
    for k in layout.all_keys:
        want = theta0[k] - plan.download[k] + (ups[0].state[k] + ups[1].state[k]) / 2
        torch.testing.assert_close(res.tensors[f"flasc.theta/{k}"], want)
    assert sum(int(torch.count_nonzero(res.adapter[k])) for k in layout.all_keys) == 35
    dense = build_method("flasc", layout, options={"download_density": 0.5, "global_model": "dense"})
    assert all(torch.equal(dense.init_server(theta0).adapter[k], theta0[k]) for k in layout.all_keys)


def test_flasc_refuses_a_second_codec(layout) -> None:
    with pytest.raises(ValueError, match=r"upload_density=0.5.*upload_codec='int8'"):
        build_method("flasc", layout, upload_codec="int8", options={"upload_density": 0.5})
    with pytest.raises(ValueError, match=r"download_density=0.25.*download_codec='fp16'"):
        build_method("flasc", layout, download_codec="fp16", options={"download_density": 0.25})
    m = build_method("flasc", layout, upload_codec="int8", download_codec="fp16")  # densities 1: the run's codecs
    plan = m.plan(0, 0, m.init_server(random_state(layout, torch.Generator().manual_seed(0))))
    assert (plan.upload_codec, plan.download_codec) == ("int8", "fp16")


def test_flasc_server_sees_what_the_fp16_download_delivered(layout, gen) -> None:
    """With the run's fp16 download codec the pseudo-gradient is taken from the fp16-rounded θ_dl."""
    m = build_method("flasc", layout, download_codec="fp16", options={"server_opt": "sgd", "server_lr": 1.0})
    server = m.init_server(random_state(layout, gen))
    plan, _ = prepare_plan(m.plan(0, 0, server), server)
    ups = [ClientUpdate(0, _trained(plan.download, gen), 1, 1)]
    res = m.aggregate(0, server, ups)
    for k in layout.all_keys:
        torch.testing.assert_close(res.adapter[k], server.adapter[k] - plan.download[k] + ups[0].state[k])


class _FakeRuntime:
    def __init__(self, reply):
        self.reply = reply

    def train(self, plans):
        return [self.reply(p) for p in plans]

    def accept(self, client_ids):
        pass

    def evaluate(self, server):
        return {}


@pytest.mark.parametrize(("ul", "dl"), [(0.25, 1.0), (0.25, 0.5), (1.0, 1.0)])
def test_flasc_round_counts_sparse_bytes(layout, gen, ul: float, dl: float) -> None:
    m = build_method("flasc", layout, options={"upload_density": ul, "download_density": dl})
    server = m.init_server(random_state(layout, gen))

    def reply(plan):
        trained = _trained(plan.download, gen)
        payload = encode_state(parse_codec(plan.upload_codec), trained, plan.download)
        return ClientUpdate(plan.client_id, payload, num_examples=7, samples_seen=7, ranks=plan.ranks)

    new, report = run_round(0, m, server, _FakeRuntime(reply), clients=[0, 2, 3])
    assert report.accepted == [0, 2, 3] and not report.rejected
    per_up = 8 * math.floor(ul * 71) if ul < 1 else 4 * 71
    per_down = 8 * math.floor(dl * 71) if dl < 1 else 4 * 71
    assert report.bytes_up == 3 * per_up
    assert report.bytes_down == 3 * per_down
    assert new.meta == {"server_step": 1} and new.round == 1


def test_flasc_sparse_run_resumes_bit_identical(tiny_bert: str, tmp_path, monkeypatch) -> None:
    """The sparse path keeps the dense θ and the AdamW moments in the server state: a killed run resumes exactly."""
    from fedlora import RunConfig, resume, run
    from fedlora.engines.local import LocalEngine
    from fedlora.runs import RunDir

    def config(name: str) -> RunConfig:
        return RunConfig(
            model=tiny_bert,
            method="flasc",
            method_options={"download_density": 0.5, "upload_density": 0.25},
            clients=3,
            clients_per_round=2,
            rounds=3,
            max_examples_per_label=8,
            local_steps=2,
            batch_size=8,
            partition="iid",
            global_test_fraction=0.2,
            progress=False,
            out_dir=str(tmp_path),
            run_name=name,
            threads=1,
        )

    full = run(config("full"))
    original = LocalEngine.train

    def dies_in_round_2(self, plans):
        if plans and plans[0].round == 2:
            original(self, plans[:1])
            raise KeyboardInterrupt
        return original(self, plans)

    monkeypatch.setattr(LocalEngine, "train", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(config("cut"))
    monkeypatch.setattr(LocalEngine, "train", original)
    resumed = resume(tmp_path / "cut", progress=False)
    assert full.global_adapter.keys() == resumed.global_adapter.keys()
    for k, v in full.global_adapter.items():
        assert torch.equal(v, resumed.global_adapter[k]), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    s_full, _, _ = RunDir(full.run_dir).load_latest()
    s_res, _, _ = RunDir(resumed.run_dir).load_latest()
    assert s_full.tensors.keys() == s_res.tensors.keys() and s_full.meta == s_res.meta == {"server_step": 3}
    assert all(torch.equal(v, s_res.tensors[k]) for k, v in s_full.tensors.items())
    numel = sum(v.numel() for v in full.global_adapter.values())  # |θ|: A, B and the head
    for h in full.history:  # two clients a round: values float32 + indices int32
        assert (h["bytes_up"], h["bytes_down"]) == (2 * 8 * math.floor(0.25 * numel), 2 * 8 * math.floor(0.5 * numel))
