"""Each method's METHODS.md invariant on hand-built tensors (non-square modules, unequal client weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import HEAD, random_state

from fedlora.adapters import LoraLayout, dense_svd
from fedlora.methods import ClientUpdate, TrainStats, build_method, get_method_class, method_ids

STATS = TrainStats(steps=1, samples_seen=1, train_loss=0.0, lr=1e-3)

P_NUM = torch.tensor([10.0, 30.0, 60.0]) / 100.0


def _ideal(layout: LoraLayout, updates: list[ClientUpdate], p: list[float]) -> dict[str, torch.Tensor]:
    out = {}
    for spec in layout.modules:
        out[spec.name] = sum(
            pk * spec.scaling() * u.state[spec.b_key] @ u.state[spec.a_key] for pk, u in zip(p, updates, strict=True)
        )
    return out


def _wsum(updates: list[ClientUpdate], key: str, p) -> torch.Tensor:
    return sum(pk * u.state[key] for pk, u in zip(p, updates, strict=True))


def test_registry_lists_the_seven_methods() -> None:
    assert {"fedit", "ffa_lora", "fedex_lora", "flora", "flexlora", "fedsa_lora", "rolora"} <= set(method_ids())
    assert get_method_class("fedavg_lora") is get_method_class("fedit")
    with pytest.raises(ValueError, match="unknown method 'nope'.*fedit"):
        get_method_class("nope")


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "fedex_lora", "flora", "flexlora", "fedsa_lora", "rolora"])
def test_bad_weighting_is_rejected(name: str, layout: LoraLayout) -> None:
    with pytest.raises(ValueError, match="weighting='size'.*num_examples"):
        build_method(name, layout, weighting="size")


@pytest.mark.invariant("fedit")
def test_fedit_averages_factors_separately(layout, updates) -> None:
    m = build_method("fedit", layout)
    server = m.init_server(random_state(layout, torch.Generator().manual_seed(0)))
    res = m.aggregate(0, server, updates)
    for key in layout.all_keys:
        torch.testing.assert_close(res.adapter[key], _wsum(updates, key, P_NUM.tolist()))
    # the discordance the survey describes: avg(B)·avg(A) != avg(B·A)
    spec = layout.modules[0]
    got = spec.scaling() * res.adapter[spec.b_key] @ res.adapter[spec.a_key]
    assert (got - _ideal(layout, updates, P_NUM.tolist())[spec.name]).abs().max() > 1e-3
    # uniform weighting is an explicit choice; order of clients does not matter
    u = build_method("fedit", layout, weighting="uniform").aggregate(0, server, updates[::-1])
    torch.testing.assert_close(u.adapter[HEAD], sum(x.state[HEAD] for x in updates) / 3)
    # identical updates come back unchanged
    same = [dataclasses.replace(updates[0], client_id=i) for i in range(3)]
    for key in layout.all_keys:
        torch.testing.assert_close(m.aggregate(0, server, same).adapter[key], updates[0].state[key])


@pytest.mark.invariant("ffa_lora")
def test_ffa_lora_freezes_a_and_is_exact(layout, updates, gen) -> None:
    m = build_method("ffa_lora", layout)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    plan = m.plan(0, 1, server)
    assert plan.train_keys == frozenset(layout.b_keys + (HEAD,))
    assert set(plan.download) == set(layout.b_keys + (HEAD,))
    start = m.start_state(plan, initial, None)
    for key in layout.a_keys:
        assert torch.equal(start[key], initial[key])
    # clients upload B and heads only
    ups = [dataclasses.replace(u, state={k: u.state[k] for k in plan.upload_keys}) for u in updates]
    res = m.aggregate(0, server, ups)
    p = [1 / 3] * 3  # samples_seen are equal -> uniform, as in FederatedScope
    for spec in layout.modules:
        assert torch.equal(res.adapter[spec.a_key], initial[spec.a_key])
        a0 = initial[spec.a_key]
        got = spec.scaling() * res.adapter[spec.b_key] @ a0
        want = sum(pk * spec.scaling() * u.state[spec.b_key] @ a0 for pk, u in zip(p, ups, strict=True))
        torch.testing.assert_close(got, want)


@pytest.mark.invariant("rolora")
def test_rolora_alternates_and_keeps_frozen_factor_bit_identical(layout, updates, gen) -> None:
    m = build_method("rolora", layout)
    server = m.init_server(random_state(layout, gen))
    p = P_NUM.tolist()
    for rnd, (trained, frozen) in enumerate([(layout.b_keys, layout.a_keys), (layout.a_keys, layout.b_keys)]):
        plan = m.plan(rnd, 0, server)
        assert plan.train_keys == frozenset(trained + (HEAD,))
        # all clients start from the same frozen factor
        ups = []
        for u in updates:
            st = dict(m.start_state(plan, server.adapter, None))
            st.update({k: u.state[k] for k in trained + (HEAD,)})
            ups.append(dataclasses.replace(u, state={k: st[k] for k in plan.upload_keys}))
        res = m.aggregate(rnd, server, ups)
        for key in frozen:
            assert torch.equal(res.adapter[key], server.adapter[key])
        for key in trained:
            torch.testing.assert_close(res.adapter[key], _wsum(ups, key, p))
        for spec in layout.modules:
            got = res.adapter[spec.b_key] @ res.adapter[spec.a_key]
            parts = [
                (
                    u.state.get(spec.b_key, server.adapter[spec.b_key]),
                    u.state.get(spec.a_key, server.adapter[spec.a_key]),
                )
                for u in ups
            ]
            want = sum(pk * b @ a for pk, (b, a) in zip(p, parts, strict=True))
            torch.testing.assert_close(got, want)
        server = dataclasses.replace(server, adapter=res.adapter, round=rnd + 1)


@pytest.mark.invariant("fedsa_lora")
def test_fedsa_lora_shares_a_and_keeps_b_per_client(layout, gen) -> None:
    m = build_method("fedsa_lora", layout)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    personal: dict[int, dict[str, torch.Tensor]] = {}
    for rnd in range(2):
        ups = []
        for k, n in enumerate((10, 30, 60)):
            plan = m.plan(rnd, k, server)
            assert set(plan.download) == set(layout.a_keys)  # B and the head never travel
            start = m.start_state(plan, initial, personal.get(k))
            for key in layout.a_keys:
                assert torch.equal(start[key], server.adapter[key])
            if k in personal:  # B_k is exactly what client k held after its own last training
                for key, value in personal[k].items():
                    assert torch.equal(start[key], value)
            trained = random_state(layout, gen)
            upload, keep = m.finish(plan, trained, personal.get(k), STATS)
            assert set(upload) == set(layout.a_keys)
            assert set(keep) == set(layout.b_keys + (HEAD,))
            personal[k] = keep
            ups.append(ClientUpdate(k, upload, num_examples=n, samples_seen=n))
        res = m.aggregate(rnd, server, ups)
        p = P_NUM.tolist()  # samples_seen proportional to n here
        for key in layout.a_keys:
            torch.testing.assert_close(res.adapter[key], _wsum(ups, key, p))
        server = dataclasses.replace(server, adapter=res.adapter, round=rnd + 1)
    # personal states are distinct objects per client (no shared tensor, the FederatedScope bug)
    b = layout.b_keys[0]
    assert not torch.equal(personal[0][b], personal[1][b])


@pytest.mark.invariant("fedex_lora")
def test_fedex_lora_is_exact_with_residual(layout, updates, gen) -> None:
    m = build_method("fedex_lora", layout)
    server = m.init_server(random_state(layout, gen))
    res = m.aggregate(0, server, updates)
    p = [1 / 3] * 3  # uniform by default, as in the reference code
    ideal = _ideal(layout, updates, p)
    assert res.base_delta is not None
    for spec in layout.modules:
        a_bar, b_bar = res.adapter[spec.a_key], res.adapter[spec.b_key]
        torch.testing.assert_close(a_bar, _wsum(updates, spec.a_key, p))
        w_old = torch.randn(spec.out_features, spec.in_features, generator=gen)
        w_new = w_old + res.base_delta[spec.name]
        torch.testing.assert_close(w_new + spec.scaling() * b_bar @ a_bar, w_old + ideal[spec.name])
        assert res.base_delta[spec.name].shape == (spec.out_features, spec.in_features)


@pytest.mark.invariant("flora")
def test_flora_merges_exact_sum_and_reinitialises(layout, updates, gen) -> None:
    m = build_method("flora", layout, seed=7)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    res = m.aggregate(0, server, updates)
    p = P_NUM.tolist()
    ideal = _ideal(layout, updates, p)
    for spec in layout.modules:
        b_stack, a_stack = res.base_delta[spec.name]  # the stacked factors travel, not an m×n matrix
        assert b_stack.shape == (spec.out_features, len(updates) * spec.rank)
        assert a_stack.shape == (len(updates) * spec.rank, spec.in_features)
        torch.testing.assert_close(b_stack @ a_stack, ideal[spec.name])
        assert torch.count_nonzero(res.adapter[spec.b_key]) == 0  # merged model = W0 + ΔW exactly
    torch.testing.assert_close(res.adapter[HEAD], _wsum(updates, HEAD, p))
    # each client draws its own fresh LoRA every round: A differs, B = 0
    starts = [m.start_state(m.plan(1, k, server), initial, None) for k in range(2)]
    a = layout.a_keys[0]
    assert not torch.equal(starts[0][a], starts[1][a]) and not torch.equal(starts[0][a], initial[a])
    assert torch.count_nonzero(starts[0][layout.b_keys[0]]) == 0
    again = m.start_state(m.plan(1, 0, server), initial, None)
    assert torch.equal(again[a], starts[0][a])  # seeded, so a resumed run redraws the same factors


@pytest.mark.invariant("flexlora")
def test_flexlora_is_best_rank_r_approximation(layout, updates, gen) -> None:
    m = build_method("flexlora", layout)
    server = m.init_server(random_state(layout, gen))
    res = m.aggregate(0, server, updates)
    ideal = _ideal(layout, updates, P_NUM.tolist())
    for spec in layout.modules:
        a, b = res.adapter[spec.a_key], res.adapter[spec.b_key]
        assert a.shape == (spec.rank, spec.in_features) and b.shape == (spec.out_features, spec.rank)
        torch.testing.assert_close(a @ a.T, torch.eye(spec.rank), atol=1e-5, rtol=1e-5)
        ref = dense_svd(ideal[spec.name])
        got = spec.scaling() * b @ a
        torch.testing.assert_close(got, ref.dense(spec.rank), atol=1e-4, rtol=1e-4)
        resid = torch.linalg.matrix_norm(ideal[spec.name] - got)
        torch.testing.assert_close(resid, ref.s[spec.rank :].square().sum().sqrt(), atol=1e-4, rtol=1e-4)
    assert res.base_delta is None


@pytest.mark.parametrize("name", ["ffa_lora", "fedsa_lora"])
def test_federatedscope_methods_weight_by_samples_seen(name: str, layout, updates) -> None:
    """FFA-LoRA and FedSA-LoRA default to the samples processed this round, not the data size."""
    seen = [50, 10, 40]  # neither equal nor proportional to num_examples (10, 30, 60)
    ups = [dataclasses.replace(u, samples_seen=s) for u, s in zip(updates, seen, strict=True)]
    m = build_method(name, layout)
    assert m.weighting == "samples_seen"
    assert m.weights(ups) == pytest.approx([0.5, 0.1, 0.4])
    server = m.init_server(random_state(layout, torch.Generator().manual_seed(5)))
    res = m.aggregate(0, server, ups)
    key = layout.b_keys[0] if name == "ffa_lora" else layout.a_keys[0]
    torch.testing.assert_close(res.adapter[key], _wsum(ups, key, [0.5, 0.1, 0.4]))


def test_flora_redraws_every_round(layout, gen) -> None:
    m = build_method("flora", layout, seed=7)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    a = layout.a_keys[0]
    r0 = m.start_state(m.plan(0, 1, server), initial, None)[a]
    r1 = m.start_state(m.plan(1, 1, server), initial, None)[a]
    assert not torch.equal(r0, r1)
    other_seed = build_method("flora", layout, seed=8)
    assert not torch.equal(other_seed.start_state(other_seed.plan(0, 1, server), initial, None)[a], r0)


def _mixed_updates(layout: LoraLayout, gen: torch.Generator, ranks=(1, 2, 2), sizes=(10, 30, 60)):
    """Clients of different ranks with their own scales (constant alpha: s_k = alpha/r_k), unequal sizes."""
    from fedlora.methods import ModuleRank

    ups = []
    for k, (r, n) in enumerate(zip(ranks, sizes, strict=True)):
        st, rk = {}, {}
        for spec in layout.modules:
            rr = min(r, spec.rank)
            st[spec.a_key] = torch.randn(rr, spec.in_features, generator=gen)
            st[spec.b_key] = torch.randn(spec.out_features, rr, generator=gen)
            rk[spec.name] = ModuleRank(rr, spec.scaling(rr))
        st[HEAD] = torch.randn(3, 5, generator=gen)
        ups.append(ClientUpdate(k, st, num_examples=n, samples_seen=n, ranks=rk))
    return ups


def _ideal_own_scale(layout, updates, p):
    return {
        spec.name: sum(
            pk * u.ranks[spec.name].scale * u.state[spec.b_key] @ u.state[spec.a_key]
            for pk, u in zip(p, updates, strict=True)
        )
        for spec in layout.modules
    }


def test_fedex_lora_exact_under_num_examples_and_averages_heads(layout, updates, gen) -> None:
    m = build_method("fedex_lora", layout, weighting="num_examples")
    server = m.init_server(random_state(layout, gen))
    res = m.aggregate(0, server, updates)
    p = P_NUM.tolist()
    ideal = _ideal(layout, updates, p)
    torch.testing.assert_close(res.adapter[HEAD], _wsum(updates, HEAD, p))
    for spec in layout.modules:
        a_bar, b_bar = res.adapter[spec.a_key], res.adapter[spec.b_key]
        torch.testing.assert_close(b_bar, _wsum(updates, spec.b_key, p))
        torch.testing.assert_close(res.base_delta[spec.name] + spec.scaling() * b_bar @ a_bar, ideal[spec.name])


def test_flora_exact_with_mixed_ranks_and_own_scales(layout, gen) -> None:
    ups = _mixed_updates(layout, gen)
    m = build_method("flora", layout, client_ranks=(1, 2, 2), num_clients=3)
    res = m.aggregate(0, m.init_server(random_state(layout, gen)), ups)
    ideal = _ideal_own_scale(layout, ups, P_NUM.tolist())
    for spec in layout.modules:
        b_stack, a_stack = res.base_delta[spec.name]
        assert a_stack.shape[0] == sum(u.state[spec.a_key].shape[0] for u in ups)
        torch.testing.assert_close(b_stack @ a_stack, ideal[spec.name], rtol=1e-5, atol=1e-5)


def test_flexlora_mixed_ranks_and_heads(layout, gen) -> None:
    ups = _mixed_updates(layout, gen)
    m = build_method("flexlora", layout, client_ranks=(1, 2, 2), num_clients=3)
    server = m.init_server(random_state(layout, gen))
    res = m.aggregate(0, server, ups)
    p = P_NUM.tolist()
    torch.testing.assert_close(res.adapter[HEAD], _wsum(ups, HEAD, p))
    ideal = _ideal_own_scale(layout, ups, p)
    server = dataclasses.replace(server, adapter=res.adapter, round=1)
    for cid in range(3):
        plan = m.plan(1, cid, server)
        for spec in layout.modules:
            r = plan.ranks[spec.name].rank
            assert r == (1, 2, 2)[cid]
            a, b = plan.download[spec.a_key], plan.download[spec.b_key]
            assert a.shape == (r, spec.in_features) and b.shape == (spec.out_features, r)
            got = plan.ranks[spec.name].scale * b @ a
            torch.testing.assert_close(got, dense_svd(ideal[spec.name]).dense(r), atol=1e-4, rtol=1e-4)


def test_fedsa_lora_shares_the_head_when_local_head_is_false(layout, gen) -> None:
    m = build_method("fedsa_lora", layout, options={"local_head": "false"})
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    plan = m.plan(0, 0, server)
    assert set(plan.download) == set(layout.a_keys + (HEAD,)) and set(plan.upload) == set(plan.download)
    upload, keep = m.finish(plan, random_state(layout, gen), None, STATS)
    assert HEAD in upload and HEAD not in keep and set(keep) == set(layout.b_keys)
    ups = [
        ClientUpdate(k, {key: random_state(layout, gen)[key] for key in plan.upload}, n, n)
        for k, n in enumerate((10, 30, 60))
    ]
    res = m.aggregate(0, server, ups)
    torch.testing.assert_close(res.adapter[HEAD], _wsum(ups, HEAD, P_NUM.tolist()))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_flora_fresh_factors_honour_init_lora_weights(layout, gen, init: str) -> None:
    from fedlora.adapters import fresh_lora_factors

    m = build_method("flora", layout, seed=3, init_lora_weights=init)
    initial = random_state(layout, gen)
    plan = m.plan(2, 1, m.init_server(initial))
    start = m.start_state(plan, initial, None)
    g = torch.Generator().manual_seed(plan.reinit_seed)
    for spec in layout.modules:
        a, b = fresh_lora_factors(spec.out_features, spec.in_features, spec.rank, g, init=init)
        assert torch.equal(start[spec.a_key], a) and torch.equal(start[spec.b_key], b)
