"""Heterogeneous client ranks: HetLoRA (§15), zero/replication padding (§16), and mixed-rank FlexLoRA (§6),
FLoRA (§7) and the client's rank-r_k training on the one shared model.

Hand-built tensors on non-square modules; every client has its own rank and its own scale (``alpha/r_k``), and
expected values are computed here from the formulas, not with the methods' helpers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import HEAD, tiny_config

from fedlora.adapters import LoraLayout, LoraModuleSpec, dense_svd
from fedlora.federation.round import decode_reply
from fedlora.methods import ClientUpdate, ModuleRank, TrainStats, build_method
from fedlora.methods.hetlora import SelfPruningTerm, product_norm

STATS = TrainStats(steps=1, samples_seen=1, train_loss=0.0, lr=1e-3)
R = 6  # global rank


@pytest.fixture
def hlayout() -> LoraLayout:
    """Two non-square modules at global rank 6 with different alphas, and a head."""
    return LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=7, out_features=10, rank=R, lora_alpha=12.0),
            LoraModuleSpec("enc.v", in_features=8, out_features=9, rank=R, lora_alpha=3.0),
        ),
        other_keys=(HEAD,),
    )


def _server_adapter(layout: LoraLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    st = {}
    for spec in layout.modules:
        st[spec.a_key] = torch.randn(R, spec.in_features, generator=gen)
        st[spec.b_key] = torch.randn(spec.out_features, R, generator=gen)
    st[HEAD] = torch.randn(3, 5, generator=gen)
    return st


def _update(layout: LoraLayout, cid: int, r: int, n: int, gen: torch.Generator) -> ClientUpdate:
    """A reply at rank ``r`` with the constant rule's scale ``alpha/r`` (different for every rank)."""
    st, ranks = {}, {}
    for spec in layout.modules:
        st[spec.a_key] = torch.randn(r, spec.in_features, generator=gen)
        st[spec.b_key] = torch.randn(spec.out_features, r, generator=gen) * (cid + 1)  # unequal norms
        ranks[spec.name] = ModuleRank(r, spec.lora_alpha / r)
    st[HEAD] = torch.randn(3, 5, generator=gen)
    return ClientUpdate(cid, st, num_examples=n, samples_seen=n, ranks=ranks)


def _pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(size - x.shape[0], x.shape[1])], 0)


def _pad_cols(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(x.shape[0], size - x.shape[1])], 1)


# ============================================================================================ HetLoRA
@pytest.mark.invariant("hetlora")
def test_hetlora_slices_weights_by_product_norm_and_pads_with_zeros(hlayout, gen) -> None:
    ranks = (2, 3, 4)
    m = build_method("hetlora", hlayout, num_clients=3, client_ranks=ranks)
    server = m.init_server(_server_adapter(hlayout, gen))
    assert server.meta["ranks"] == {"0": 2, "1": 3, "2": 4}
    # each client receives exactly the first r_k ranks of the global adapter, nothing rescaled
    for cid, r in enumerate(ranks):
        plan = m.plan(0, cid, server)
        assert plan.rank_may_shrink
        for spec in hlayout.modules:
            assert plan.ranks[spec.name] == ModuleRank(r, spec.lora_alpha / r)
            assert torch.equal(plan.download[spec.a_key], server.adapter[spec.a_key][:r])
            assert torch.equal(plan.download[spec.b_key], server.adapter[spec.b_key][:, :r])
            assert plan.upload[spec.a_key].shape == (r, spec.in_features)
            assert plan.upload[spec.b_key].shape == (spec.out_features, r)
        assert torch.equal(plan.download[HEAD], server.adapter[HEAD])
    sizes = (10, 30, 60)
    ups = [_update(hlayout, cid, r, n, gen) for cid, (r, n) in enumerate(zip(ranks, sizes, strict=True))]
    res = m.aggregate(0, server, ups)
    per_module = []
    for spec in hlayout.modules:
        # w_k ∝ ‖s_k B_k A_k‖_F with each client's own scale alpha/r_k, per module
        norms = torch.tensor(
            [
                torch.linalg.matrix_norm(spec.lora_alpha / r * u.state[spec.b_key] @ u.state[spec.a_key]).item()
                for r, u in zip(ranks, ups, strict=True)
            ]
        )
        w = (norms / norms.sum()).tolist()
        got_w = m.norm_weights(spec, ups)
        assert sum(got_w) == pytest.approx(1.0)
        assert got_w == pytest.approx(w, rel=1e-6)
        per_module.append(w)
        want_a = sum(wk * _pad_rows(u.state[spec.a_key], R) for wk, u in zip(w, ups, strict=True))
        want_b = sum(wk * _pad_cols(u.state[spec.b_key], R) for wk, u in zip(w, ups, strict=True))
        torch.testing.assert_close(res.adapter[spec.a_key], want_a)
        torch.testing.assert_close(res.adapter[spec.b_key], want_b)
        # ranks no client used (4, 5) are zero
        assert torch.count_nonzero(res.adapter[spec.a_key][max(ranks) :]) == 0
        assert torch.count_nonzero(res.adapter[spec.b_key][:, max(ranks) :]) == 0
        assert torch.count_nonzero(res.adapter[spec.a_key][: max(ranks)].abs().sum(1)) == max(ranks)
    assert per_module[0] != pytest.approx(per_module[1], rel=1e-3)  # weights are per module
    # heads: data-size weighting (num_examples), not the norm weights
    p = [n / sum(sizes) for n in sizes]
    torch.testing.assert_close(res.adapter[HEAD], sum(pk * u.state[HEAD] for pk, u in zip(p, ups, strict=True)))
    assert json.loads(json.dumps(res.meta)) == res.meta


def test_hetlora_product_norm_never_forms_the_product(gen) -> None:
    a, b = torch.randn(3, 11, generator=gen), torch.randn(5, 3, generator=gen)
    assert product_norm(a, b) == pytest.approx(torch.linalg.matrix_norm(b @ a).item(), rel=1e-6)
    assert product_norm(a, torch.zeros(5, 3)) == 0.0


def test_hetlora_zero_products_fall_back_to_client_weighting(hlayout, gen) -> None:
    m = build_method("hetlora", hlayout, num_clients=2, client_ranks=(2, 4))
    ups = [_update(hlayout, c, r, n, gen) for c, (r, n) in enumerate(((2, 10), (4, 30)))]
    ups = [
        dataclasses.replace(
            u, state={**u.state, **{s.b_key: torch.zeros_like(u.state[s.b_key]) for s in hlayout.modules}}
        )
        for u in ups
    ]
    assert m.norm_weights(hlayout.modules[0], ups) == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("gamma, rank, tail", [(0.99, 4, 3), (0.5, 4, 2), (0.5, 6, 3)])
def test_hetlora_regulariser_has_a_real_gradient(hlayout, gen, gamma: float, rank: int, tail: int) -> None:
    lam = 0.3
    m = build_method("hetlora", hlayout, num_clients=1, client_ranks=(rank,), options={"lam": lam, "gamma": gamma})
    server = m.init_server(_server_adapter(hlayout, gen))
    plan = m.plan(0, 0, server)
    assert m.tail_start(plan) == tail
    start = m.start_state(plan, server.adapter, None)
    obj = m.objective(plan, start, None)
    assert isinstance(obj, SelfPruningTerm)
    # the loop hands the objective differentiable views of parameters held at the global rank (AdapterSlots.view)
    full = {
        k: _pad_rows(v, R) if k.endswith("lora_A.weight") else _pad_cols(v, R) for k, v in start.items() if k != HEAD
    }
    leaves = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    views = {k: (v[:rank] if k.endswith("lora_A.weight") else v[:, :rank]) for k, v in leaves.items()}
    value = obj.loss(views)
    value.backward()
    want_value = 0.0
    for spec in hlayout.modules:
        a, b = start[spec.a_key], start[spec.b_key]
        na, nb = a[tail:].norm(), b[:, tail:].norm()
        want_value += lam * (na * nb).item()
        ga, gb = leaves[spec.a_key].grad, leaves[spec.b_key].grad
        # hand formula: d/dA_t = λ‖B_t‖ A_t/‖A_t‖, d/dB_t = λ‖A_t‖ B_t/‖B_t‖; nothing on the kept ranks or padding
        torch.testing.assert_close(ga[tail:rank], lam * nb * a[tail:] / na)
        torch.testing.assert_close(gb[:, tail:rank], lam * na * b[:, tail:] / nb)
        assert torch.count_nonzero(ga[:tail]) == 0 and torch.count_nonzero(ga[rank:]) == 0
        assert torch.count_nonzero(gb[:, :tail]) == 0 and torch.count_nonzero(gb[:, rank:]) == 0
        assert ga[tail:rank].abs().sum() > 0 and gb[:, tail:rank].abs().sum() > 0
    assert value.item() == pytest.approx(want_value, rel=1e-6)
    # autograd on the hand-written expression agrees
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in start.items() if k != HEAD}
    total = sum(
        lam * ref[s.b_key][:, tail:].pow(2).sum().sqrt() * ref[s.a_key][tail:].pow(2).sum().sqrt()
        for s in hlayout.modules
    )
    total.backward()
    for k, v in ref.items():
        cut = leaves[k].grad[:rank] if k.endswith("lora_A.weight") else leaves[k].grad[:, :rank]
        torch.testing.assert_close(cut, v.grad)


def test_hetlora_regulariser_is_finite_at_zero_b_and_off_at_min_rank(hlayout, gen) -> None:
    m = build_method("hetlora", hlayout, num_clients=2, client_ranks=(4, 1))
    adapter = _server_adapter(hlayout, gen)
    adapter.update({s.b_key: torch.zeros(s.out_features, R) for s in hlayout.modules})  # round 0: B = 0
    server = m.init_server(adapter)
    plan = m.plan(0, 0, server)
    start = m.start_state(plan, server.adapter, None)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items() if k != HEAD}
    m.objective(plan, start, None).loss(params).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in params.values())
    # a client at min_rank has no tail: no regulariser, never pruned
    plan1 = m.plan(0, 1, server)
    assert m.objective(plan1, m.start_state(plan1, server.adapter, None), None) is None
    assert (
        build_method("hetlora", hlayout, num_clients=1, client_ranks=(4,), options={"lam": 0.0}).objective(
            plan, start, None
        )
        is None
    )


def _trained_from(plan, hlayout, tail: int, factor: float) -> dict[str, torch.Tensor]:
    """The downloaded slice with its tail ranks multiplied by ``factor`` and the kept ranks perturbed."""
    out = {HEAD: plan.download[HEAD] + 1.0}
    for spec in hlayout.modules:
        a, b = plan.download[spec.a_key].clone(), plan.download[spec.b_key].clone()
        a[:tail] += 0.5
        a[tail:] *= factor
        b[:, tail:] *= factor
        out[spec.a_key], out[spec.b_key] = a, b
    return out


def test_hetlora_prunes_when_the_tail_shrank_and_the_server_keeps_the_rank(hlayout, gen) -> None:
    m = build_method("hetlora", hlayout, num_clients=2, client_ranks=(4, 6), options={"gamma": 0.5})
    server = m.init_server(_server_adapter(hlayout, gen))
    plan = m.plan(0, 0, server)
    assert m.tail_start(plan) == 2
    # the tail grew: the reply keeps rank 4
    up, keep = m.finish(plan, _trained_from(plan, hlayout, 2, 1.5), None, STATS)
    assert keep is None
    assert all(up[s.a_key].shape[0] == 4 for s in hlayout.modules)
    # the tail shrank: every module is cut to t = ⌊0.5·4⌋ = 2, the kept ranks unchanged
    trained = _trained_from(plan, hlayout, 2, 0.5)
    up, _ = m.finish(plan, trained, None, STATS)
    for spec in hlayout.modules:
        assert torch.equal(up[spec.a_key], trained[spec.a_key][:2])
        assert torch.equal(up[spec.b_key], trained[spec.b_key][:, :2])
    assert torch.equal(up[HEAD], trained[HEAD])
    # the round logic accepts the lower rank at the planned scale ...
    ranks = {s.name: ModuleRank(2, plan.ranks[s.name].scale) for s in hlayout.modules}
    reply = decode_reply(ClientUpdate(0, up, num_examples=5, samples_seen=5, ranks=ranks), plan)
    assert isinstance(reply, ClientUpdate), reply
    # ... and the server plans the client at its new rank (and its scale) from then on
    other = _update(hlayout, 1, 6, 5, gen)
    res = m.aggregate(0, server, [reply, other])
    assert res.meta["ranks"] == {"0": 2, "1": 6}
    assert res.metrics["mean_client_rank"] == 4.0
    nxt = m.plan(1, 0, dataclasses.replace(server, adapter=res.adapter, meta=res.meta, round=1))
    for spec in hlayout.modules:
        assert nxt.ranks[spec.name] == ModuleRank(2, spec.lora_alpha / 2)
        assert nxt.download[spec.a_key].shape == (2, spec.in_features)
    # prune=false never cuts, and then a lower rank is not allowed
    m2 = build_method("hetlora", hlayout, num_clients=2, client_ranks=(4, 6), options={"gamma": 0.5, "prune": False})
    plan2 = m2.plan(0, 0, m2.init_server(server.adapter))
    assert not plan2.rank_may_shrink
    assert m2.finish(plan2, trained, None, STATS)[0][hlayout.modules[0].a_key].shape[0] == 4
    # min_rank bounds the cut
    m3 = build_method("hetlora", hlayout, num_clients=2, client_ranks=(4, 6), options={"gamma": 0.5, "min_rank": 3})
    plan3 = m3.plan(0, 0, m3.init_server(server.adapter))
    assert m3.tail_start(plan3) == 3
    assert m3.finish(plan3, _trained_from(plan3, hlayout, 3, 0.5), None, STATS)[0][hlayout.a_keys[0]].shape[0] == 3


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk:0.5"])
def test_hetlora_pruned_reply_passes_every_upload_codec(hlayout, gen, codec: str) -> None:
    from fedlora.client.codecs import encode_state, parse_codec

    m = build_method("hetlora", hlayout, num_clients=1, client_ranks=(4,), options={"gamma": 0.5}, upload_codec=codec)
    plan = m.plan(0, 0, m.init_server(_server_adapter(hlayout, gen)))
    up, _ = m.finish(plan, _trained_from(plan, hlayout, 2, 0.5), None, STATS)
    payload = encode_state(parse_codec(codec), up, plan.download)
    ranks = {s.name: ModuleRank(2, plan.ranks[s.name].scale) for s in hlayout.modules}
    reply = decode_reply(ClientUpdate(0, payload, num_examples=5, samples_seen=5, ranks=ranks), plan)
    assert isinstance(reply, ClientUpdate), reply
    assert all(reply.state[s.b_key].shape == (s.out_features, 2) for s in hlayout.modules)


def test_hetlora_revives_ranks_nobody_trained(hlayout, gen) -> None:
    m = build_method("hetlora", hlayout, num_clients=2, client_ranks=(2, 5), seed=3)
    adapter = _server_adapter(hlayout, gen)
    for spec in hlayout.modules:  # after a round with rank-2 and rank-3 clients only: ranks 3.. are zero
        adapter[spec.a_key][3:] = 0
        adapter[spec.b_key][:, 3:] = 0
    server = m.init_server(adapter)
    plan = m.plan(1, 1, server)
    start = m.start_state(plan, server.adapter, None)
    for spec in hlayout.modules:
        assert torch.equal(plan.download[spec.a_key], adapter[spec.a_key][:5])  # the download is the exact slice
        a = start[spec.a_key]
        assert torch.equal(a[:3], adapter[spec.a_key][:3])
        assert bool((a[3:5].abs().sum(1) > 0).all())  # revived rows
        assert torch.count_nonzero(start[spec.b_key][:, 3:]) == 0
        torch.testing.assert_close(start[spec.b_key] @ a, adapter[spec.b_key][:, :5] @ adapter[spec.a_key][:5])
    again = m.start_state(plan, server.adapter, None)
    assert all(torch.equal(again[k], v) for k, v in start.items())  # seeded: resume redraws the same rows
    off = build_method("hetlora", hlayout, num_clients=2, client_ranks=(2, 5), options={"revive": False})
    st = off.start_state(plan, server.adapter, None)
    assert torch.count_nonzero(st[hlayout.a_keys[0]][3:]) == 0


def test_hetlora_homogeneous_ranks_start_at_the_global_rank(hlayout, gen) -> None:
    m = build_method("hetlora", hlayout, num_clients=2)
    server = m.init_server(_server_adapter(hlayout, gen))
    assert server.meta["ranks"] == {"0": R, "1": R}
    assert m.plan(0, 1, server).ranks["enc.q"].rank == R
    assert m.client_rank(1) is None


# ============================================================================================ padding (§16)
@pytest.mark.invariant("pad_zero")
@pytest.mark.invariant("pad_replicate")
@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_zero_and_replication_padding(hlayout, gen, weighting: str) -> None:
    ranks, sizes = (2, 3, 5), (10, 30, 60)
    adapter = _server_adapter(hlayout, gen)
    zero = build_method("pad_zero", hlayout, num_clients=3, client_ranks=ranks, weighting=weighting)
    rep = build_method("rbla", hlayout, num_clients=3, client_ranks=ranks, weighting=weighting)
    server = zero.init_server(adapter)
    for cid, r in enumerate(ranks):
        for m in (zero, rep):
            plan = m.plan(0, cid, server)
            for spec in hlayout.modules:
                assert plan.ranks[spec.name] == ModuleRank(r, spec.lora_alpha / r)
                assert torch.equal(plan.download[spec.a_key], adapter[spec.a_key][:r])
                assert torch.equal(plan.download[spec.b_key], adapter[spec.b_key][:, :r])
    ups = [_update(hlayout, c, r, n, gen) for c, (r, n) in enumerate(zip(ranks, sizes, strict=True))]
    w = [1.0, 1.0, 1.0] if weighting == "uniform" else [10.0, 30.0, 60.0]
    total = sum(w)
    rz, rr = zero.aggregate(0, server, ups), rep.aggregate(0, server, ups)
    for spec in hlayout.modules:
        for key, rows in ((spec.a_key, True), (spec.b_key, False)):

            def idx(x, i, rows=rows):
                return x[i] if rows else x[:, i]

            z, p = rz.adapter[key], rr.adapter[key]
            for i in range(R):
                owners = [k for k, r in enumerate(ranks) if r > i]
                num = sum(w[k] * idx(ups[k].state[key], i) for k in owners) if owners else None
                if not owners:  # nobody owns rank 5: zero dilutes to 0, replicate keeps the global value
                    assert torch.count_nonzero(idx(z, i)) == 0
                    assert torch.equal(idx(p, i), idx(adapter[key], i))
                    continue
                torch.testing.assert_close(idx(z, i), num / total)
                torch.testing.assert_close(idx(p, i), num / sum(w[k] for k in owners))
                if len(owners) == 1:  # ranks 3, 4: client 2 alone
                    c = owners[0]
                    torch.testing.assert_close(idx(p, i), idx(ups[c].state[key], i))
                    torch.testing.assert_close(idx(z, i), w[c] / total * idx(ups[c].state[key], i))
                if i < min(ranks):
                    torch.testing.assert_close(idx(z, i), idx(p, i))
    head = sum(wk / total * u.state[HEAD] for wk, u in zip(w, ups, strict=True))
    torch.testing.assert_close(rz.adapter[HEAD], head)
    torch.testing.assert_close(rr.adapter[HEAD], head)


def test_padding_defaults(hlayout) -> None:
    assert build_method("pad_zero", hlayout).weighting == "uniform"  # RBLA's default weights: 1.0 each
    assert build_method("rbla", hlayout).id == "pad_replicate"


# ============================================================================================ FlexLoRA, FLoRA mixed
@pytest.mark.invariant("flexlora")
def test_flexlora_mixed_ranks_each_client_gets_its_best_rank_approximation(hlayout, gen) -> None:
    ranks, sizes = (2, 4, 6), (10, 30, 60)
    m = build_method("flexlora", hlayout, num_clients=3, client_ranks=ranks)
    server = m.init_server(_server_adapter(hlayout, gen))
    ups = [_update(hlayout, c, r, n, gen) for c, (r, n) in enumerate(zip(ranks, sizes, strict=True))]
    res = m.aggregate(0, server, ups)
    server = dataclasses.replace(server, adapter=res.adapter, round=1)
    p = [n / sum(sizes) for n in sizes]
    for spec in hlayout.modules:
        ideal = sum(
            pk * (spec.lora_alpha / r) * u.state[spec.b_key] @ u.state[spec.a_key]
            for pk, r, u in zip(p, ranks, ups, strict=True)
        )
        ref = dense_svd(ideal)
        assert ref.s[3] > 1e-3  # the sum has more than 2 or 4 directions: truncation matters
        for cid, r in enumerate(ranks):
            plan = m.plan(1, cid, server)
            s_k = spec.lora_alpha / r
            assert plan.ranks[spec.name] == ModuleRank(r, s_k)
            a, b = plan.download[spec.a_key], plan.download[spec.b_key]
            assert a.shape == (r, spec.in_features) and b.shape == (spec.out_features, r)
            torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-5, rtol=1e-5)
            got = s_k * b @ a
            torch.testing.assert_close(got, ref.dense(r), atol=1e-4, rtol=1e-4)
            resid = torch.linalg.matrix_norm(ideal - got)
            torch.testing.assert_close(resid, ref.s[r:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)


@pytest.mark.invariant("flora")
def test_flora_mixed_ranks_stack_with_each_clients_scale(hlayout, gen) -> None:
    ranks, sizes = (2, 4, 6), (10, 30, 60)
    m = build_method("flora", hlayout, num_clients=3, client_ranks=ranks, seed=2)
    server = m.init_server(_server_adapter(hlayout, gen))
    ups = [_update(hlayout, c, r, n, gen) for c, (r, n) in enumerate(zip(ranks, sizes, strict=True))]
    res = m.aggregate(0, server, ups)
    p = [n / sum(sizes) for n in sizes]
    for spec in hlayout.modules:
        b_stack, a_stack = res.base_delta[spec.name]
        assert b_stack.shape == (spec.out_features, sum(ranks)) and a_stack.shape == (sum(ranks), spec.in_features)
        ideal = sum(
            pk * (spec.lora_alpha / r) * u.state[spec.b_key] @ u.state[spec.a_key]
            for pk, r, u in zip(p, ranks, ups, strict=True)
        )
        torch.testing.assert_close(b_stack @ a_stack, ideal)
    for cid, r in enumerate(ranks):  # each client redraws a LoRA of its own rank
        start = m.start_state(m.plan(1, cid, server), server.adapter, None)
        assert start[hlayout.a_keys[0]].shape[0] == r and torch.count_nonzero(start[hlayout.b_keys[0]]) == 0


# ============================================================================================ real tiny model
def _mixed_config(model: str, tmp_path, **kw):
    from fedlora.api import resolve_config

    base = dict(client_ranks="list:2,4,6", clients=3, lora_r=6, lora_alpha=12.0, rounds=2, max_examples_per_label=20)
    return resolve_config(tiny_config(model, tmp_path, **{**base, "local_epochs": 1, **kw}))


def _hand_scale(rule: str, r: int, alpha: float = 12.0, global_r: int = 6) -> float:
    return {"constant": alpha / r, "proportional": alpha / global_r, "rslora": alpha / math.sqrt(r)}[rule]


@pytest.mark.parametrize("rule", ["proportional", "constant"])
def test_flora_mixed_ranks_reach_the_ideal_model(rule: str, tiny_bert: str, tmp_path) -> None:
    """alpha_k = 2·r_k (proportional: scale 2 for all, FLoRA's setting) or alpha fixed (scales 6, 3, 2)."""
    from fedlora.adapters.peft_io import base_weights
    from fedlora.api import build
    from fedlora.federation.round import run_round

    setup = build(_mixed_config(tiny_bert, tmp_path, method="flora", alpha_rule=rule))
    engine, method, layout = setup.engine, setup.method, setup.layout
    server = method.init_server(engine.initial)
    server, _ = run_round(0, method, server, engine, clients=[0, 1, 2])
    captured = []
    original = engine.train

    def capture(plans):
        replies = original(plans)
        captured.extend(replies)
        return replies

    engine.train = capture  # type: ignore[method-assign]
    w0 = {n: w.detach().clone() for n, w in base_weights(setup.model, layout).items()}
    server, report = run_round(1, method, server, engine, clients=[0, 1, 2])
    assert len(report.accepted) == 3
    sizes = [u.num_examples for u in captured]
    assert len(set(sizes)) == 3  # unequal clients: the weighting matters
    p = [n / sum(sizes) for n in sizes]
    engine.evaluate(server)  # the shared base takes the round's change
    from fedlora.adapters.peft_io import AdapterSlots

    live = AdapterSlots(setup.model).read()
    for spec in layout.modules:
        for u, r in zip(captured, (2, 4, 6), strict=True):
            assert u.state[spec.a_key].shape == (r, spec.in_features)
            assert u.ranks[spec.name].scale == pytest.approx(_hand_scale(rule, r))
        w_new = base_weights(setup.model, layout)[spec.name].detach()
        got = w_new + spec.scaling() * live[spec.b_key].float() @ live[spec.a_key].float()
        ideal = w0[spec.name] + sum(
            pk * _hand_scale(rule, r) * u.state[spec.b_key] @ u.state[spec.a_key]
            for pk, r, u in zip(p, (2, 4, 6), captured, strict=True)
        )
        # relative to the round's change itself (stricter than relative to the weight)
        rel = torch.linalg.matrix_norm(got - ideal) / torch.linalg.matrix_norm(ideal - w0[spec.name])
        assert rel <= 1e-5, (spec.name, rel.item())
        assert (ideal - w0[spec.name]).abs().max() > 1e-4


def test_hetlora_regulariser_drives_pruning_in_the_training_loop(tiny_bert: str, tmp_path) -> None:
    """On a real model, through the one training loop: a strong regulariser shrinks every client's tail, so every
    client prunes one rank, the round accepts the lower ranks, and the rank nobody owns any more is zero."""
    from fedlora.api import build
    from fedlora.federation.round import run_round

    cfg = _mixed_config(tiny_bert, tmp_path, method="hetlora", method_options={"lam": 50.0}, max_examples_per_label=10)
    setup = build(cfg)
    engine, method, layout = setup.engine, setup.method, setup.layout
    server = method.init_server(engine.initial)
    g = torch.Generator().manual_seed(5)
    adapter = dict(server.adapter)
    for spec in layout.modules:  # a non-zero B, so the tail starts with a positive norm product
        adapter[spec.b_key] = 0.1 * torch.randn(spec.out_features, spec.rank, generator=g)
    server = dataclasses.replace(server, adapter=adapter)
    server, report = run_round(0, method, server, engine, clients=[0, 1, 2])
    assert sorted(report.accepted) == [0, 1, 2] and not report.rejected
    assert server.meta["ranks"] == {"0": 1, "1": 3, "2": 5}
    for spec in layout.modules:
        assert torch.count_nonzero(server.adapter[spec.a_key][5:]) == 0
        assert torch.count_nonzero(server.adapter[spec.b_key][:, 5:]) == 0
    assert method.plan(1, 2, server).ranks[layout.modules[0].name].rank == 5


@pytest.mark.parametrize("rule", ["constant", "proportional", "rslora"])
def test_client_trains_exactly_a_rank_rk_lora(rule: str, tiny_bert: str, tmp_path) -> None:
    """The shared model holding a rank-2 client (zero-padded to 6, the client's scale) gives the logits and
    gradients of a peft model built at r=2 with the client's alpha, on the same base weights."""
    from fedlora.adapters.peft_io import AdapterSlots
    from fedlora.api import build
    from fedlora.models.loading import wrap_lora

    cfg = _mixed_config(tiny_bert, tmp_path, method="flexlora", alpha_rule=rule, lora_dropout=0.0)
    setup = build(cfg)
    engine, layout, task = setup.engine, setup.layout, setup.task
    r = 2
    g = torch.Generator().manual_seed(11)
    state = {k: v.clone() for k, v in engine.initial.items() if k in layout.other_keys}
    for k in state:
        state[k] = state[k] + 0.1 * torch.randn(state[k].shape, generator=g)
    for spec in layout.modules:
        state[spec.a_key] = 0.3 * torch.randn(r, spec.in_features, generator=g)
        state[spec.b_key] = 0.3 * torch.randn(spec.out_features, r, generator=g)
    scale = _hand_scale(rule, r)
    planned = setup.method.plan(0, 0, setup.method.init_server(engine.initial)).ranks  # client 0 is the rank-2 one
    assert all(planned[s.name].rank == r and planned[s.name].scale == pytest.approx(scale) for s in layout.modules)
    slots = engine.slots
    slots.load(engine.initial)
    slots.load(state)
    slots.set_scales({spec.name: scale for spec in layout.modules}, None)
    batch = task.collate(engine.global_test, list(range(8)), setup.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run(model, slot):
        model.eval()  # no dropout anywhere; gradients still flow
        slot.set_trainable(list(state))
        for p in slot.params.values():
            p.grad = None
        logits = model(**inputs).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        return logits.detach(), {k: slot.params[k].grad for k in state}

    ours_logits, ours_grads = run(setup.model, slots)
    alpha_k = {"constant": 12.0, "proportional": 12.0 * r / 6, "rslora": 12.0}[rule]
    base = task.load_model(tiny_bert, num_labels=len(setup.data_info["labels"]), seed=cfg.seed)
    peft_model = wrap_lora(
        base,
        task_type=task.peft_task_type,
        r=r,
        lora_alpha=alpha_k,
        lora_dropout=0.0,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        use_rslora=rule == "rslora",
        init_lora_weights="default",
        seed=cfg.seed,
    )
    theirs_slots = AdapterSlots(peft_model)
    assert set(theirs_slots.params) == set(slots.params)
    theirs_slots.load(state)
    theirs_logits, theirs_grads = run(peft_model, theirs_slots)
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    for spec in layout.modules:
        ga, gb = ours_grads[spec.a_key], ours_grads[spec.b_key]
        torch.testing.assert_close(ga[:r], theirs_grads[spec.a_key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb[:, :r], theirs_grads[spec.b_key], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(ga[r:]) == 0 and torch.count_nonzero(gb[:, r:]) == 0  # padding never trains
    for key in layout.other_keys:
        torch.testing.assert_close(ours_grads[key], theirs_grads[key], rtol=1e-5, atol=1e-5)
    assert any(ours_grads[s.a_key][:r].abs().sum() > 0 for s in layout.modules)
    slots.reset_scales()
