"""Fed-SB, FedSVD and FLoRIST (METHODS.md §37-§39): their invariants on hand-built tensors (non-square modules, so a
transpose error shows), the fixes of the reference codes' bugs, and checks on real peft layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.adapters import LoraLayout, LoraModuleSpec
from fedlora.adapters.algebra import dense_svd
from fedlora.methods import ClientUpdate, ModuleRank, OptionError, TrainStats, build_method
from fedlora.methods.fed_sb import A0_NS, B0_NS, HOLDERS, R_NS, sb_factors
from fedlora.methods.fedsvd import refactorise
from fedlora.methods.florist import energy_rank

HEAD = "head.weight"


@pytest.fixture
def layout() -> LoraLayout:
    """Two non-square modules (one Conv1D-style) and a head."""
    return LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=5, out_features=7, rank=3, lora_alpha=6.0),
            LoraModuleSpec("enc.c_attn", in_features=6, out_features=4, rank=3, lora_alpha=2.0, fan_in_fan_out=True),
        ),
        other_keys=(HEAD,),
    )


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(8)


def _initial(layout: LoraLayout, gen: torch.Generator, b_zero: bool = True) -> dict[str, torch.Tensor]:
    state = {}
    for spec in layout.modules:
        state[spec.a_key] = torch.randn(spec.rank, spec.in_features, generator=gen) * 0.3
        state[spec.b_key] = (
            torch.zeros(spec.out_features, spec.rank)
            if b_zero
            else torch.randn(spec.out_features, spec.rank, generator=gen)
        )
    state[HEAD] = torch.randn(3, 5, generator=gen)
    return state


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ============================================================================================== Fed-SB
def _client_probe(m, plan, initial, grads_per_step, lr=0.1):
    """A set-up round's client work on hand-made gradients: the probe sums them (parameters never move) and finish()
    uploads -lr * mean gradient."""
    start = m.start_state(plan, initial, None)
    obj = m.objective(plan, start, None)
    for grads in grads_per_step:
        live = {k: g.clone() for k, g in grads.items()}
        obj.after_backward(live)
        assert all(not bool(g.any()) for g in live.values())  # zeroed: the optimiser step moves nothing
    upload, keep = m.finish(plan, dict(start), None, TrainStats(len(grads_per_step), 10, 1.0, lr))
    assert keep is None
    return ClientUpdate(plan.client_id, upload, num_examples=10 * (plan.client_id + 1), samples_seen=10)


@pytest.mark.invariant("fed_sb")
def test_fed_sb_init_is_the_best_rank_r_approximation_with_orthonormal_factors(gen) -> None:
    """(c) on a dense target -eta*sign(G) with an exact SVD: B0'B0 = I, A0 A0' = I, R0 diagonal, >= 0,
    non-increasing, and s*B0 R0 A0 is the best rank-r approximation (Eckart-Young residual)."""
    g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    target = -0.01 * torch.sign(g)
    s, r = 2.0, 3
    a0, b0, r0 = sb_factors(dense_svd(target), r, s)
    assert a0.shape == (r, 5) and b0.shape == (7, r) and r0.shape == (r, r)
    _close(b0.T @ b0, _eye(r))
    _close(a0 @ a0.T, _eye(r))
    diag = torch.diagonal(r0)
    assert torch.equal(r0, torch.diag(diag)) and bool((diag >= 0).all())
    assert bool((diag[:-1] >= diag[1:]).all())
    approx = s * b0 @ r0 @ a0
    sv = torch.linalg.svdvals(target)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(target - approx.double()) ** 2, (sv[r:] ** 2).sum(), rtol=1e-5, atol=1e-9
    )
    u, sig, vh = torch.linalg.svd(target)
    _close(approx, (u[:, :r] * sig[:r]) @ vh[:r])
    # fewer directions than the rank (a rank-1 target): completed orthonormally, zero R0 there, product unchanged
    one = torch.outer(torch.randn(7, generator=gen), torch.randn(5, generator=gen)).double()
    a1, b1, r1 = sb_factors(dense_svd(one), r, s, torch.Generator().manual_seed(0))
    _close(b1.T @ b1, _eye(r))
    _close(a1 @ a1.T, _eye(r))
    _close(s * b1 @ r1 @ a1, one)


@pytest.mark.invariant("fed_sb")
def test_fed_sb_gradient_setup_recovers_the_first_gradient_step(layout, gen) -> None:
    """The two federated set-up rounds: clients only sum gradients (nothing moves) and upload -lr * mean gradient;
    the server ends with s*B0 R0 A0 = trunc_r(-lr * sum_k p_k G_k), exact when the pooled gradient has rank <= r."""
    m = build_method("fed_sb", layout, num_clients=3)
    initial = _initial(layout, gen)
    server = m.init_server(initial)
    assert m.phase(server) == "range"
    # per module, the clients' full-weight gradients share a rank-r column and row space: the pooled one has rank r
    grads = {}
    for spec in layout.modules:
        left = torch.randn(spec.out_features, spec.rank, generator=gen)
        right = torch.randn(spec.rank, spec.in_features, generator=gen)
        grads[spec.name] = [left @ torch.randn(spec.rank, spec.rank, generator=gen) @ right for _ in range(3)]
    lr = 0.1
    for phase in ("range", "project"):
        ups = []
        for k in range(3):
            plan = m.plan(0, k, server)
            assert set(plan.upload) == set(layout.b_keys if phase == "range" else layout.a_keys)
            for spec in layout.modules:  # the probe measures the gradient at ΔW = 0
                assert not bool((plan.download[spec.b_key].float() @ plan.download[spec.a_key].float()).any())
            steps = []
            for t in range(2):  # two batches: each gradient is the client's full one times a batch factor
                f = 1.0 + 0.5 * t
                step = {}
                for spec in layout.modules:
                    gk, s = grads[spec.name][k] * f, spec.scaling()
                    if phase == "range":  # dL/dB = s * G A'
                        step[spec.b_key] = s * gk @ plan.download[spec.a_key].float().T
                    else:  # dL/dA = s * B' G
                        step[spec.a_key] = s * plan.download[spec.b_key].float().T @ gk
                steps.append(step)
            ups.append(_client_probe(m, plan, initial, steps, lr))
        server = dataclasses.replace(server, **_changes(m.aggregate(0, server, ups)))
    assert m.phase(server) == "train"
    w = [1 / 3] * 3  # Fed-SB averages uniformly
    for spec in layout.modules:
        a0, b0 = m.basis(server, spec)
        r0 = server.tensors[f"{R_NS}/{spec.name}"]
        pooled = sum(p * g for p, g in zip(w, grads[spec.name], strict=True)) * 1.25  # mean batch factor
        _close(spec.scaling() * b0 @ r0 @ a0, -lr * pooled, 1e-4)
        _close(b0.T @ b0, _eye(spec.rank))
        _close(a0 @ a0.T, _eye(spec.rank))
        _close(server.adapter[spec.b_key], b0 @ r0)  # the global model is the initialised one
    assert server.meta[HOLDERS] == []


def _changes(res) -> dict:
    out = {"adapter": res.adapter}
    if res.tensors is not None:
        out["tensors"] = res.tensors
    if res.meta is not None:
        out["meta"] = res.meta
    return out


def _train_phase(layout, gen, **options):
    m = build_method("fed_sb", layout, num_clients=4, options={"init": "random", **options})
    server = m.init_server(_initial(layout, gen))
    assert m.phase(server) == "train"
    return m, server


def _r_update(m, server, k, gen, personal=None):
    """Client k's reply with a random, non-symmetric R_k (and head), made by the method's own client path."""
    plan = m.plan(0, k, server)
    start = m.start_state(plan, {key: v for key, v in server.adapter.items()}, personal)
    trained = dict(start)
    for spec in m.layout.modules:
        _, b0 = m.basis(server, spec)
        trained[spec.b_key] = b0 @ torch.randn(spec.rank, spec.rank, generator=gen)
    trained[HEAD] = torch.randn(3, 5, generator=gen)
    upload, keep = m.finish(plan, trained, personal, TrainStats(1, 1, 1.0, 0.1))
    return ClientUpdate(k, upload, num_examples=10 * (k + 1), samples_seen=10), keep, trained


@pytest.mark.invariant("fed_sb")
def test_fed_sb_exact_uniform_mean_of_r_from_this_round_only(layout, gen) -> None:
    """(a) s*B*mean(R_k)*A == mean_k s*B R_k A; (d) the stale-R bug: a different previous round changes nothing;
    (e) the upload is r x r per module (+ head) and carries no A or B."""
    m, server = _train_phase(layout, gen, cache_basis=False)
    plan = m.plan(0, 0, server)
    for spec in layout.modules:
        assert plan.upload[f"{R_NS}/{spec.name}"].shape == (spec.rank, spec.rank)
    assert set(plan.upload) == {f"{R_NS}/{s.name}" for s in layout.modules} | {HEAD}
    ups = []
    for k in range(3):
        up, _, trained = _r_update(m, server, k, gen)
        for spec in layout.modules:  # R_k = B0' B (not its transpose)
            _, b0 = m.basis(server, spec)
            _close(b0 @ up.state[f"{R_NS}/{spec.name}"], trained[spec.b_key])
        ups.append(up)
    res = m.aggregate(0, server, ups)
    for spec in layout.modules:
        a0, b0 = m.basis(server, spec)
        s = spec.scaling()
        want = sum(s * b0 @ u.state[f"{R_NS}/{spec.name}"] @ a0 for u in ups) / 3  # uniform, not n_k
        _close(s * res.adapter[spec.b_key] @ res.adapter[spec.a_key], want)
        assert torch.equal(res.adapter[spec.a_key], server.adapter[spec.a_key])  # A0 never changes
    _close(res.adapter[HEAD], sum(u.state[HEAD] for u in ups) / 3)
    # (d) two different histories before round t give the same round-t aggregate from the same round-t uploads
    other = [_r_update(m, server, k, gen)[0] for k in range(3)]
    after_a = dataclasses.replace(server, **_changes(m.aggregate(0, server, ups)))
    after_b = dataclasses.replace(server, **_changes(m.aggregate(0, server, other)))
    now = [_r_update(m, after_a, k, gen)[0] for k in range(3)]
    got_a, got_b = m.aggregate(1, after_a, now), m.aggregate(1, after_b, now)
    for key in m.r_keys():
        assert torch.equal(got_a.tensors[key], got_b.tensors[key])
        _close(got_a.tensors[key], sum(u.state[key] for u in now) / 3)


@pytest.mark.invariant("fed_sb")
def test_fed_sb_basis_is_identical_on_every_client_and_sent_once(layout, gen) -> None:
    """(b) A0 and B0 are computed once on the server and are bit-identical in every client's start state, in every
    round; a client that took part in a round of at least two replies keeps them and is not sent them again."""
    m, server = _train_phase(layout, gen)
    kept = {}
    ups = []
    for k in range(3):
        up, keep, _ = _r_update(m, server, k, gen)
        kept[k] = keep
        ups.append(up)
    first = m.plan(0, 0, server)
    assert any(key.startswith(A0_NS) for key in first.download)
    server = dataclasses.replace(server, **_changes(m.aggregate(0, server, ups)))
    assert server.meta[HOLDERS] == [0, 1, 2]
    # one reply alone does not make a holder (it may be a stand-in, not the client's own)
    alone = m.aggregate(1, server, [_r_update(m, server, 3, gen)[0]])
    assert alone.meta[HOLDERS] == [0, 1, 2]
    for rnd in (1, 2):
        for k in range(4):
            plan = m.plan(rnd, k, server)
            carries = any(key.startswith((A0_NS, B0_NS)) for key in plan.download)
            assert carries == (k == 3)
            start = m.start_state(plan, _initial(layout, gen), kept.get(k))
            for spec in layout.modules:
                a0, b0 = m.basis(server, spec)
                assert torch.equal(start[spec.a_key], a0)
                assert torch.equal(start[f"{B0_NS}/{spec.name}"], b0)
                _close(start[spec.b_key], b0 @ server.tensors[f"{R_NS}/{spec.name}"])
    # without caching, the basis travels every round
    m2, server2 = _train_phase(layout, gen, cache_basis=False)
    server2 = dataclasses.replace(
        server2, **_changes(m2.aggregate(0, server2, [_r_update(m2, server2, k, gen)[0] for k in range(2)]))
    )
    assert all(key in m2.plan(1, 0, server2).download for key in (f"{A0_NS}/enc.q", f"{B0_NS}/enc.q"))


def test_fed_sb_client_keeps_b_in_the_column_space_of_b0(layout, gen) -> None:
    """The training objective: gradients and parameters are projected on B0's column space, so a plain SGD step on B
    is B0 times the SGD step on R (dL/dR = B0' dL/dB), and the upload is that R."""
    m, server = _train_phase(layout, gen)
    plan = m.plan(0, 0, server)
    start = m.start_state(plan, server.adapter, None)
    obj = m.objective(plan, start, None)
    spec = layout.modules[0]
    _, b0 = m.basis(server, spec)
    r0 = server.tensors[f"{R_NS}/{spec.name}"]
    g = torch.randn(spec.out_features, spec.rank, generator=gen)
    grads = {spec.b_key: g.clone()}
    obj.after_backward(grads)
    _close(grads[spec.b_key], b0 @ (b0.T @ g))
    param = start[spec.b_key] - 0.5 * grads[spec.b_key]  # an SGD step with lr 0.5
    obj.after_step({spec.b_key: param}, 0.5)
    upload, _ = m.finish(plan, {**start, spec.b_key: param}, None, TrainStats(1, 1, 1.0, 0.5))
    _close(upload[f"{R_NS}/{spec.name}"], r0 - 0.5 * (b0.T @ g))
    drifted = param + torch.randn(g.shape, generator=gen)  # an optimiser step off the subspace is projected back
    obj.after_step({spec.b_key: drifted}, 0.5)
    _close(drifted, b0 @ (b0.T @ drifted))


# ============================================================================================== FedSVD
@pytest.mark.invariant("fedsvd")
def test_fedsvd_refactorises_the_aggregate_exactly_with_orthonormal_a(layout, gen) -> None:
    """(a) B_new A_new == B_agg A_old, A_new A_new' = I, B_new'B_new = diag(sigma^2) non-increasing; (b) with the
    shared A, s*B_agg A == sum p_k s*B_k A (n_k weights), so the model after re-factorisation is
    W0 + s*sum p_k B_k A_old."""
    m = build_method("fedsvd", layout, options={"orthonormal_start": False})
    initial = _initial(layout, gen, b_zero=False)
    server = m.init_server(initial)
    assert torch.equal(server.adapter[layout.modules[0].a_key], initial[layout.modules[0].a_key])
    plan = m.plan(0, 0, server)
    assert set(plan.upload) == set(layout.b_keys) | {HEAD}
    assert not (plan.train_keys & set(layout.a_keys))  # (c) A never trains
    ups = []
    for k, n in enumerate((10, 30, 60)):
        state = {spec.b_key: torch.randn(spec.out_features, spec.rank, generator=gen) for spec in layout.modules}
        state[HEAD] = torch.randn(3, 5, generator=gen)
        ups.append(ClientUpdate(k, state, num_examples=n, samples_seen=40))
    p = [0.1, 0.3, 0.6]
    res = m.aggregate(0, server, ups)
    for spec in layout.modules:
        a_old = server.adapter[spec.a_key]
        a_new, b_new = res.adapter[spec.a_key], res.adapter[spec.b_key]
        b_agg = sum(pk * u.state[spec.b_key] for pk, u in zip(p, ups, strict=True))
        _close(b_new @ a_new, b_agg @ a_old)
        s = spec.scaling()
        _close(s * b_new @ a_new, sum(pk * s * u.state[spec.b_key] @ a_old for pk, u in zip(p, ups, strict=True)))
        _close(a_new @ a_new.T, _eye(spec.rank))
        gram = b_new.T @ b_new
        _close(gram, torch.diag(torch.diagonal(gram)), 1e-4)
        d = torch.diagonal(gram)
        assert bool((d[:-1] >= d[1:] - 1e-6).all())
        _close(d.sqrt(), torch.linalg.svdvals(b_agg @ a_old)[: spec.rank], 1e-4)
    _close(res.adapter[HEAD], sum(pk * u.state[HEAD] for pk, u in zip(p, ups, strict=True)))


def test_fedsvd_schedule_start_and_sign_alignment(layout, gen) -> None:
    m = build_method("fedsvd", layout, options={"svd_period": 2, "svd_warmup": 1})
    assert [m.refactorises(t) for t in range(6)] == [False, True, False, True, False, True]
    never = build_method("fedsvd", layout, options={"svd_period": 0})
    assert not any(never.refactorises(t) for t in range(5))
    # orthonormal start: B = 0, so only A changes: orthonormal rows spanning the same row space, zero product
    initial = _initial(layout, gen)
    server = build_method("fedsvd", layout).init_server(initial)
    for spec in layout.modules:
        a = server.adapter[spec.a_key]
        _close(a @ a.T, _eye(spec.rank))
        a_init = initial[spec.a_key]
        _close(a_init @ a.T @ a, a_init)  # the initial rows lie in the new row space
        assert not bool(server.adapter[spec.b_key].any())
    # re-factorising an already re-factorised pair changes nothing (signs follow the previous A)
    spec = layout.modules[0]
    a, b = refactorise(initial[spec.a_key], torch.randn(spec.out_features, spec.rank, generator=gen))
    a2, b2 = refactorise(a, b)
    _close(a2, a)
    _close(b2, b)
    with pytest.raises(ValueError, match="trains one rank for all clients"):
        build_method("fedsvd", layout, client_ranks=(2, 1))


def test_fedsvd_a_stays_bit_identical_during_a_real_client_round(tiny_bert: str, tmp_path) -> None:
    """(c) on real peft layers: the client's A after training is the downloaded A, bit for bit."""
    from helpers import tiny_config

    from fedlora.adapters.peft_io import AdapterSlots
    from fedlora.api import build, resolve_config
    from fedlora.federation.round import run_round

    cfg = resolve_config(tiny_config(tiny_bert, tmp_path, method="fedsvd", max_examples_per_label=10, local_epochs=1))
    setup = build(cfg)
    engine, m = setup.engine, setup.method
    server = m.init_server(engine.initial)
    seen = []
    original = engine.train

    def spy(plans):
        replies = original(plans)
        seen.append(AdapterSlots(setup.model).read())
        return replies

    engine.train = spy  # type: ignore[method-assign]
    new, report = run_round(0, m, server, engine, clients=[1])
    assert report.accepted == [1]
    for spec in setup.layout.modules:
        assert torch.equal(seen[0][spec.a_key], server.adapter[spec.a_key])
        assert not torch.equal(seen[0][spec.b_key], server.adapter[spec.b_key])
        a = new.adapter[spec.a_key]
        _close(a @ a.T, _eye(spec.rank))


# ============================================================================================== FLoRIST
def _mixed_updates(layout: LoraLayout, gen: torch.Generator, ranks=(2, 3, 1)) -> list[ClientUpdate]:
    ups = []
    for k, r in enumerate(ranks):
        state = {}
        mr = {}
        for spec in layout.modules:
            rk = r
            state[spec.a_key] = torch.randn(rk, spec.in_features, generator=gen)
            state[spec.b_key] = torch.randn(spec.out_features, rk, generator=gen)
            mr[spec.name] = ModuleRank(rk, spec.scaling(rk))
        state[HEAD] = torch.randn(3, 5, generator=gen)
        ups.append(ClientUpdate(k, state, num_examples=(10, 30, 60)[k], samples_seen=40, ranks=mr))
    return ups


@pytest.mark.invariant("florist")
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_florist_thresholded_svd_of_the_stacked_adapters(layout, gen, tau: float) -> None:
    """(a) U diag(sigma) V' == sum p_k s_k B_k A_k with sigma its singular values; (b) orthonormal U, V;
    (c) the merge error is sum_{j>k*} sigma_j^2 <= (1 - tau) sum sigma^2; (d) k* is minimal; (e) the base change is
    B_g A_g with sigma in B_g and A_g orthonormal rows."""
    m = build_method("florist", layout, num_clients=3, client_ranks=(2, 3, 1), options={"threshold": tau})
    server = m.init_server(_initial(layout, gen))
    ups = _mixed_updates(layout, gen)
    p = [0.1, 0.3, 0.6]
    res = m.aggregate(0, server, ups)
    for spec in layout.modules:
        ideal = sum(
            pk * u.ranks[spec.name].scale * u.state[spec.b_key] @ u.state[spec.a_key]
            for pk, u in zip(p, ups, strict=True)
        )
        sv = torch.linalg.svdvals(ideal.double())
        energy = sv**2
        total = float(energy.sum())
        ratio = torch.cumsum(energy, 0) / total
        want_k = int(torch.nonzero(ratio >= tau - 1e-12).flatten()[0]) + 1 if tau < 1 else int((sv > 1e-9).sum())
        b_g, a_g = res.base_delta[spec.name]
        k = a_g.shape[0]
        assert k == want_k or (tau == 1.0 and k >= want_k)
        assert b_g.shape == (spec.out_features, k)
        _close(a_g @ a_g.T, _eye(k))
        gram = b_g.T @ b_g
        _close(torch.diagonal(gram).sqrt(), sv[:k].float(), 1e-4)  # sigma in B
        err = float(torch.linalg.matrix_norm((ideal - b_g @ a_g).double()) ** 2)
        assert err == pytest.approx(float(energy[k:].sum()), rel=1e-4, abs=1e-8)
        assert err <= (1 - tau) * total + 1e-6
        if k > 1:
            assert float(ratio[k - 2]) < tau  # one fewer would not reach tau
        assert not bool(res.adapter[spec.b_key].any())  # the model lives in the merged base
    _close(res.adapter[HEAD], sum(pk * u.state[HEAD] for pk, u in zip(p, ups, strict=True)))
    assert res.metrics["florist_rank"] == pytest.approx(
        sum(res.base_delta[s.name][1].shape[0] for s in layout.modules) / 2
    )


def test_florist_energy_rank_edges_and_options() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])
    assert [energy_rank(s, t) for t in (0.5, 0.69, 0.93, 1.0)] == [1, 2, 3, 3]
    assert energy_rank(torch.zeros(3), 0.9) == 0
    assert energy_rank(torch.tensor([1.0, 1e-9]), 1.0) == 1  # a tail below double rounding is not energy
    assert energy_rank(s, 1.0 + 1e-12) == 3  # never reached (rounding at tau = 1): all kept
    lay = LoraLayout(modules=(LoraModuleSpec("m", 5, 7, 3, 6.0),))
    with pytest.raises(OptionError, match="threshold"):
        build_method("florist", lay, options={"threshold": 0.0})
    with pytest.raises(OptionError, match="threshold"):
        build_method("florist", lay, options={"threshold": 1.5})
    with pytest.raises(ValueError, match="florist cannot use aggregator='median'"):
        build_method("florist", lay, aggregator="median")


def test_florist_merge_on_conv1d_layers_equals_the_truncated_sum(tiny_gpt2: str, tmp_path) -> None:
    """(e) on real GPT-2 Conv1D layers (base stored (in, out)): after a round the effective weight is
    W0 + trunc_k*(sum p_k s B_k A_k), the truncation at the energy threshold."""
    from helpers import tiny_config

    from fedlora.adapters.peft_io import AdapterSlots, base_weights
    from fedlora.adapters.state import delta_weight
    from fedlora.api import build, resolve_config
    from fedlora.federation.round import run_round

    cfg = resolve_config(
        tiny_config(
            tiny_gpt2,
            tmp_path,
            method="florist",
            max_examples_per_label=10,
            local_epochs=1,
            method_options={"threshold": 0.8},
        )
    )
    setup = build(cfg)
    engine, m, layout = setup.engine, setup.method, setup.layout
    assert all(spec.fan_in_fan_out for spec in layout.modules)
    captured = []
    original = engine.train

    def capture(plans):
        replies = original(plans)
        captured.extend(replies)
        return replies

    engine.train = capture  # type: ignore[method-assign]

    def effective():
        st = AdapterSlots(setup.model).read()
        out = {}
        for spec in layout.modules:
            w = base_weights(setup.model, layout)[spec.name].detach()
            out[spec.name] = (w.T if spec.fan_in_fan_out else w).clone() + delta_weight(st, spec)
        return out

    server = m.init_server(engine.initial)
    engine.evaluate(server)
    w0 = effective()
    server, report = run_round(0, m, server, engine, clients=[0, 1, 2, 3])
    assert len(report.accepted) == 4
    engine.evaluate(server)
    got = effective()
    p = m.weights(captured)
    truncated = []
    for spec in layout.modules:
        ideal = sum(
            pk * spec.scaling() * u.state[spec.b_key].double() @ u.state[spec.a_key].double()
            for pk, u in zip(p, captured, strict=True)
        )
        u_, s_, vh = torch.linalg.svd(ideal)
        k = energy_rank(s_, 0.8)
        truncated.append(k < min(ideal.shape))
        torch.testing.assert_close(
            got[spec.name].double(), w0[spec.name].double() + (u_[:, :k] * s_[:k]) @ vh[:k], rtol=1e-4, atol=1e-5
        )
    assert any(truncated)  # the threshold cut something
