"""Invariants of colr, lora_a2, lora_fair and fedinc (METHODS.md §3, §5, §9, §10) on hand-built tensors.

Every test uses non-square modules (one in nn.Linear layout, one Conv1D-style) and unequal client weights, so a
transposed factor or a swapped weighting changes the result.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import HEAD, random_state

from fedlora.adapters import LoraLayout, LoraModuleSpec
from fedlora.client.codecs import encode_state, parse_codec, payload_bytes, roundtrip
from fedlora.methods import ClientUpdate, ModuleRank, TrainStats, build_method

STATS = TrainStats(steps=1, samples_seen=1, train_loss=0.0, lr=1e-3)
SIZES = (10, 30, 60)


def _p(sizes=SIZES) -> list[float]:
    return [n / sum(sizes) for n in sizes]


# ---------------------------------------------------------------------------------------------- colr
@pytest.mark.invariant("colr")
def test_colr_shared_projection_rowwise_mean_and_merge(layout, gen) -> None:
    m = build_method("colr", layout, seed=3)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    assert all(torch.count_nonzero(server.adapter[k]) == 0 for k in layout.b_keys)  # the global B is always 0
    plans = [m.plan(0, k, server) for k in range(3)]
    assert {p.reinit_seed for p in plans} == {plans[0].reinit_seed}  # one projection for the whole round
    assert plans[0].train_keys == frozenset(layout.b_keys + (HEAD,))
    assert set(plans[0].download) == {HEAD}
    starts = [m.start_state(p, initial, None) for p in plans]
    for spec in layout.modules:
        a_t = starts[0][spec.a_key]
        for st in starts[1:]:
            assert torch.equal(st[spec.a_key], a_t)
        assert torch.count_nonzero(starts[0][spec.b_key]) == 0
        assert torch.equal(m.reference(plans[1])[spec.a_key], a_t)  # the server knows where clients started
        # orthonormal rows scaled by sqrt(n/r): A Aᵀ = (n/r) I
        n, r = spec.in_features, spec.rank
        torch.testing.assert_close(a_t @ a_t.T, (n / r) * torch.eye(r), atol=1e-5, rtol=1e-5)

    # hand-built B_k; some rows untouched (exactly zero) by some clients, one row by nobody
    ups = []
    for k in range(3):
        state = {HEAD: torch.randn(3, 5, generator=gen)}
        for spec in layout.modules:
            b = torch.randn(spec.out_features, spec.rank, generator=gen)
            if k == 0:
                b[1] = 0.0
            if k in (0, 2):
                b[3] = 0.0
            b[5] = 0.0  # nobody touches row 5
            state[spec.b_key] = b
        ups.append(ClientUpdate(k, state, num_examples=SIZES[k], samples_seen=SIZES[k], ranks=plans[k].ranks))
    res = m.aggregate(0, server, ups)
    assert res.base_delta is not None
    for spec in layout.modules:
        b_f, a_f = res.base_delta[spec.name]
        a_t = starts[0][spec.a_key]
        torch.testing.assert_close(a_f, a_t)  # the merge uses the very projection the clients trained against
        got = b_f @ a_f
        assert got.shape == (spec.out_features, spec.in_features)  # nn.Linear layout, also for Conv1D
        s = spec.scaling()
        for i in range(spec.out_features):  # (Σ_k c_i B_k[i]) A == Σ_k c_i (B_k[i] A), c_i = 1/max(1, count_i)
            touched = [u for u in ups if bool(u.state[spec.b_key][i].ne(0).any())]
            c = 1.0 / max(1, len(touched))
            want = sum((c * s * (u.state[spec.b_key][i] @ a_t) for u in touched), torch.zeros(spec.in_features))
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(got[5]) == 0
        assert torch.equal(res.adapter[spec.b_key], server.adapter[spec.b_key])  # still 0: the model is merged
        assert torch.equal(res.adapter[spec.a_key], server.adapter[spec.a_key])
    torch.testing.assert_close(res.adapter[HEAD], sum(u.state[HEAD] for u in ups) / 3)  # uniform, as the reference

    # the next round draws a new shared projection (Re-Initial), again with A Aᵀ = (n/r) I
    nxt = m.start_state(m.plan(1, 0, server), initial, None)
    for spec in layout.modules:
        assert not torch.equal(nxt[spec.a_key], starts[0][spec.a_key])
        n, r = spec.in_features, spec.rank
        torch.testing.assert_close(nxt[spec.a_key] @ nxt[spec.a_key].T, (n / r) * torch.eye(r), atol=1e-5, rtol=1e-5)

    # rows=all: the plain weighted mean (zeros included); num_examples weights renormalise over a row's owners
    plain = build_method("colr", layout, seed=3, options={"rows": "all"}).aggregate(0, server, ups)
    weighted = build_method("colr", layout, seed=3, weighting="num_examples").aggregate(0, server, ups)
    p = _p()
    for spec in layout.modules:
        a_t = starts[0][spec.a_key]
        b_f, a_f = plain.base_delta[spec.name]
        mean = sum(u.state[spec.b_key] for u in ups) / 3
        torch.testing.assert_close(b_f @ a_f, spec.scaling() * mean @ a_t, atol=1e-5, rtol=1e-5)
        b_w, _ = weighted.base_delta[spec.name]
        row1 = (p[1] * ups[1].state[spec.b_key][1] + p[2] * ups[2].state[spec.b_key][1]) / (p[1] + p[2])
        torch.testing.assert_close(b_w[1], spec.scaling() * row1)


def test_colr_options_projection_and_gradient_scale(layout, gen) -> None:
    m = build_method("colr", layout, options={"projection": "lora_init"}, init_lora_weights="gaussian")
    initial = random_state(layout, gen)
    st = m.start_state(m.plan(0, 0, m.init_server(initial)), initial, None)
    spec = layout.modules[0]
    assert st[spec.a_key].std() < 1.5 / spec.rank  # N(0, 1/r) rows, not orthonormal ones scaled by sqrt(n/r)
    plan = build_method("colr", layout).plan(0, 0, m.init_server(initial))
    obj = build_method("colr", layout).objective(plan, st, None)
    grads = {k: torch.ones(layout.module(k[: -len(".lora_B.weight")]).b_shape()) for k in layout.b_keys}
    obj.after_backward(grads)
    for s in layout.modules:
        torch.testing.assert_close(grads[s.b_key], torch.full(s.b_shape(), math.sqrt(s.rank / s.in_features)))
    assert build_method("colr", layout, options={"grad_scale": False}).objective(plan, st, None) is None
    wide = LoraLayout(modules=(LoraModuleSpec("x", in_features=2, out_features=5, rank=3, lora_alpha=3.0),))
    with pytest.raises(ValueError, match="projection=orthnorm needs rank <= in_features"):
        build_method("colr", wide)


# ---------------------------------------------------------------------------------------------- lora_a2
def _a2_uploads(m, server, rnd: int, gen, deltas=None):
    """Each client trains the active factor (random change, or ``deltas[k]``) and its head; ``finish`` selects."""
    ups, trained_all = [], []
    for k in range(3):
        plan = m.plan(rnd, k, server)
        trained = dict(m.start_state(plan, server.adapter, None))
        for key in plan.train_keys:
            change = deltas[k][key] if deltas and key in deltas[k] else torch.randn(trained[key].shape, generator=gen)
            trained[key] = trained[key] + change
        upload, keep = m.finish(plan, trained, None, STATS)
        assert keep is None and set(upload) == set(plan.upload)
        ups.append(ClientUpdate(k, upload, num_examples=SIZES[k], samples_seen=SIZES[k], ranks=plan.ranks))
        trained_all.append(trained)
    return ups, trained_all


def _changed_slices(m, layout, ups, server, rnd):
    b = rnd % 2 == 0
    out = []
    for u in ups:
        per = {}
        for spec in layout.modules:
            key = spec.b_key if b else spec.a_key
            diff = u.state[key].ne(server.adapter[key])
            per[spec.name] = diff.any(dim=0 if b else 1).nonzero().flatten().tolist()
        out.append(per)
    return out


@pytest.mark.invariant("lora_a2")
def test_lora_a2_selects_budgeted_slices_and_reduces_to_rolora(layout, gen) -> None:
    initial = random_state(layout, gen)
    # (a) every slice within budget: the update is RoLoRA's exactly, in both kinds of rounds
    full = build_method("lora_a2", layout, options={"upload_ranks": "3"})
    rolora = build_method("rolora", layout)
    server = full.init_server(initial)
    for rnd in (0, 1):
        plan = full.plan(rnd, 0, server)
        assert plan.upload_codec == "none"  # nothing to leave out: the run's codec
        ups, _ = _a2_uploads(full, server, rnd, gen)
        got, want = full.aggregate(rnd, server, ups), rolora.aggregate(rnd, server, ups)
        for key in layout.all_keys:
            torch.testing.assert_close(got.adapter[key], want.adapter[key])
        server = dataclasses.replace(server, adapter=got.adapter, round=rnd + 1)

    # (b) budget 1 of ranks (2, 3): exactly 2 slices per client in total, the best by s·‖Δ‖·‖frozen‖
    m = build_method("lora_a2", layout, options={"upload_ranks": "1"})
    server = m.init_server(initial)
    q, c = layout.modules
    a = {q.a_key: server.adapter[q.a_key], c.a_key: server.adapter[c.a_key]}
    ups, trained = _a2_uploads(m, server, 0, gen)
    chosen = _changed_slices(m, layout, ups, server, 0)
    for k, per in enumerate(chosen):
        assert sum(len(v) for v in per.values()) == 2
        scores = []
        for spec in layout.modules:
            d = (trained[k][spec.b_key] - server.adapter[spec.b_key]).norm(dim=0)
            scores += [
                (spec.scaling() * float(d[i]) * float(a[spec.a_key][i].norm()), spec.name, i) for i in range(spec.rank)
            ]
        best = sorted(scores, reverse=True)[:2]
        assert sorted((n, i) for _, n, i in best) == sorted((n, i) for n, v in per.items() for i in v)
        for spec in layout.modules:  # selected slices carry the trained values; the others what was received
            for i in range(spec.rank):
                col = ups[k].state[spec.b_key][:, i]
                src = trained[k] if i in per[spec.name] else server.adapter
                assert torch.equal(col, src[spec.b_key][:, i])
    # server: B + Σ p_k (M_k ⊙ ΔB_k); the frozen A is bit-identical
    res = m.aggregate(0, server, ups)
    p = _p()
    for spec in layout.modules:
        want = server.adapter[spec.b_key].clone()
        for k in range(len(ups)):
            for i in chosen[k][spec.name]:
                want[:, i] += p[k] * (trained[k][spec.b_key][:, i] - server.adapter[spec.b_key][:, i])
        torch.testing.assert_close(res.adapter[spec.b_key], want)
        assert torch.equal(res.adapter[spec.a_key], server.adapter[spec.a_key])

    # (c) renormalize_per_rank: each slice over its uploaders only
    rn = build_method("lora_a2", layout, options={"upload_ranks": "1", "renormalize_per_rank": True})
    res = rn.aggregate(0, server, ups)
    for spec in layout.modules:
        want = server.adapter[spec.b_key].clone()
        for i in range(spec.rank):
            owners = [k for k in range(3) if i in chosen[k][spec.name]]
            if owners:
                tot = sum(p[k] for k in owners)
                want[:, i] += sum(
                    p[k] / tot * (trained[k][spec.b_key][:, i] - server.adapter[spec.b_key][:, i]) for k in owners
                )
        torch.testing.assert_close(res.adapter[spec.b_key], want)


def test_lora_a2_score_uses_the_frozen_factor_and_a_rounds_swap_roles(layout, gen) -> None:
    initial = random_state(layout, gen)
    q, c = layout.modules
    for rnd in (0, 1):
        b = rnd % 2 == 0
        m = build_method("lora_a2", layout, options={"upload_ranks": "1", "selection": "module"})
        server = m.init_server(initial)
        adapter = dict(server.adapter)
        # the frozen factor's slice 0 is tiny, slice 1 large; the change of slice 0 is twice that of slice 1
        for spec in layout.modules:
            if b:
                adapter[spec.a_key] = torch.ones(spec.rank, spec.in_features)
                adapter[spec.a_key][0] *= 1e-3
            else:
                adapter[spec.b_key] = torch.ones(spec.out_features, spec.rank)
                adapter[spec.b_key][:, 0] *= 1e-3
        server = dataclasses.replace(server, adapter=adapter)
        deltas = []
        for _ in range(3):
            d = {}
            for spec in layout.modules:
                if b:
                    z = torch.zeros(spec.out_features, spec.rank)
                    z[:, 0], z[:, 1] = 2.0, 1.0
                    d[spec.b_key] = z
                else:
                    z = torch.zeros(spec.rank, spec.in_features)
                    z[0], z[1] = 2.0, 1.0
                    d[spec.a_key] = z
            deltas.append(d)
        ups, _ = _a2_uploads(m, server, rnd, gen, deltas)
        for per in _changed_slices(m, layout, ups, server, rnd):
            assert per == {q.name: [1], c.name: [1]}  # product score: slice 1 (‖Δ‖ alone would pick slice 0)
        dm = build_method("lora_a2", layout, options={"upload_ranks": "1", "selection": "module", "score": "delta"})
        ups, _ = _a2_uploads(dm, server, rnd, gen, deltas)
        for per in _changed_slices(dm, layout, ups, server, rnd):
            assert per == {q.name: [0], c.name: [0]}


def test_lora_a2_sparse_upload_sends_only_the_selection_exactly(layout, gen) -> None:
    wide = LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=30, out_features=40, rank=8, lora_alpha=8.0),
            LoraModuleSpec("enc.v", in_features=20, out_features=50, rank=8, lora_alpha=8.0, fan_in_fan_out=True),
        ),
        other_keys=(HEAD,),
    )
    m = build_method("lora_a2", wide, options={"upload_ranks": "1,2,8"})
    server = m.init_server(random_state(wide, gen))
    for rnd in (0, 1):
        ups, _ = _a2_uploads(m, server, rnd, gen)
        for k, u in enumerate(ups):
            plan = m.plan(rnd, k, server)
            codec = parse_codec(plan.upload_codec)
            assert codec.kind == ("none" if k == 2 else "topk")  # budget 8 = the rank: the whole factor
            payload = encode_state(codec, u.state, plan.download)
            decoded = roundtrip(codec, u.state, plan.download)
            for key in plan.upload:  # every selected entry arrives (the rest of the change is exactly zero)
                torch.testing.assert_close(decoded[key], u.state[key], rtol=0, atol=1e-6)
            if k < 2:
                assert payload_bytes(payload) < payload_bytes(u.state)
    # the tiny fixture layout: values + indices would outweigh the dense reply, so it travels dense
    small = build_method("lora_a2", layout, options={"upload_ranks": "1"})
    assert small.plan(0, 0, small.init_server(random_state(layout, gen))).upload_codec == "none"
    with pytest.raises(ValueError, match="sparse_upload.*upload_codec='fp16'"):
        build_method("lora_a2", wide, upload_codec="fp16")
    build_method("lora_a2", wide, upload_codec="fp16", options={"sparse_upload": False})
    with pytest.raises(ValueError, match="upload_ranks='0'"):
        build_method("lora_a2", wide, options={"upload_ranks": "0"})


def test_lora_a2_learning_rate_multiplier_scales_each_step() -> None:
    from fedlora.methods.lora_a2 import StepScale

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = torch.nn.Parameter(p.detach().clone())
    obj = StepScale(["w"], 3.0)
    opts = [torch.optim.AdamW([x], lr=0.1, weight_decay=0.01) for x in (p, ref)]
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.3, weight_decay=0.01)
    tripled = ref_opt.param_groups[0]["params"][0]
    for _ in range(3):
        obj.loss({"w": p})
        for x, opt in ((p, opts[0]), (tripled, ref_opt)):
            opt.zero_grad()
            (x * torch.tensor([1.0, 2.0])).sum().backward()
            opt.step()
        with torch.no_grad():
            obj.after_step({"w": p}, 0.1)
    torch.testing.assert_close(p.detach(), tripled.detach())


# ---------------------------------------------------------------------------------------------- lora_fair
def _dense_ideal(layout, updates, p):
    return {
        spec.name: sum(
            pk * u.ranks[spec.name].scale * u.state[spec.b_key].double() @ u.state[spec.a_key].double()
            for pk, u in zip(p, updates, strict=True)
        )
        for spec in layout.modules
    }


def _with_ranks(layout, updates):
    ranks = {s.name: ModuleRank(s.rank, s.scaling()) for s in layout.modules}
    return [dataclasses.replace(u, ranks=ranks) for u in updates]


@pytest.mark.invariant("lora_fair")
def test_lora_fair_matches_the_closed_form_oracle(layout, updates, gen) -> None:
    updates = _with_ranks(layout, updates)
    server = build_method("lora_fair", layout).init_server(random_state(layout, gen))
    p = _p()
    ideal = _dense_ideal(layout, updates, p)
    lam = 1e-2
    exact = build_method("lora_fair", layout, options={"solver": "closed_form", "lam": lam}).aggregate(
        0, server, updates
    )
    gd = build_method("lora_fair", layout, options={"steps": 2000, "lam": lam}).aggregate(0, server, updates)
    few = build_method("lora_fair", layout).aggregate(0, server, updates)  # the default: 20 steps
    for spec in layout.modules:
        s = spec.scaling()
        a_bar = sum(pk * u.state[spec.a_key] for pk, u in zip(p, updates, strict=True))
        b_bar = sum(pk * u.state[spec.b_key] for pk, u in zip(p, updates, strict=True))
        # the oracle, on dense float64 matrices: B' = B̄ + (ΔW/s − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹
        a64, b64 = a_bar.double(), b_bar.double()
        resid = ideal[spec.name] / s - b64 @ a64
        oracle = b64 + resid @ a64.T @ torch.linalg.inv(a64 @ a64.T + lam * torch.eye(spec.rank, dtype=torch.float64))
        torch.testing.assert_close(exact.adapter[spec.b_key].double(), oracle, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gd.adapter[spec.b_key].double(), oracle, atol=1e-4, rtol=1e-4)
        for res in (exact, gd, few):
            torch.testing.assert_close(res.adapter[spec.a_key], a_bar)  # Ā is sent unchanged
            before = torch.linalg.matrix_norm(s * b64 @ a64 - ideal[spec.name])
            after = torch.linalg.matrix_norm(s * res.adapter[spec.b_key].double() @ a64 - ideal[spec.name])
            assert after < before  # never worse than FedIT (strictly better here)
    torch.testing.assert_close(exact.adapter[HEAD], sum(pk * u.state[HEAD] for pk, u in zip(p, updates, strict=True)))
    assert few.metrics["lora_fair_gap"] < few.metrics["lora_fair_gap_fedit"]
    # λ = 0: least squares, the normal equations hold
    ls = build_method("lora_fair", layout, options={"solver": "closed_form", "lam": 0.0}).aggregate(0, server, updates)
    for spec in layout.modules:
        a64 = ls.adapter[spec.a_key].double()
        normal = (spec.scaling() * ls.adapter[spec.b_key].double() @ a64 - ideal[spec.name]) @ a64.T
        assert float(normal.abs().max()) < 1e-4


def test_lora_fair_cosine_similarity_improves_and_uses_each_clients_scale(layout, updates, gen) -> None:
    updates = _with_ranks(layout, updates)
    server = build_method("lora_fair", layout).init_server(random_state(layout, gen))
    p = _p()
    res = build_method("lora_fair", layout, options={"similarity": "cosine"}).aggregate(0, server, updates)
    ideal = _dense_ideal(layout, updates, p)
    cos = torch.nn.functional.cosine_similarity
    for spec in layout.modules:
        a64 = res.adapter[spec.a_key].double()
        b_bar = sum(pk * u.state[spec.b_key] for pk, u in zip(p, updates, strict=True)).double()
        target = ideal[spec.name].flatten()
        assert cos((res.adapter[spec.b_key].double() @ a64).flatten(), target, dim=0) > cos(
            (b_bar @ a64).flatten(), target, dim=0
        )
    # a client that trained at another scale counts with its own: doubling its scale = doubling its B
    spec = layout.modules[0]
    twice = [
        dataclasses.replace(u, ranks={**u.ranks, spec.name: ModuleRank(spec.rank, 2 * spec.scaling())})
        if u.client_id == 1
        else u
        for u in updates
    ]
    doubled = [
        dataclasses.replace(u, state={**u.state, spec.b_key: 2 * u.state[spec.b_key]}) if u.client_id == 1 else u
        for u in updates
    ]
    m = build_method("lora_fair", layout, options={"solver": "closed_form"})
    t1 = m.aggregate(0, server, twice).metrics
    assert t1["lora_fair_gap"] < t1["lora_fair_gap_fedit"]
    ideal_twice = _dense_ideal(layout, twice, p)[spec.name]
    ideal_doubled = _dense_ideal(layout, doubled, p)[spec.name]
    torch.testing.assert_close(ideal_twice, ideal_doubled)


# ---------------------------------------------------------------------------------------------- fedinc
def _inc_layout() -> LoraLayout:
    """Global rank 6 = 3 clients × rank 2, so every rank vector can be its own cluster."""
    return LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=4, out_features=6, rank=6, lora_alpha=6.0),
            LoraModuleSpec("enc.c_attn", in_features=5, out_features=7, rank=6, lora_alpha=3.0, fan_in_fan_out=True),
        ),
        other_keys=(HEAD,),
    )


def _inc_updates(m, layout, gen, rank=2, k=3):
    ups = []
    for c in range(k):
        plan = m.plan(0, c, m.init_server(random_state(layout, gen)))
        state = {HEAD: torch.randn(3, 5, generator=gen)}
        for spec in layout.modules:
            state[spec.a_key] = torch.randn(rank, spec.in_features, generator=gen)
            state[spec.b_key] = torch.randn(spec.out_features, rank, generator=gen)
        ups.append(ClientUpdate(c, state, num_examples=SIZES[c], samples_seen=SIZES[c], ranks=plan.ranks))
    return ups


def _product(adapter, spec):
    return spec.scaling() * adapter[spec.b_key].double() @ adapter[spec.a_key].double()


def _client_sum(ups, spec, coeff):
    return sum(
        c * u.ranks[spec.name].scale * u.state[spec.b_key].double() @ u.state[spec.a_key].double()
        for c, u in zip(coeff, ups, strict=True)
    )


@pytest.mark.invariant("fedinc")
def test_fedinc_one_cluster_per_vector_reproduces_the_weighted_sum(gen) -> None:
    layout = _inc_layout()
    m = build_method("fedinc", layout, client_ranks=(2, 2, 2), num_clients=3, seed=5)
    server = m.init_server(random_state(layout, gen))
    ups = _inc_updates(m, layout, gen)
    assert ups[0].ranks["enc.q"].scale == 3.0 and layout.modules[0].scaling() == 1.0  # scales differ: folded in
    res = m.aggregate(0, server, ups)
    p = _p()
    for spec in layout.modules:  # N = K·r: Σ_j s·B[:, j]A[j, :] = Σ_k p_k s_k B_k A_k
        torch.testing.assert_close(_product(res.adapter, spec), _client_sum(ups, spec, p), atol=1e-5, rtol=1e-5)
        a, b = res.adapter[spec.a_key], res.adapter[spec.b_key]
        energy = a.norm(dim=1) * b.norm(dim=0)
        assert torch.all(energy[:-1] >= energy[1:])  # largest terms first
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))  # balanced halves
    raw = build_method("fedinc", layout, client_ranks=(2, 2, 2), num_clients=3, options={"cluster_weight": "none"})
    res_raw = raw.aggregate(0, server, ups)
    for spec in layout.modules:  # the survey's raw centroids: the sum, not the average
        torch.testing.assert_close(
            _product(res_raw.adapter, spec), _client_sum(ups, spec, [1, 1, 1]), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(res.adapter[HEAD], sum(pk * u.state[HEAD] for pk, u in zip(p, ups, strict=True)))


def test_fedinc_is_blind_to_scale_and_sign_of_rank_pairs_and_keeps_identical_uploads(layout, gen) -> None:
    m = build_method("fedinc", layout, seed=2)
    server = m.init_server(random_state(layout, gen))
    base = random_state(layout, gen)
    ranks = {s.name: ModuleRank(s.rank, s.scaling()) for s in layout.modules}
    same = [ClientUpdate(k, dict(base), SIZES[k], SIZES[k], ranks=ranks) for k in range(3)]
    res = m.aggregate(0, server, same)
    for spec in layout.modules:  # identical uploads: every rank's cluster holds its K copies, weight 1
        torch.testing.assert_close(_product(res.adapter, spec), _product(base, spec), atol=1e-5, rtol=1e-5)
    # client 1 sends (c·B, A/c) and client 2 (−B, −A) per rank: the same terms, so the same clusters
    twisted = []
    for k, u in enumerate(same):
        st = dict(u.state)
        for spec in layout.modules:
            if k == 1:
                st[spec.b_key], st[spec.a_key] = 3.0 * st[spec.b_key], st[spec.a_key] / 3.0
            if k == 2:
                st[spec.b_key], st[spec.a_key] = -st[spec.b_key], -st[spec.a_key]
        twisted.append(dataclasses.replace(u, state=st))
    again = m.aggregate(0, server, twisted)
    for spec in layout.modules:
        torch.testing.assert_close(_product(again.adapter, spec), _product(base, spec), atol=1e-5, rtol=1e-5)


def test_fedinc_fills_ranks_without_a_cluster_and_serves_lower_ranks(gen) -> None:
    layout = _inc_layout()
    m = build_method("fedinc", layout, client_ranks=(2, 6, 6), num_clients=3, seed=1)
    server = m.init_server(random_state(layout, gen))
    ups = _inc_updates(m, layout, gen, rank=2, k=1)  # one client of rank 2: 2 vectors for 6 ranks
    res = m.aggregate(0, server, ups)
    for spec in layout.modules:
        b, a = res.adapter[spec.b_key], res.adapter[spec.a_key]
        assert torch.count_nonzero(b[:, 2:]) == 0 and torch.count_nonzero(a[2:]) > 0  # trainable, product unchanged
        torch.testing.assert_close(_product(res.adapter, spec), _client_sum(ups, spec, [1.0]), atol=1e-5, rtol=1e-5)
    srv = dataclasses.replace(server, adapter=res.adapter)
    plan = m.plan(1, 0, srv)  # the rank-2 client receives the two largest terms at its own scale
    for spec in layout.modules:
        got = plan.ranks[spec.name].scale * plan.download[spec.b_key] @ plan.download[spec.a_key]
        torch.testing.assert_close(got.double(), _product(res.adapter, spec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_colr_merges_into_real_peft_layers(arch: str, request, tmp_path) -> None:
    """On real peft layers (nn.Linear, and GPT-2's Conv1D stored (in, out)) the merged model after a round is
    W0 + s·mean_k(B_k)·A_t with the round's shared projection, and the global adapter adds nothing (B = 0)."""
    from helpers import tiny_config

    from fedlora.adapters.peft_io import AdapterSlots, base_weights
    from fedlora.adapters.state import delta_weight
    from fedlora.api import build, resolve_config
    from fedlora.federation.round import run_round

    model_dir = request.getfixturevalue("tiny_bert" if arch == "bert" else "tiny_gpt2")
    cfg = resolve_config(tiny_config(model_dir, tmp_path, method="colr", max_examples_per_label=20, local_epochs=1))
    setup = build(cfg)
    engine, m, layout = setup.engine, setup.method, setup.layout
    assert any(s.in_features != s.out_features for s in layout.modules) or arch == "bert"

    def effective() -> dict[str, torch.Tensor]:
        st = AdapterSlots(setup.model).read()
        out = {}
        for spec in layout.modules:
            w = base_weights(setup.model, layout)[spec.name].detach()
            out[spec.name] = (w.T if spec.fan_in_fan_out else w).clone() + delta_weight(st, spec)
        return out

    server = m.init_server(engine.initial)
    server, _ = run_round(0, m, server, engine, clients=[0, 1, 2, 3])
    engine.evaluate(server)
    before = effective()
    captured = []
    original = engine.train
    engine.train = lambda plans: captured.extend(original(plans)) or captured[-len(plans) :]  # type: ignore[method-assign]
    server, report = run_round(1, m, server, engine, clients=[0, 1, 2, 3])
    assert len(report.accepted) == 4
    engine.evaluate(server)
    got = effective()
    for spec in layout.modules:
        a_t = m.projection(spec, spec.rank, m.round_seed(1))
        b_bar = sum(u.state[spec.b_key].float() for u in captured) / 4
        ideal = before[spec.name] + spec.scaling() * b_bar @ a_t
        torch.testing.assert_close(got[spec.name], ideal, rtol=1e-5, atol=1e-5)
        assert (ideal - before[spec.name]).abs().max() > 1e-4
