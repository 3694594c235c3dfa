"""Initialisation methods (METHODS.md §11–14): SLoRA, FeDeRA, the round-start policies init_avg / init_re /
init_local (and their composition with another aggregator), FedLoRU. Invariants on hand-built, non-square modules
(one of them Conv1D-style), run through the real round logic where the base weights change."""

from __future__ import annotations

import pytest
import torch
from helpers import HEAD, pretrained_weights, random_state, tiny_config

from fedlora.adapters.algebra import dense_svd
from fedlora.adapters.peft_io import add_to_base, dense_delta, linear_base_weights
from fedlora.adapters.state import delta_weight
from fedlora.federation.round import RoundPolicy, run_round
from fedlora.methods import ClientUpdate, MethodContext, build_method
from fedlora.methods.base import ServerState
from fedlora.methods.feddpa import FedDPA
from fedlora.methods.ffa_lora import FFALoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.init_policies import FRESH_SEED, LOCAL_CLIENT, LocalInitial, ReInitial
from fedlora.methods.slora import STAGE

SIZES = {0: 10, 1: 30, 2: 60}
OPEN = RoundPolicy(norm_bound=None, min_cosine=None)  # every well-formed reply reaches the method


class Clients:
    """A runtime whose clients upload what they started from (:meth:`FedMethod.reference`) plus seeded noise."""

    def __init__(self, method, seed: int = 0, step: float = 0.3) -> None:
        self.method, self.gen, self.step = method, torch.Generator().manual_seed(seed), step
        self.plans = []
        self.replies: list[tuple[int, ClientUpdate]] = []

    def train(self, plans):
        out = []
        for p in plans:
            self.plans.append(p)
            ref = self.method.reference(p)
            state = {}
            for key, spec in p.upload.items():
                start = ref[key].float() if key in ref else torch.zeros(spec.shape)
                state[key] = (start + self.step * torch.randn(spec.shape, generator=self.gen)).to(spec.dtype)
            n = SIZES.get(p.client_id, 20)
            out.append(ClientUpdate(p.client_id, state, n, n, ranks=dict(p.ranks)))
            self.replies.append((p.round, out[-1]))
        return out

    def of_round(self, rnd: int) -> list[ClientUpdate]:
        return sorted((u for r, u in self.replies if r == rnd), key=lambda u: u.client_id)

    def accept(self, ids):
        pass

    def evaluate(self, server):
        return {}


def _weights(server: ServerState, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen weights the server's state implies: ``W0 + cumulative base change``."""
    return {name: w + server.base_delta.get(name, torch.zeros_like(w)) for name, w in w0.items()}


def _model(server: ServerState, w0, layout) -> dict[str, torch.Tensor]:
    """``W + s·B@A`` per module: the function the global state stands for."""
    base = _weights(server, w0)
    return {s.name: base[s.name] + delta_weight(server.adapter, s, s.scaling()) for s in layout.modules}


def _mean(updates, key, weights):
    return sum(p * u.state[key].float() for p, u in zip(weights, updates, strict=True))


def _updates(layout, gen, seed_shift: float = 0.0):
    return [
        ClientUpdate(k, {key: v + seed_shift for key, v in random_state(layout, gen).items()}, n, n)
        for k, n in SIZES.items()
    ]


# ------------------------------------------------------------------------------------------------ init_avg
@pytest.mark.invariant("init_avg")
def test_init_avg_starts_every_client_from_the_weighted_average(layout, gen) -> None:
    m = build_method("init_avg", layout, num_clients=3)
    server = m.init_server(random_state(layout, gen))
    ups = _updates(layout, gen)
    p = [n / 100 for n in SIZES.values()]  # n_k / Σn, below the weight cap
    new = m.aggregate(0, server, ups).adapter
    for key in layout.all_keys:
        torch.testing.assert_close(new[key], _mean(ups, key, p))
    server = ServerState(round=1, adapter=new)
    starts = [m.start_state(m.plan(1, c, server), server.adapter, None) for c in range(3)]
    for key in layout.all_keys:
        assert all(torch.equal(s[key], starts[0][key]) for s in starts)
        torch.testing.assert_close(starts[0][key], _mean(ups, key, p))


# ------------------------------------------------------------------------------------------------ init_re
@pytest.mark.invariant("init_re")
def test_init_re_merges_the_aggregate_and_every_client_starts_from_one_fresh_lora(layout, gen) -> None:
    m = build_method("init_re", layout, num_clients=3)
    w0 = pretrained_weights(layout)()
    server = m.init_server(random_state(layout, gen))
    before = _model(server, w0, layout)
    rt = Clients(m)
    server, _ = run_round(0, m, server, rt, clients=[0, 1, 2], policy=OPEN)
    # the merge: W'_t = W'_{t-1} + s·B_t A_t with B_t, A_t FedIT's averages, travelling as factors (s·B_t, A_t)
    assert server.base_version == 1
    for spec in layout.modules:
        b_s, a = server.last_base_update[spec.name]
        assert b_s.shape == (spec.out_features, spec.rank) and a.shape == (spec.rank, spec.in_features)
        assert not bool(server.adapter[spec.b_key].any())  # B = 0: the merge leaves the function unchanged
    after = _model(server, w0, layout)
    # next round: one common seed, the LoRA factors do not travel, every client starts from B = 0 and the same A
    plans = [m.plan(1, c, server) for c in range(3)]
    assert len({p.reinit_seed for p in plans}) == 1 and plans[0].reinit_seed == server.meta[FRESH_SEED]
    assert all(k not in p.download for p in plans for k in layout.lora_keys) and HEAD in plans[0].download
    initial = random_state(layout, gen)
    starts = [m.start_state(p, initial, None) for p in plans]
    for spec in layout.modules:
        for s in starts:
            assert torch.equal(s[spec.a_key], starts[0][spec.a_key]) and not bool(s[spec.b_key].any())
        # the server's adapter is what the clients start from (a method keeping A on the server stays consistent)
        torch.testing.assert_close(server.adapter[spec.a_key], starts[0][spec.a_key])
        torch.testing.assert_close(m.reference(plans[0])[spec.a_key], starts[0][spec.a_key])
        # W'_t + s·B A (B = 0) == W'_{t-1} + s·B_t A_t
        start_model = _weights(server, w0)[spec.name] + delta_weight(starts[0], spec, spec.scaling())
        torch.testing.assert_close(start_model, after[spec.name])
    assert any(not torch.allclose(after[s.name], before[s.name]) for s in layout.modules)


def test_init_re_merges_exactly_fedit_s_product(layout, gen) -> None:
    m = build_method("init_re", layout, num_clients=3)
    server = m.init_server(random_state(layout, gen))
    ups = _updates(layout, gen)
    p = [n / 100 for n in SIZES.values()]
    res = m.aggregate(0, server, ups)
    for spec in layout.modules:
        want = spec.scaling() * _mean(ups, spec.b_key, p) @ _mean(ups, spec.a_key, p)
        torch.testing.assert_close(dense_delta(res.base_delta[spec.name]), want)
    torch.testing.assert_close(res.adapter[HEAD], _mean(ups, HEAD, p))


def test_a_fresh_lora_has_no_gradient_for_a_at_the_first_step(layout) -> None:
    """Re-Initial's known cost (METHODS.md §13): with B = 0 the first local step has dL/dA = 0."""
    m = build_method("init_re", layout)
    fresh = m.fresh_factors(3, m.module_ranks(None))
    spec = layout.modules[0]
    a = fresh[spec.a_key].clone().requires_grad_(True)
    b = fresh[spec.b_key].clone().requires_grad_(True)
    x = torch.randn(5, spec.in_features)
    loss = ((x @ (spec.scaling() * b @ a).T) - 1.0).pow(2).sum()
    loss.backward()
    assert not bool(a.grad.any()) and bool(b.grad.any())


# ------------------------------------------------------------------------------------------------ init_local
@pytest.mark.invariant("init_local")
def test_init_local_starts_every_client_from_one_accepted_client(layout, gen) -> None:
    m = build_method("init_local", layout, num_clients=3)
    fedit = build_method("fedit", layout, num_clients=3)
    server = m.init_server(random_state(layout, gen))
    ups = _updates(layout, gen)
    res = m.aggregate(0, server, ups)
    # the global model is FedIT's aggregate
    want = fedit.aggregate(0, server, ups).adapter
    for key in layout.all_keys:
        torch.testing.assert_close(res.adapter[key], want[key])
    chosen = next(u for u in ups if u.client_id == res.meta[LOCAL_CLIENT])
    server = ServerState(round=1, adapter=res.adapter, tensors=res.tensors, meta=res.meta)
    starts = [m.start_state(m.plan(1, c, server), random_state(layout, gen), None) for c in range(3)]
    for s in starts:
        for key in layout.lora_keys:  # every client holds θ_c
            torch.testing.assert_close(s[key], chosen.state[key])
        torch.testing.assert_close(s[HEAD], res.adapter[HEAD])  # heads follow the aggregate
    # c is drawn uniformly among the accepted clients, seeded by round: over rounds every client is drawn
    picked = {m.pick(rnd, ups).client_id for rnd in range(40)}
    assert picked == {0, 1, 2}
    assert m.pick(5, ups).client_id == m.pick(5, list(reversed(ups))).client_id  # order of replies does not matter


# ------------------------------------------------------------------------------------------------ composition
def test_a_policy_composes_with_another_aggregator(layout, gen) -> None:
    """Re-Initial worn by FFA-LoRA (A frozen, only B travels): FFA's aggregation, then the merge, with the A every
    client really trained with (the fresh one the server holds)."""

    class FFAReInit(ReInitial, FFALoRA):
        id = "ffa_lora_init_re_test"
        aliases = ()

    m = FFAReInit(MethodContext(layout=layout, num_clients=3))  # built, not registered: the registry stays as it is
    assert m.changes_base and not m.supports_robust_aggregation and m.default_weighting == "samples_seen"
    server = m.init_server(random_state(layout, gen))
    rt = Clients(m, seed=3)
    p = [n / 100 for n in SIZES.values()]
    for rnd in range(3):
        a_before = {s.a_key: server.adapter[s.a_key].clone() for s in layout.modules}
        server, report = run_round(rnd, m, server, rt, clients=[0, 1, 2], policy=OPEN)
        assert report.accepted == [0, 1, 2]
        plans = [q for q in rt.plans if q.round == rnd]
        assert all(set(q.upload) == set(layout.b_keys) | {HEAD} for q in plans)  # FFA's own upload
        assert all((q.reinit_seed is not None) == (rnd > 0) for q in plans)
        for spec in layout.modules:
            if rnd > 0:  # the clients started from the fresh A the server holds
                torch.testing.assert_close(m.reference(plans[0])[spec.a_key], a_before[spec.a_key])
            b_s, a = server.last_base_update[spec.name]
            torch.testing.assert_close(a, a_before[spec.a_key].float())
            torch.testing.assert_close(b_s, spec.scaling() * _mean(rt.of_round(rnd), spec.b_key, p))
            assert not bool(server.adapter[spec.b_key].any())
        assert server.base_version == rnd + 1


def test_round_start_policies_refuse_what_they_cannot_wear(layout, gen) -> None:
    class FLoRAReInit(ReInitial, FLoRA):
        id = "flora_init_re_test"
        aliases = ()

    class FedDPALocal(LocalInitial, FedDPA):
        id = "feddpa_init_local_test"
        aliases = ()

    m = FLoRAReInit(MethodContext(layout=layout))
    with pytest.raises(ValueError, match="re-initialises LoRA itself"):
        m.plan(0, 0, m.init_server(random_state(layout, gen)))
    with pytest.raises(ValueError, match="does not fit a method with personal state or further adapters"):
        FedDPALocal(MethodContext(layout=layout))
    with pytest.raises(ValueError, match="init_re trains one rank"):
        build_method("init_re", layout, client_ranks=(1, 2))
    with pytest.raises(ValueError, match="^init_local cannot use aggregator='median'"):
        build_method("init_local", layout, aggregator="median")
    build_method("init_avg", layout, aggregator="median")  # Avg-Initial keeps its aggregator's abilities


# ------------------------------------------------------------------------------------------------ fedloru
@pytest.mark.invariant("fedloru")
def test_fedloru_merges_and_reinitialises_every_tau_rounds_without_changing_the_model(layout, gen) -> None:
    m = build_method("fedloru", layout, num_clients=3, options={"period": 2})
    w0 = pretrained_weights(layout)()
    server = m.init_server(random_state(layout, gen))
    rt = Clients(m, seed=1)
    merged_sum = {s.name: torch.zeros(s.out_features, s.in_features) for s in layout.modules}
    for rnd in range(5):
        version = server.base_version
        old_adapter = dict(server.adapter)
        server, _ = run_round(rnd, m, server, rt, clients=[0, 1, 2], policy=OPEN)
        plans = rt.plans[-3:]
        fresh = rnd >= 1 and rnd % 2 == 0  # the round after a merge starts from a fresh LoRA
        assert all((p.reinit_seed is not None) == fresh for p in plans), rnd
        if (rnd + 1) % 2:  # rounds 1, 3, 5 (1-based): FedAvg of A and B, no base change
            assert server.base_version == version and FRESH_SEED not in server.meta
            continue
        assert server.base_version == version + 1
        for spec in layout.modules:
            b_s, a = server.last_base_update[spec.name]
            step = b_s @ a
            merged_sum[spec.name] += step
            # W_new + s·B_new A_new == W_old + s·B̄ Ā, with B_new = 0
            assert not bool(server.adapter[spec.b_key].any())
            assert not torch.equal(server.adapter[spec.a_key], old_adapter[spec.a_key])
    # W_T − W_0 == Σ_{merge rounds} s·B_t A_t
    for spec in layout.modules:
        torch.testing.assert_close(_weights(server, w0)[spec.name] - w0[spec.name], merged_sum[spec.name])


def test_fedloru_merge_is_the_aggregate_s_product(layout, gen) -> None:
    m = build_method("fedloru", layout, num_clients=3, options={"period": 1})
    server = m.init_server(random_state(layout, gen))
    ups = _updates(layout, gen)
    p = [n / 100 for n in SIZES.values()]
    res = m.aggregate(0, server, ups)
    old = ServerState(round=0, adapter={k: _mean(ups, k, p) for k in layout.all_keys})
    for spec in layout.modules:
        want = delta_weight(old.adapter, spec, spec.scaling())  # the function the FedIT aggregate stands for
        now = dense_delta(res.base_delta[spec.name]) + delta_weight(res.adapter, spec, spec.scaling())
        torch.testing.assert_close(now, want)
    assert build_method("fedloru", layout, num_clients=3).options.period == 2


# ------------------------------------------------------------------------------------------------ federa
@pytest.mark.invariant("federa")
@pytest.mark.parametrize("split", ["sqrt", "B"])
def test_federa_starts_from_the_truncated_svd_and_keeps_the_pretrained_function(layout, gen, split: str) -> None:
    w = pretrained_weights(layout)()
    m = build_method("federa", layout, base_weights=lambda: w, options={"split": split})
    server = m.init_server(random_state(layout, gen))
    assert server.base_version == 1 and set(server.last_base_update) == {s.name for s in layout.modules}
    for spec in layout.modules:
        a, b = server.adapter[spec.a_key], server.adapter[spec.b_key]
        s, r = spec.scaling(), spec.rank
        w_res = w[spec.name] + server.base_delta[spec.name]
        torch.testing.assert_close(dense_delta(server.last_base_update[spec.name]), server.base_delta[spec.name])
        torch.testing.assert_close(w_res + s * b @ a, w[spec.name])  # the initial model is the pretrained one
        torch.testing.assert_close(s * b @ a, dense_svd(w[spec.name]).dense(r))  # best rank-r approximation
        sv = dense_svd(w[spec.name]).s[:r]
        if split == "B":
            torch.testing.assert_close(a @ a.T, torch.eye(r))
        else:  # PiSSA: √(S/s) on both sides
            torch.testing.assert_close(a.norm(dim=1), (sv / s).sqrt())
            torch.testing.assert_close(b.norm(dim=0), (sv / s).sqrt())
    # then plain FedIT
    ups = _updates(layout, gen)
    new = m.aggregate(0, server, ups)
    assert new.base_delta is None
    torch.testing.assert_close(new.adapter[HEAD], _mean(ups, HEAD, [n / 100 for n in SIZES.values()]))


def test_federa_options_and_what_it_needs(layout, gen) -> None:
    w = pretrained_weights(layout)()
    m = build_method("federa", layout, base_weights=lambda: w, options={"subtract_residual": "false"})
    server = m.init_server(random_state(layout, gen))
    assert server.base_version == 0 and not server.base_delta
    with pytest.raises(ValueError, match="federa initialises LoRA from the SVD of the pretrained weights"):
        build_method("federa", layout).init_server(random_state(layout, gen))
    bad = {**w, layout.modules[0].name: w[layout.modules[0].name].T}  # a transposed weight is refused by shape
    with pytest.raises(ValueError, match=r"expected \(6, 4\) \(out, in\)"):
        build_method("federa", layout, base_weights=lambda: bad).init_server(random_state(layout, gen))


def test_federa_on_gpt2_conv1d_keeps_the_model_and_svds_the_linear_layout(tiny_gpt2: str, tmp_path) -> None:
    """GPT-2 stores its weights (in, out): the SVD is of W in (out, in) layout, the residual goes back transposed."""
    from fedlora.api import build, resolve_config

    cfg = resolve_config(tiny_config(tiny_gpt2, tmp_path, method="federa", max_examples_per_label=10))
    setup = build(cfg)
    layout, method = setup.layout, setup.method
    assert all(s.fan_in_fan_out for s in layout.modules) and any(
        s.in_features != s.out_features for s in layout.modules
    )
    pretrained = {k: v.clone() for k, v in linear_base_weights(setup.model, layout).items()}
    server = method.init_server(setup.engine.initial)
    add_to_base(setup.model, layout, server.last_base_update)  # what every client applies before its first round
    now = linear_base_weights(setup.model, layout)
    for spec in layout.modules:
        effective = now[spec.name] + delta_weight(server.adapter, spec, spec.scaling())
        torch.testing.assert_close(effective, pretrained[spec.name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            delta_weight(server.adapter, spec, spec.scaling()), dense_svd(pretrained[spec.name]).dense(spec.rank)
        )


# ------------------------------------------------------------------------------------------------ slora
def _slora_rounds(layout, gen, rounds: int, **options):
    m = build_method("slora", layout, num_clients=3, rounds=rounds, options=options)
    server = m.init_server(random_state(layout, gen))
    rt = Clients(m, seed=2)
    states = [server]
    for rnd in range(rounds):
        server, report = run_round(rnd, m, server, rt, clients=[0, 1, 2], policy=OPEN)
        assert report.accepted == [0, 1, 2]
        states.append(server)
    return m, rt, states


@pytest.mark.invariant("slora")
def test_slora_warm_up_is_exact_sparse_fedavg_and_its_svd_init_is_the_best_rank_r_update(layout, gen) -> None:
    m, rt, states = _slora_rounds(layout, gen, rounds=3, warmup_rounds=2)
    p = [n / 100 for n in SIZES.values()]
    total = {s.name: torch.zeros(s.out_features, s.in_features) for s in layout.modules}
    for rnd in (0, 1):  # the warm-up
        plans = [q for q in rt.plans if q.round == rnd]
        assert set(plans[0].upload) == set(layout.b_keys) | {HEAD}  # A is frozen to the mask
        for spec in layout.modules:
            e = plans[0].download[spec.a_key]
            assert all(torch.equal(q.download[spec.a_key], e) for q in plans)  # one mask for the round's clients
            assert torch.equal(e.sum(1), torch.ones(spec.rank)) and torch.equal(e.sum(0).clamp(max=1), e.sum(0))
            assert not bool(plans[0].download[spec.b_key].any())  # B starts at 0
            # FedAvg of the sparse updates of W: s·(Σ p_k B_k)·E_S, zero outside the r columns S
            step = spec.scaling() * _mean(rt.of_round(rnd), spec.b_key, p) @ e
            assert not bool(step[:, ~e.sum(0).bool()].any())
            total[spec.name] += step
            if rnd == 0:  # merged into W, B back to 0
                torch.testing.assert_close(states[1].base_delta[spec.name], step)
                assert not bool(states[1].adapter[spec.b_key].any())
        torch.testing.assert_close(states[rnd + 1].adapter[HEAD], _mean(rt.of_round(rnd), HEAD, p))
    assert states[1].meta[STAGE] == "sparse"
    # after the last warm-up round: the SVD initialisation of W_stage1 − W_pre, and W back to W_pre
    switched = states[2]
    assert switched.meta[STAGE] == "lora"
    for spec in layout.modules:
        assert not bool(switched.base_delta[spec.name].any())
        a, b = switched.adapter[spec.a_key], switched.adapter[spec.b_key]
        torch.testing.assert_close(a @ a.T, torch.eye(spec.rank), atol=1e-5, rtol=1e-5)
        want = dense_svd(total[spec.name]).dense(spec.rank)
        torch.testing.assert_close(spec.scaling() * b @ a, want, atol=1e-5, rtol=1e-5)
    # stage 2 is FedIT: clients continue from the global adapter and upload A, B and heads
    last = [q for q in rt.plans if q.round == 2]
    assert set(last[0].upload) == set(layout.all_keys)
    for key in layout.lora_keys:
        assert torch.equal(last[0].download[key], switched.adapter[key])
    assert states[3].meta[STAGE] == "lora" and not states[3].base_delta[layout.modules[0].name].any()


def test_slora_fixed_mask_makes_the_svd_init_exact_and_a_long_warm_up_never_switches(layout, gen) -> None:
    m, rt, states = _slora_rounds(layout, gen, rounds=3, warmup_rounds=2, mask="fixed")
    masks = {q.round: q.download[layout.modules[0].a_key] for q in rt.plans if q.round < 2}
    assert torch.equal(masks[0], masks[1])
    p = [n / 100 for n in SIZES.values()]
    for spec in layout.modules:
        e = [q for q in rt.plans if q.round == 0][0].download[spec.a_key]
        total = sum(spec.scaling() * _mean(rt.of_round(r), spec.b_key, p) @ e for r in (0, 1))
        got = states[2].adapter
        torch.testing.assert_close(delta_weight(got, spec, spec.scaling()), total, atol=1e-5, rtol=1e-5)
    m, rt, states = _slora_rounds(layout, gen, rounds=2, warmup_rounds=2)
    assert all(st.meta[STAGE] == "sparse" for st in states)  # no LoRA round would follow: sparse fine-tuning only
    assert build_method("slora", layout, rounds=25).warmup_rounds() == 3  # default: 10% of the rounds, at least 1
    assert build_method("slora", layout, rounds=1).warmup_rounds() == 1


def test_federa_killed_in_its_first_round_resumes_to_the_same_model(tiny_bert: str, tmp_path, monkeypatch) -> None:
    """FeDeRA changes the base weights before round 0: the round-0 checkpoint is not restored (its weights predate
    that change) but recomputed, so a run killed in round 1 ends where an uninterrupted one does."""
    from fedlora import resume, run
    from fedlora.engines.local import LocalEngine
    from fedlora.runs import RunDir

    def config(name: str):
        kw = dict(clients=2, rounds=1, max_examples_per_label=8, local_steps=1, batch_size=8, partition="iid")
        return tiny_config(tiny_bert, tmp_path, method="federa", run_name=name, **kw)

    full = run(config("full"))
    original = LocalEngine.train

    def dies(self, plans):
        original(self, plans[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalEngine, "train", dies)
    with pytest.raises(KeyboardInterrupt):
        run(config("cut"))
    monkeypatch.setattr(LocalEngine, "train", original)
    resumed = resume(tmp_path / "cut", progress=False)
    for key, value in full.global_adapter.items():
        assert torch.equal(value, resumed.global_adapter[key]), key
    _, _, w_full = RunDir(full.run_dir).load_latest()
    _, _, w_res = RunDir(resumed.run_dir).load_latest()
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)
