"""FedRot-LoRA (METHODS.md §41), FedALT (§40) and FSLoRA (§42): their invariants on hand-built tensors (non-square
modules), and on the real tiny peft model what the engine must do for them (frozen Rest-of-World adapter, kept
individual adapter, sketched ranks and scales)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from helpers import HEAD, random_state, tiny_config

import fedlora.client.train as client_train
from fedlora.adapters import LoraLayout, LoraModuleSpec
from fedlora.api import build, resolve_config
from fedlora.federation.round import run_round, validate_update
from fedlora.methods import ClientUpdate, ModuleRank, OptionError, TrainStats, build_method, derive_seed
from fedlora.methods.fedrot_lora import align_factors, procrustes_rotation
from fedlora.methods.fslora import sketch_indices, sketch_matrix
from fedlora.privacy import server_noise_refusal

STATS = TrainStats(steps=1, samples_seen=1, train_loss=0.0, lr=1e-3)
ROW = "row/"


def _orthogonal(r: int, gen: torch.Generator, *, reflect: bool = False) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    if (float(torch.linalg.det(q)) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


# ------------------------------------------------------------------------------------------------ FedRot-LoRA
@pytest.mark.invariant("fedrot_lora")
def test_fedrot_alignment_keeps_products_and_recovers_rotations(gen) -> None:
    """(a) B'A' = BA; (b) a rotated copy of the global factor is aligned back onto it exactly; (d) the soft variant
    is a proper rotation, the identity at λ = 0; hard and soft differ when the best R is a reflection."""
    m, n, r = 7, 5, 3
    a, b = torch.randn(r, n, generator=gen, dtype=torch.float64), torch.randn(m, r, generator=gen, dtype=torch.float64)
    a_g, b_g = (
        torch.randn(r, n, generator=gen, dtype=torch.float64),
        torch.randn(m, r, generator=gen, dtype=torch.float64),
    )
    for factor, ref in (("A", a_g), ("B", b_g)):
        for lam in (1.5, 1.0, 0.4):
            a2, b2 = align_factors(a, b, ref, factor, rotate_lambda=lam)
            torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-12, rtol=1e-12)  # (a)
            assert not torch.allclose(a2, a)  # it did rotate
    # (b) recovery: A_k = Qᵀ A_g (B_k = B_g Q keeps the product), with Q a reflection too
    for reflect in (False, True):
        q = _orthogonal(r, gen, reflect=reflect)
        a2, b2 = align_factors(q.T @ a_g, b_g @ q, a_g, "A", rotate_lambda=1.5)
        torch.testing.assert_close(a2, a_g, atol=1e-12, rtol=0)
        torch.testing.assert_close(b2, b_g, atol=1e-12, rtol=0)
        a3, b3 = align_factors(q.T @ a_g, b_g @ q, b_g, "B", rotate_lambda=1.5)
        torch.testing.assert_close(b3, b_g, atol=1e-12, rtol=0)
        # the soft variant stays in SO(r): it recovers a rotation, never a reflection
        a4, _ = align_factors(q.T @ a_g, b_g @ q, a_g, "A", rotate_lambda=1.0)
        assert torch.allclose(a4, a_g, atol=1e-10) != reflect
    # the rotation is orthogonal and solves the Procrustes problem: no other orthogonal matrix does better
    mat = a @ a_g.T
    rot = procrustes_rotation(mat, rotate_lambda=1.5)
    torch.testing.assert_close(rot.T @ rot, torch.eye(r, dtype=torch.float64))
    best = torch.linalg.matrix_norm(rot.T @ a - a_g)
    for _ in range(50):
        q = _orthogonal(r, gen, reflect=bool(_ % 2))
        assert torch.linalg.matrix_norm(q.T @ a - a_g) >= best - 1e-12
    # (d) soft: det +1 and orthogonal for every λ <= 1; λ = 0 is exactly the identity
    refl = _orthogonal(r, gen, reflect=True)
    for lam in (1.0, 0.7, 0.3):
        soft = procrustes_rotation(refl, rotate_lambda=lam)
        assert float(torch.linalg.det(soft)) == pytest.approx(1.0)
        torch.testing.assert_close(soft.T @ soft, torch.eye(r, dtype=torch.float64))
    assert torch.equal(procrustes_rotation(refl, rotate_lambda=0.0), torch.eye(r, dtype=torch.float64))
    assert float(torch.linalg.det(procrustes_rotation(refl, rotate_lambda=1.5))) == pytest.approx(-1.0)
    torch.testing.assert_close(procrustes_rotation(refl, rotate_lambda=1.5), refl)  # M orthogonal: R = M
    # nothing to align to (zero or non-finite M): the identity, as the reference's fallback
    assert torch.equal(procrustes_rotation(torch.zeros(r, r)), torch.eye(r, dtype=torch.float64))
    assert torch.equal(procrustes_rotation(torch.full((r, r), float("nan"))), torch.eye(r, dtype=torch.float64))


@pytest.mark.invariant("fedrot_lora")
def test_fedrot_aligned_average_of_rotated_copies_is_exact(layout, gen) -> None:
    """(c) Clients holding rotated copies (B Q_k, Q_kᵀ A) of one update: FedIT's average of the factors misses B A,
    the aligned average reproduces it exactly; (e) no rotation in round 0, the factor alternates A (odd) / B (even);
    the server is FedIT with the samples-seen weights."""
    m = build_method("fedrot_lora", layout)
    assert m.weighting == "samples_seen"
    server = m.init_server(random_state(layout, gen))
    plan = m.plan(1, 0, server)  # round 1: aligned on A
    assert plan.download.keys() == set(layout.all_keys) and plan.upload.keys() == set(layout.all_keys)
    ups, naive = [], []
    for k in range(3):
        trained = dict(server.adapter)
        for spec in layout.modules:
            q = _orthogonal(spec.rank, gen, reflect=k == 1).float()
            trained[spec.a_key] = q.T @ server.adapter[spec.a_key]
            trained[spec.b_key] = server.adapter[spec.b_key] @ q
        upload, keep = m.finish(plan, trained, None, STATS)
        assert keep is None
        ups.append(ClientUpdate(k, upload, num_examples=10, samples_seen=10 * (k + 1)))
        naive.append(ClientUpdate(k, trained, num_examples=10, samples_seen=10 * (k + 1)))
    res = m.aggregate(1, server, ups)
    fedit = build_method("fedit", layout, weighting="samples_seen").aggregate(1, server, naive)
    for spec in layout.modules:
        want = server.adapter[spec.b_key] @ server.adapter[spec.a_key]
        torch.testing.assert_close(res.adapter[spec.b_key] @ res.adapter[spec.a_key], want, atol=1e-4, rtol=1e-4)
        assert (fedit.adapter[spec.b_key] @ fedit.adapter[spec.a_key] - want).abs().max() > 0.3
    # the server is FedIT of what travelled, weighted by the samples seen (distinct uploads, so weights show)
    p = [1 / 6, 2 / 6, 3 / 6]
    distinct = [dataclasses.replace(u, state=random_state(layout, gen)) for u in ups]
    res = m.aggregate(1, server, distinct)
    for key in layout.all_keys:
        torch.testing.assert_close(res.adapter[key], sum(pk * u.state[key] for pk, u in zip(p, distinct, strict=True)))
    # (e) which factor each round aligns on, and that finish applies exactly that alignment
    assert [m.align_factor(t) for t in range(5)] == [None, "A", "B", "A", "B"]
    other = build_method("fedrot_lora", layout, options={"odd_round_factor": "B"})
    assert [other.align_factor(t) for t in range(4)] == [None, "B", "A", "B"]
    pinned = build_method("fedrot_lora", layout, options={"align_on": "B"})
    assert [pinned.align_factor(t) for t in range(4)] == [None, "B", "B", "B"]
    trained = random_state(layout, gen)
    for rnd, factor in ((0, None), (1, "A"), (2, "B")):
        plan = m.plan(rnd, 0, server)
        upload, _ = m.finish(plan, trained, None, STATS)
        assert torch.equal(upload[HEAD], trained[HEAD])
        for spec in layout.modules:
            if factor is None:  # round 0: as trained, bit for bit
                assert torch.equal(upload[spec.a_key], trained[spec.a_key])
                assert torch.equal(upload[spec.b_key], trained[spec.b_key])
                continue
            ref = plan.download[spec.a_key if factor == "A" else spec.b_key]
            a2, b2 = align_factors(trained[spec.a_key], trained[spec.b_key], ref, factor)
            assert torch.equal(upload[spec.a_key], a2) and torch.equal(upload[spec.b_key], b2)
    # λ = 0: no rotation at all
    zero = build_method("fedrot_lora", layout, options={"rotate_lambda": 0})
    up0, _ = zero.finish(zero.plan(1, 0, server), trained, None, STATS)
    assert all(torch.equal(up0[k], trained[k]) for k in layout.all_keys)
    with pytest.raises(OptionError, match="allowed values: alternate, A, B"):
        build_method("fedrot_lora", layout, options={"align_on": "C"})


# ------------------------------------------------------------------------------------------------ FedALT
def _alt_initial(m, layout: LoraLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The engine's initial state: the default adapter and a ``row/`` adapter with B0 = 0."""
    state = random_state(layout, gen)
    for spec in m.extra_layouts["row"].modules:
        state[spec.a_key] = torch.randn(spec.rank, spec.in_features, generator=gen)
        state[spec.b_key] = torch.zeros(spec.out_features, spec.rank)
    return state


def _alt_round(m, server, initial, kept, clients, gen, rnd=0, sizes=None):
    """Plan, start, 'train' (fresh values for the trainable keys), finish and aggregate one round of ``clients``."""
    ups, trained_by = [], {}
    for i, k in enumerate(clients):
        plan = m.plan(rnd, k, server)
        start = m.start_state(plan, initial, kept.get(k))
        trained = dict(start)
        for key in plan.train_keys:
            trained[key] = torch.randn(start[key].shape, generator=gen)
        upload, keep = m.finish(plan, trained, kept.get(k), STATS)
        kept[k] = keep
        trained_by[k] = trained
        n = 10 if sizes is None else sizes[i]
        ups.append(ClientUpdate(k, upload, num_examples=n, samples_seen=n, ranks=plan.ranks))
    return m.aggregate(rnd, server, ups), ups, trained_by


@pytest.mark.invariant("fedalt")
def test_fedalt_rest_of_world_is_the_leave_one_out_mean(layout, gen) -> None:
    """(a) A0^(k) = mean_{j≠k} A1^(j) (and B); (b) Σ_k A0^(k) = Σ_k A1^(k); the individual LoRA, gate and heads never
    leave the client except A1, B1; (d) what a client keeps is exactly what it trained, W_g included; the gate mixes
    (both adapters at their full scale)."""
    m = build_method("fedalt", layout, num_clients=5)
    assert m.weighting == "uniform" and not m.has_global_model and m.has_personal_state
    initial = _alt_initial(m, layout, gen)
    server = m.init_server(initial)
    row_keys = set(m.extra_layouts["row"].lora_keys)
    assert row_keys and all(k.startswith(ROW) for k in row_keys)
    gate_keys = set(m.gate_keys())
    assert m.gate_adapters == ("row", "") and gate_keys == {"gate/enc.q.weight", "gate/enc.c_attn.weight"}
    plan = m.plan(0, 3, server)
    # round 0: every client receives the initial RoW adapter (B0 = 0: it contributes nothing)
    assert set(plan.download) == row_keys
    assert all(torch.equal(plan.download[k], initial[k]) for k in row_keys)
    assert set(plan.upload) == set(layout.lora_keys)  # A1, B1 only; the head and W_g stay (local_head)
    (stage,) = plan.stages
    assert stage.train_keys == frozenset(layout.all_keys) | gate_keys and not stage.train_keys & row_keys  # RoW frozen
    assert dict(stage.adapter_weights) == {"": 1.0, "row": 1.0}  # the gate mixes; each adapter at its scale s
    assert dict(m.inference_weights(3)) == {"": 1.0, "row": 1.0}
    kept: dict[int, dict] = {}
    clients = [0, 1, 2, 4]
    res, ups, trained_by = _alt_round(m, server, initial, kept, clients, gen, sizes=[10, 20, 30, 40])
    server = dataclasses.replace(server, round=1, tensors=res.tensors, adapter=res.adapter)
    assert not any(k.startswith("gate/") for u in ups for k in u.state)  # the gate never travels
    assert not any("gate/" in k for k in res.tensors) and not any("gate/" in k for k in res.adapter)
    for k in clients:  # (d) kept = trained, bit for bit: A1, B1, W_g and the head
        assert set(kept[k]) == set(layout.all_keys) | gate_keys
        assert all(torch.equal(kept[k][key], trained_by[k][key]) for key in kept[k])
    k_ = len(clients)
    for key in layout.lora_keys:
        rk = "row/" + key
        for i, k in enumerate(clients):  # (a) uniform over the others, whatever their sizes
            row = m.plan(1, k, server).download[rk]
            others = [u.state[key] for j, u in enumerate(ups) if j != i]
            torch.testing.assert_close(row, sum(others) / (k_ - 1))
        # (b) each upload appears K−1 times with weight 1/(K−1)
        total_row = sum(m.plan(1, k, server).download[rk] for k in clients)
        torch.testing.assert_close(total_row, sum(u.state[key] for u in ups))
        # a client that sat out receives the average of every upload of the round
        torch.testing.assert_close(m.plan(1, 3, server).download[rk], sum(u.state[key] for u in ups) / k_)
    # round 1: each client resumes from its own individual LoRA; the server's adapter never changes (no global)
    assert all(torch.equal(res.adapter[key], server.adapter[key]) for key in layout.all_keys)
    plan = m.plan(1, 2, server)
    start = m.start_state(plan, initial, kept[2])
    assert all(torch.equal(start[key], kept[2][key]) for key in kept[2])  # its gate too: kept across rounds
    assert all(torch.equal(start[key], plan.download[key]) for key in row_keys)
    # data-size weighting renormalises over the others
    sized = build_method("fedalt", layout, num_clients=5, weighting="num_examples", max_weight_ratio=None)
    res2 = sized.aggregate(0, sized.init_server(initial), ups)
    key = layout.lora_keys[0]
    want = (20 * ups[1].state[key] + 30 * ups[2].state[key] + 40 * ups[3].state[key]) / 90
    torch.testing.assert_close(res2.tensors["fedalt.loo/0/row/" + key], want)


def test_fedalt_lone_reply_shared_heads_and_options(layout, gen) -> None:
    m = build_method("fedalt", layout, num_clients=3)
    initial = _alt_initial(m, layout, gen)
    server = m.init_server(initial)
    kept: dict[int, dict] = {}
    res, _, _ = _alt_round(m, server, initial, kept, [0, 1], gen)
    server = dataclasses.replace(server, round=1, tensors=res.tensors)
    before = {k: m.plan(1, k, server).download for k in range(3)}
    res, ups, _ = _alt_round(m, server, initial, kept, [1], gen, rnd=1)  # one reply: no one else uploaded
    server = dataclasses.replace(server, round=2, tensors=res.tensors)
    for key in m.row_keys():
        assert torch.equal(m.plan(2, 1, server).download[key], before[1][key])  # client 1 keeps the RoW it had
        inner = key[len(ROW) :]
        assert torch.equal(m.plan(2, 0, server).download[key], ups[0].state[inner])  # the others get its upload
    # local_head=false: heads travel both ways and are averaged over the round (not leave-one-out)
    shared = build_method("fedalt", layout, num_clients=3, options={"local_head": "false"})
    srv = shared.init_server(initial)
    plan = shared.plan(0, 0, srv)
    assert HEAD in plan.download and HEAD in plan.upload
    assert set(shared.personal_keys()) == set(layout.lora_keys) | set(shared.gate_keys())
    res, ups, _ = _alt_round(shared, srv, initial, {}, [0, 1, 2], gen)
    torch.testing.assert_close(res.adapter[HEAD], sum(u.state[HEAD] for u in ups) / 3)
    # per_client individual init: seeded by (run seed, client), B1 = 0; a client that trained resumes its own
    per = build_method("fedalt", layout, num_clients=3, options={"individual_init": "per_client"}, seed=5)
    starts = [per.start_state(per.plan(0, k, srv), initial, None) for k in range(2)]
    spec = layout.modules[1]
    assert not torch.equal(starts[0][spec.a_key], starts[1][spec.a_key])
    assert torch.count_nonzero(starts[0][spec.b_key]) == 0
    assert torch.equal(per.start_state(per.plan(3, 0, srv), initial, None)[spec.a_key], starts[0][spec.a_key])
    # a client's first gate: drawn from (run seed, client) like nn.Linear's weight (|w| <= 1/sqrt(n)), the same after a
    # restart (a new method object), another for another client; float32 when the initial state has none
    gates = [per.start_state(per.plan(0, k, srv), initial, None) for k in (0, 0, 1)]
    again = build_method("fedalt", layout, num_clients=3, seed=5).start_state(per.plan(0, 0, srv), initial, None)
    for spec in layout.modules:
        gk = "gate/" + spec.name + ".weight"
        assert gates[0][gk].shape == (2, spec.in_features) and gates[0][gk].dtype == torch.float32
        assert float(gates[0][gk].abs().max()) <= spec.in_features**-0.5 and torch.count_nonzero(gates[0][gk]) > 0
        assert torch.equal(gates[0][gk], gates[1][gk]) and torch.equal(gates[0][gk], again[gk])
        assert not torch.equal(gates[0][gk], gates[2][gk])
    # mix=fixed: no gate, the adapters weighted (w, 1 - w); individual_weight belongs to it
    with pytest.raises(OptionError, match="individual_weight=0.8 applies to mix=fixed only"):
        build_method("fedalt", layout, options={"individual_weight": 0.8})
    with pytest.raises(OptionError, match="individual_weight=0.0 must be > 0"):
        build_method("fedalt", layout, options={"mix": "fixed", "individual_weight": 0})
    w = build_method("fedalt", layout, options={"mix": "fixed", "individual_weight": 0.8})
    wplan = w.plan(0, 0, w.init_server(initial))
    assert dict(wplan.stages[0].adapter_weights) == pytest.approx({"": 0.8, "row": 0.2})
    assert w.gate_adapters == () and w.gate_keys() == () and wplan.stages[0].train_keys == frozenset(layout.all_keys)
    assert set(w.personal_keys()) == set(layout.all_keys) and dict(w.inference_weights(0)) == pytest.approx(
        {"": 0.8, "row": 0.2}
    )
    # server-side DP noise and secure aggregation hand the method one mean: FedALT needs each upload
    assert "OTHER clients" in server_noise_refusal(type(m))


# ------------------------------------------------------------------------------------------------ FSLoRA
@pytest.fixture
def slayout() -> LoraLayout:
    """Rank 6 so that sketches of 1..5 slots exist; non-square modules (7×5 and 4×9)."""
    return LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=5, out_features=7, rank=6, lora_alpha=12.0),
            LoraModuleSpec("enc.v", in_features=9, out_features=4, rank=6, lora_alpha=12.0, alpha_rule="rslora"),
        ),
        other_keys=(HEAD,),
    )


def _sketch_reply(plan, gen, *, shift: float = 1.0) -> ClientUpdate:
    state = {k: v.float() + shift * torch.randn(v.shape, generator=gen) for k, v in plan.download.items()}
    return ClientUpdate(plan.client_id, state, num_examples=10, samples_seen=10, ranks=plan.ranks)


@pytest.mark.invariant("fslora")
def test_fslora_sketch_is_unbiased_and_applied(slayout, gen) -> None:
    """(a) E[S] = I; (b) one index set for A and B of a module, the download is exactly those slots; (d) every
    adapted module is sketched (2 tensors per module: the reference's name test matched none); (e) up and down
    k(m+n) per module; the client's scale is s·r/k."""
    r, k = 6, 2
    draws = 6000
    g = torch.Generator().manual_seed(0)
    mean = sum(sketch_matrix(r, sketch_indices(r, k, g)) for _ in range(draws)) / draws
    assert torch.count_nonzero(mean - torch.diag(torch.diagonal(mean))) == 0
    assert (torch.diagonal(mean) - 1).abs().max() < 0.08  # sd of one diagonal entry ≈ 0.018 here
    assert torch.equal(sketch_matrix(r, sketch_indices(r, r, g)), torch.eye(r, dtype=torch.float64))
    m = build_method("fslora", slayout, num_clients=3, client_ranks=(2, 6, 3))
    server = m.init_server(random_state(slayout, gen))
    for cid, budget in enumerate((2, 6, 3)):
        plan = m.plan(4, cid, server)
        sketched = 0
        up_numel = 0
        for spec in slayout.modules:
            idx = m.indices(4, cid, spec, budget)
            assert len(idx) == budget and len(set(idx.tolist())) == budget
            assert torch.equal(plan.download[spec.a_key], server.adapter[spec.a_key][idx])  # same idx for A ...
            assert torch.equal(plan.download[spec.b_key], server.adapter[spec.b_key][:, idx])  # ... and for B
            sketched += sum(
                plan.download[key].shape[d] == budget < spec.rank for key, d in ((spec.a_key, 0), (spec.b_key, 1))
            )
            assert plan.upload[spec.a_key].shape == (budget, spec.in_features)
            assert plan.upload[spec.b_key].shape == (spec.out_features, budget)
            up_numel += plan.upload[spec.a_key].shape[0] * spec.in_features + spec.out_features * budget
            assert plan.ranks[spec.name] == ModuleRank(budget, pytest.approx(spec.scaling() * spec.rank / budget))
        assert sketched == (2 * len(slayout.modules) if budget < r else 0)  # (d)
        assert up_numel == sum(budget * (s.in_features + s.out_features) for s in slayout.modules)  # (e)
        assert torch.equal(plan.download[HEAD], server.adapter[HEAD])
    # the draw is per round, per client and per module (or per client), and reproducible
    spec0, spec1 = slayout.modules
    sets = {tuple(m.indices(t, 0, spec0, 2).tolist()) for t in range(12)}
    assert len(sets) > 3
    assert torch.equal(m.indices(3, 0, spec0, 2), m.indices(3, 0, spec0, 2))
    same = build_method("fslora", slayout, num_clients=3, client_ranks=(2, 6, 3), options={"index_draw": "per_client"})
    assert all(torch.equal(same.indices(t, 0, spec0, 2), same.indices(t, 0, spec1, 2)) for t in range(5))
    assert any(not torch.equal(m.indices(t, 0, spec0, 2), m.indices(t, 0, spec1, 2)) for t in range(5))


@pytest.mark.invariant("fslora")
def test_fslora_server_step_divides_by_the_round_not_by_owners(slayout, gen) -> None:
    """(b) entries outside a client's slots come back bit-identical; the masked pseudo-gradient is divided by the
    number of replies, not by the number of clients that drew an entry; (c) at k = r with server SGD lr 1 it is
    FedIT with uniform weights."""
    m = build_method("fslora", slayout, num_clients=2, client_ranks=(2, 3))
    server = m.init_server(random_state(slayout, gen))
    plans = [m.plan(1, c, server) for c in range(2)]
    ups = [_sketch_reply(p, gen) for p in plans]
    res = m.aggregate(1, server, ups)
    for spec in slayout.modules:
        i0, i1 = (m.indices(1, c, spec, b).tolist() for c, b in ((0, 2), (1, 3)))
        for slot in range(spec.rank):
            owners = [c for c, idx in ((0, i0), (1, i1)) if slot in idx]
            got_a, old_a = res.adapter[spec.a_key][slot], server.adapter[spec.a_key][slot]
            got_b, old_b = res.adapter[spec.b_key][:, slot], server.adapter[spec.b_key][:, slot]
            if not owners:  # no client drew it: bit-identical
                assert torch.equal(got_a, old_a) and torch.equal(got_b, old_b)
                continue
            want_a, want_b = old_a.clone(), old_b.clone()
            for c in owners:
                pos = (i0 if c == 0 else i1).index(slot)
                want_a += (ups[c].state[spec.a_key][pos] - old_a) / 2  # ÷ K = 2, even with one owner
                want_b += (ups[c].state[spec.b_key][:, pos] - old_b) / 2
            torch.testing.assert_close(got_a, want_a)
            torch.testing.assert_close(got_b, want_b)
    torch.testing.assert_close(res.adapter[HEAD], (ups[0].state[HEAD] + ups[1].state[HEAD]) / 2)
    # (c) every client at the full rank, server SGD with lr 1: FedIT with uniform weights
    full = build_method("fslora", slayout, num_clients=3)
    srv = full.init_server(random_state(slayout, gen))
    ups = [_sketch_reply(full.plan(0, c, srv), gen) for c in range(3)]
    ups = [dataclasses.replace(u, num_examples=n) for u, n in zip(ups, (10, 30, 60), strict=True)]
    got = full.aggregate(0, srv, ups).adapter
    want = build_method("fedit", slayout, weighting="uniform").aggregate(0, srv, ups).adapter
    for key in slayout.all_keys:
        torch.testing.assert_close(got[key], want[key])
    # a smaller server learning rate moves the model by that share of the pseudo-gradient
    half = build_method("fslora", slayout, num_clients=3, options={"server_lr": 0.5}).aggregate(0, srv, ups).adapter
    for key in slayout.all_keys:
        torch.testing.assert_close(half[key], (srv.adapter[key] + want[key]) / 2)


def test_fslora_server_adamw_is_torch_adamw_across_rounds(slayout, gen) -> None:
    """``server_optimizer=adamw`` is torch's AdamW stepping the masked pseudo-gradient; its moments and step count
    live in the server state, so two rounds equal one optimiser over two steps."""
    m = build_method("fslora", slayout, num_clients=2, client_ranks=(2, 6), options={"server_optimizer": "adamw"})
    server = m.init_server(random_state(slayout, gen))
    params = {k: torch.nn.Parameter(v.clone()) for k, v in server.adapter.items()}
    opt = torch.optim.AdamW(params.values(), lr=3e-4, weight_decay=0.01)
    for rnd in range(2):
        ups = [_sketch_reply(m.plan(rnd, c, server), gen) for c in range(2)]
        diffs = [m.masked_differences(rnd, server, u) for u in ups]
        for key, p in params.items():
            p.grad = -(diffs[0][key] + diffs[1][key]) / 2
        opt.step()
        res = m.aggregate(rnd, server, ups)
        server = dataclasses.replace(server, adapter=res.adapter, tensors=res.tensors, meta=res.meta, round=rnd + 1)
        assert server.meta["fslora.steps"] == rnd + 1
        for key, p in params.items():
            torch.testing.assert_close(server.adapter[key], p.detach(), atol=1e-7, rtol=1e-6)


def test_fslora_on_a_real_model_trains_the_sketch_at_its_scale(tiny_bert: str, tmp_path, monkeypatch) -> None:
    """In the engine: a client of budget k trains a rank-k LoRA with scale s·r/k (the reference's sketch that never
    applied), its reply has rank k, and the round's new global adapter is unchanged outside the drawn slots."""
    cfg = tiny_config(
        tiny_bert, tmp_path, method="fslora", clients=2, client_ranks="2,3", rounds=1, max_examples_per_label=10
    )
    setup = build(resolve_config(cfg))
    engine, method, layout = setup.engine, setup.method, setup.layout
    spec = layout.modules[0]
    layer, _ = engine.slots.layers[spec.name]
    seen: list[float] = []
    original = client_train.train_local

    def spy(model, params, *args, **kwargs):
        seen.append(float(layer.scaling["default"]))
        return original(model, params, *args, **kwargs)

    monkeypatch.setattr(client_train, "train_local", spy)
    server = method.init_server(engine.initial)
    new, report = run_round(0, method, server, engine, clients=[0, 1])
    assert report.accepted == [0, 1]
    assert seen == pytest.approx([spec.scaling() * spec.rank / 2, spec.scaling() * spec.rank / 3])
    drawn = set()
    for cid, k in ((0, 2), (1, 3)):
        drawn |= set(method.indices(0, cid, spec, k).tolist())
    for slot in range(spec.rank):
        changed = not torch.equal(new.adapter[spec.a_key][slot], server.adapter[spec.a_key][slot])
        assert changed == (slot in drawn), slot


# ------------------------------------------------------------------------------------------------ FedALT, real model
@pytest.mark.invariant("fedalt")
def test_fedalt_on_a_real_model_freezes_the_row_and_keeps_the_individual(tiny_bert: str, tmp_path, monkeypatch):
    """Training runs with both adapters active at their full scale s (the gate mixes); (d) A0, B0 get no gradient
    (bit-identical to the download after training), W_g trains, and what each client keeps (A1, B1, W_g, head) is
    bit-identical to what it trained, whatever the server does next: the next round starts from it; W_g never
    travels (an upload carrying it is refused); the RoW each client gets next round leaves its own upload out."""
    cfg = tiny_config(tiny_bert, tmp_path, method="fedalt", clients=3, rounds=2, max_examples_per_label=10)
    setup = build(resolve_config(cfg))
    engine, method, layout = setup.engine, setup.method, setup.layout
    slots = engine.slots
    row_keys = set(method.extra_layouts["row"].lora_keys)
    gate_keys = set(method.gate_keys())
    own_keys = set(layout.all_keys) | gate_keys
    assert gate_keys and gate_keys <= set(slots.params) and not gate_keys & set(layout.all_keys)
    spec = layout.modules[0]
    layer, _ = slots.layers[spec.name]
    s = spec.scaling()
    passes: list[dict] = []
    original = client_train.train_local

    def spy(model, params, *args, **kwargs):
        before = slots.read()
        info = dict(scaling=dict(layer.scaling), active=sorted(layer.active_adapters))
        info["trainable"] = {k for k, p in slots.params.items() if p.requires_grad}
        out = original(model, params, *args, **kwargs)
        passes.append(dict(before=before, after=slots.read(), **info))
        return out

    monkeypatch.setattr(client_train, "train_local", spy)
    server = method.init_server(engine.initial)
    server, _ = run_round(0, method, server, engine, clients=[0, 1, 2])
    for cid, ps in enumerate(passes):  # a client's first gate: its own draw from (run seed, client)
        first = method.fresh_gates(derive_seed(cfg.seed, "fedalt.gate", cid))
        assert all(torch.equal(ps["before"][k], first[k]) for k in gate_keys)
    assert not torch.equal(passes[0]["before"][min(gate_keys)], passes[1]["before"][min(gate_keys)])
    after_round_0 = {cid: dict(engine.personal[cid]) for cid in range(3)}
    passes.clear()
    replies = []
    original_train = engine.train

    def spy_train(ps):
        out = original_train(ps)
        replies.extend(out)
        return out

    engine.train = spy_train  # type: ignore[method-assign]
    sent = {c: method.plan(1, c, server).download for c in range(3)}
    server, report = run_round(1, method, server, engine, clients=[0, 1, 2])
    assert report.accepted == [0, 1, 2] and len(passes) == 3
    for cid, ps in enumerate(passes):
        assert ps["trainable"] == own_keys and ps["active"] == ["default", "row"]
        assert ps["scaling"]["default"] == pytest.approx(s) and ps["scaling"]["row"] == pytest.approx(s)
        for k in row_keys:  # frozen RoW: the client trained on exactly what it was sent, and it did not move
            assert torch.equal(ps["before"][k], sent[cid][k]) and torch.equal(ps["after"][k], sent[cid][k])
        assert any(torch.count_nonzero(sent[cid][k]) > 0 for k in row_keys if "lora_B" in k)  # a real RoW
        for k in own_keys:  # round 1 starts from what round 0 left (W_g too), and keeps what it trained
            assert torch.equal(ps["before"][k], after_round_0[cid][k]), k
            assert torch.equal(engine.personal[cid][k], ps["after"][k])
        assert all(not torch.equal(ps["after"][k], ps["before"][k]) for k in gate_keys)  # W_g trained
        assert set(replies[cid].state) == set(layout.lora_keys)  # no gate in the upload
    assert not any("gate/" in k for k in server.tensors) and not any("gate/" in k for k in server.adapter)
    # an upload that carries the gate is refused, naming it
    plan = method.plan(2, 0, server)
    up = {k: v.clone() for k, v in engine.personal[0].items() if k in plan.upload or k in gate_keys}
    reason = validate_update(ClientUpdate(0, up, num_examples=10, samples_seen=10, ranks=plan.ranks), plan)
    assert reason is not None and "gate/" in reason, reason
    for cid in range(3):
        row = method.plan(2, cid, server).download
        for key in layout.lora_keys:
            others = [replies[j].state[key] for j in range(3) if j != cid]
            torch.testing.assert_close(row["row/" + key], (others[0] + others[1]) / 2)


class _LinearAndConv1D(torch.nn.Module):
    """Two non-square modules (5 in, 7 out): an ``nn.Linear`` and a GPT-2 ``Conv1D`` (its weight stored (in, out))."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.lin = torch.nn.Linear(5, 7)
        self.conv = Conv1D(7, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.conv(x)


@pytest.mark.invariant("fedalt")
def test_fedalt_gate_is_a_per_token_softmax_over_the_two_adapters(gen) -> None:
    """(c) on hand-built tensors: with W_g = 0 a gated layer gives W0 x + (s/2)(B0 A0 + B1 A1) x; with any W_g it gives
    W0 x + s·Σ_i g_i(x) B_i A_i x, g(x) = softmax(W_g x) over the two adapters for each token (i = 0 the RoW), for an
    nn.Linear and a Conv1D layer. The gate is no peft key (neither adapter's state dict holds it)."""
    import warnings

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from fedlora.adapters.peft_io import AdapterSlots, install_token_gates
    from fedlora.models.loading import add_named_adapter

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft sets fan_in_fan_out per layer type, and says so
        model = get_peft_model(_LinearAndConv1D(), LoraConfig(target_modules=["lin", "conv"], r=2, lora_alpha=4))
    add_named_adapter(model, "row", seed=1)
    install_token_gates(model, ["row", "default"], seed=2)
    with pytest.raises(ValueError, match="already has token gates"):
        install_token_gates(model, ["row", "default"], seed=2)
    layout = LoraLayout.from_peft_model(model)
    assert layout.other_keys == ()  # the gate is not mistaken for a head
    for adapter in ("default", "row"):
        assert not any("gate" in k for k in get_peft_model_state_dict(model, adapter_name=adapter))
    slots = AdapterSlots(model, ("default", "row"))
    assert set(slots.params) == set(layout.lora_keys) | {"row/" + k for k in layout.lora_keys} | set(layout.gate_keys)
    slots.set_scales(None, {"": 1.0, "row": 1.0})
    x = torch.randn(2, 3, 5, generator=gen)  # 2 sequences of 3 tokens
    base = model.base_model.model
    w0 = {"lin": base.lin.base_layer.weight.T, "conv": base.conv.base_layer.weight}  # x @ w0: (in, out) layout
    bias = {"lin": base.lin.base_layer.bias, "conv": base.conv.base_layer.bias}
    s = 4 / 2
    for zero_gate in (True, False):
        state = {}
        for spec in layout.modules:
            for ns in ("", "row/"):
                state[ns + spec.a_key] = torch.randn(2, 5, generator=gen)
                state[ns + spec.b_key] = torch.randn(7, 2, generator=gen)
            state["gate/" + spec.name + ".weight"] = (0 if zero_gate else 3) * torch.randn(2, 5, generator=gen)
        slots.load(state)
        with torch.no_grad():
            outs = dict(zip(("lin", "conv"), model(x), strict=True))
        for spec in layout.modules:
            short = spec.name.rsplit(".", 1)[1]
            a1, b1 = state[spec.a_key], state[spec.b_key]
            a0, b0 = state["row/" + spec.a_key], state["row/" + spec.b_key]
            plain = x @ w0[short] + bias[short]
            if zero_gate:
                want = plain + (s / 2) * (x @ (b0 @ a0 + b1 @ a1).T)
            else:
                g = torch.softmax(x @ state["gate/" + spec.name + ".weight"].T, dim=-1)  # (2, 3, 2): per token
                assert float((g[..., 0] - g[..., 0].mean()).abs().max()) > 0.05  # the mix does vary by token
                want = plain + s * (g[..., :1] * (x @ (b0 @ a0).T) + g[..., 1:] * (x @ (b1 @ a1).T))
            torch.testing.assert_close(outs[short], want, rtol=1e-5, atol=1e-5)


def test_fedalt_personal_model_loads_with_its_gate(tiny_bert: str, tmp_path) -> None:
    """A finished run's ``personal/client-K`` (two peft adapters + token_gate.safetensors) loads through
    ``load_trained`` into the model the engine evaluated for client K (its logits); without the gate file it is
    another model. ``fedlora export`` refuses a gated model; a gate of the wrong shape, in the saved file or in a
    client's state, is refused by name."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fedlora import load_trained, run
    from fedlora.adapters.peft_io import GATE_FILE
    from fedlora.export import ExportError, attach_adapters, build_base, export, open_trained
    from fedlora.runs import RunDir, RunDirError

    cfg = tiny_config(tiny_bert, tmp_path, method="fedalt", clients=2, rounds=1, max_examples_per_label=10)
    result = run(cfg.replace(run_name="alt", local_epochs=1))
    texts = ["a domesticated carnivorous mammal kept as a pet", "the first light of day"]
    server, clients, weights = RunDir(result.run_dir).load_latest()
    setup = build(resolve_config(cfg))
    setup.engine.restore(server, clients, weights)
    batch = setup.tokenizer(texts, padding=True, return_tensors="pt")

    def logits(model) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    for cid in range(2):
        assert (result.run_dir / f"personal/client-{cid}" / GATE_FILE).is_file()
        setup.engine.load_client_model(cid, server)
        want = logits(setup.model)
        ours, _ = load_trained(result.run_dir, client=cid)
        torch.testing.assert_close(logits(ours), want, rtol=1e-5, atol=1e-5)
    trained = open_trained(result.run_dir, client=1)
    assert trained.token_gate == ("row", "default")
    no_gate = attach_adapters(build_base(trained), dataclasses.replace(trained, token_gate=()))
    assert float((logits(no_gate) - want).abs().max()) > 1e-3  # the peft adapters alone are not the client's model
    with pytest.raises(ExportError, match="gate"):
        export(result.run_dir, tmp_path / "out", client=1)
    # a gate of the wrong shape: in the saved file, and in a client's (checkpointed) state
    path = result.run_dir / "personal/client-1" / GATE_FILE
    saved = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    name = sorted(saved)[0]
    save_file({**saved, name: torch.zeros(3, saved[name].shape[1])}, str(path), metadata=meta)
    with pytest.raises(RunDirError, match=re.escape(f"{name} has shape (3, ")):
        load_trained(result.run_dir, client=1)
    path.unlink()
    with pytest.raises(RunDirError, match=GATE_FILE):
        load_trained(result.run_dir, client=1)
    key = "gate/" + name + ".weight"
    setup.engine.restore(server, {1: {**clients[1], key: torch.zeros(3, saved[name].shape[1])}}, weights)
    with pytest.raises(ValueError, match=key):
        setup.engine.load_client_model(1, server)
