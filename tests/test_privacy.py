"""User-level DP: clipping, the server's noisy mean with a fixed denominator, identical releases to every client,
Poisson client sampling, the accountant against dp_accounting called directly, calibration, stopping when the
budget is spent, refusals, and end-to-end runs on the tiny model (server and client noise)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import HEAD, pretrained_weights, random_state, tiny_config

from fedlora import RunConfig
from fedlora.config import ConfigError
from fedlora.federation import MemoryStore, RunStalled, Schedule, budget_stop, run_federation, start_state
from fedlora.federation.round import run_round, sample_clients
from fedlora.methods import ClientUpdate, build_method
from fedlora.privacy import UserLevelDP, clip_update, noisy_mean, privatize_upload, update_delta, update_norm
from fedlora.privacy.accounting import calibrate_noise, client_epsilon, server_epsilon

dpa = pytest.importorskip("dp_accounting")
E = dpa.dp_event
NR = dpa.NeighboringRelation


class FakeRuntime:
    """Replies with ``reply(plan)`` and records plans and accepted ids."""

    def __init__(self, reply):
        self.reply = reply
        self.plans = []
        self.accepted = []

    def train(self, plans):
        self.plans.extend(plans)
        return [self.reply(p) for p in plans]

    def accept(self, ids):
        self.accepted.append(list(ids))

    def evaluate(self, server):
        return {}

    def client_states(self):
        return {}

    def base_weights(self):
        return {}

    def restore(self, server, clients, weights):
        pass


def _shifted(scale_of):
    """Replies that add ``scale_of(client)`` times a fixed random direction to what the client was sent."""

    def reply(plan):
        g = torch.Generator().manual_seed(plan.client_id + 100 * plan.round)
        state = {
            k: plan.download[k] + scale_of(plan.client_id) * torch.randn(v.shape, generator=g)
            for k, v in plan.download.items()
            if k in plan.upload
        }
        for k, spec in plan.upload.items():
            if k not in state:  # a factor the plan draws afresh instead of sending it (colr's B starts at zero)
                state[k] = scale_of(plan.client_id) * torch.randn(spec.shape, generator=g)
        return ClientUpdate(plan.client_id, state, num_examples=10, samples_seen=10, ranks=plan.ranks)

    return reply


# ------------------------------------------------------------------------------------------------ mechanism
def test_clipping_bounds_the_update_over_all_its_tensors() -> None:
    delta = {"a": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([4.0])}  # norm 5 over both tensors
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    assert update_norm(clipped) == pytest.approx(1.0)
    torch.testing.assert_close(clipped["a"], delta["a"] / 5)  # same direction, every tensor scaled alike
    torch.testing.assert_close(clipped["b"], delta["b"] / 5)
    small, _ = clip_update(delta, 10.0)  # inside the bound: unchanged
    torch.testing.assert_close(small["b"], delta["b"])
    with pytest.raises(ValueError, match="clip"):
        clip_update(delta, 0.0)


def test_update_is_measured_from_the_reference_and_privatized_upload_keeps_dtypes() -> None:
    ref = {"w": torch.ones(2, 3)}
    up = {"w": torch.ones(2, 3) + 3.0, "extra": torch.full((2,), 4.0)}  # "extra" was not sent: measured from 0
    d = update_delta(up, ref)
    assert update_norm(d) == pytest.approx(math.sqrt(6 * 9 + 2 * 16))
    out = privatize_upload(up, ref, clip=1.0, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert update_norm(update_delta(out, ref)) == pytest.approx(1.0, rel=1e-5)
    half = {"w": up["w"].half(), "extra": up["extra"]}
    assert privatize_upload(half, ref, clip=1.0, noise=1.0, generator=torch.Generator())["w"].dtype == torch.float16


def test_noisy_mean_uses_the_fixed_denominator_and_the_right_noise_std() -> None:
    n = 40_000
    like = {"x": torch.zeros(n), "y": torch.zeros(4, 5)}
    gen = torch.Generator().manual_seed(0)
    deltas = [
        {"x": torch.randn(n, generator=gen) * 0.002, "y": torch.randn(4, 5, generator=gen) * 0.01} for _ in range(3)
    ]
    assert all(update_norm(d) < 1.0 for d in deltas)  # none is clipped at C = 1
    exact = {k: sum(d[k] for d in deltas) / 8 for k in like}
    plain = noisy_mean(deltas, like, clip=1.0, noise=0.0, denominator=8.0, generator=torch.Generator())
    for k in like:  # without noise: the sum over the denominator 8, not over the 3 updates present
        torch.testing.assert_close(plain[k], exact[k])
    sigma, clip, den = 1.5, 0.7, 8.0
    noisy = noisy_mean(
        deltas, like, clip=clip, noise=sigma, denominator=den, generator=torch.Generator().manual_seed(1)
    )
    clipped = [clip_update(d, clip)[0] for d in deltas]
    resid = noisy["x"] - sum(c["x"] for c in clipped) / den
    assert float(resid.std()) == pytest.approx(sigma * clip / den, rel=0.02)  # std sigma*C/den per coordinate
    assert abs(float(resid.mean())) < 4 * sigma * clip / den / math.sqrt(n)
    # the same draw repeats with the same generator seed, and an empty round releases noise alone
    again = noisy_mean(
        deltas, like, clip=clip, noise=sigma, denominator=den, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(again["y"], noisy["y"])
    alone = noisy_mean([], like, clip=clip, noise=sigma, denominator=den, generator=torch.Generator().manual_seed(2))
    assert float(alone["x"].std()) == pytest.approx(sigma * clip / den, rel=0.02)


def test_a_large_update_moves_the_noisy_mean_by_at_most_the_clip_over_the_denominator() -> None:
    like = {"x": torch.zeros(10)}
    honest = [{"x": torch.full((10,), 0.01)} for _ in range(4)]
    wild = {"x": torch.full((10,), 1000.0)}
    kw = dict(clip=0.5, noise=0.0, denominator=5.0, generator=torch.Generator())
    without = noisy_mean(honest, like, **kw)
    with_wild = noisy_mean([*honest, wild], like, **kw)
    assert update_norm({"x": with_wild["x"] - without["x"]}) == pytest.approx(0.5 / 5)


# ------------------------------------------------------------------------------------------------ round logic
def _dp(**kw) -> UserLevelDP:
    base = dict(clip=1.0, noise=0.8, num_clients=6, per_round=4, seed=3)
    base.update(kw)
    return UserLevelDP(**base)


def test_server_noise_gives_every_client_the_same_noisy_update(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    seen = []
    original = method.aggregate

    def spy(rnd, srv, updates):
        seen.extend(updates)
        return original(rnd, srv, updates)

    method.aggregate = spy  # type: ignore[method-assign]
    honest = _shifted(lambda c: 0.05 * (c + 1))
    rt = FakeRuntime(lambda p: RuntimeError("lost") if p.client_id == 5 else honest(p))
    dp = _dp()
    new, report = run_round(2, method, server, rt, clients=[0, 1, 3, 5], privacy=dp)
    assert report.accepted == [0, 1, 3] and len(seen) == 3 and 5 in report.rejected
    for u in seen[1:]:  # identical releases
        assert all(torch.equal(u.state[k], seen[0].state[k]) for k in seen[0].state)
    replies = [honest(p) for p in rt.plans if p.client_id != 5]
    ref = rt.plans[0].download
    mean = noisy_mean(
        [update_delta(r.state, ref) for r in replies],
        {k: v for k, v in replies[0].state.items()},
        clip=dp.clip,
        noise=dp.noise,
        denominator=4.0,  # the 4 clients sampled, though one reply was lost
        generator=dp.generator("server", 2),
    )
    for k in seen[0].state:  # ... equal to the reference plus the noisy mean update
        torch.testing.assert_close(seen[0].state[k], ref[k] + mean[k])
    torch.testing.assert_close(new.adapter[HEAD], ref[HEAD] + mean[HEAD])  # FedIT's average of identical updates
    assert report.metrics["dp_clipped"] == sum(update_norm(update_delta(r.state, ref)) > 1.0 for r in replies)


def _server_noise_methods() -> list[str]:
    from fedlora.methods import get_method_class, method_ids
    from fedlora.privacy import server_noise_refusal

    return [m for m in method_ids() if server_noise_refusal(get_method_class(m)) is None]


@pytest.mark.parametrize("method", _server_noise_methods())
def test_every_method_allowed_server_noise_aggregates_one_shared_noisy_update(method: str, layout, gen) -> None:
    m = build_method(method, layout, base_weights=pretrained_weights(layout))
    server = m.init_server(random_state(layout, gen))
    seen = []
    original = m.aggregate

    def spy(rnd, srv, updates):
        seen.extend(updates)
        return original(rnd, srv, updates)

    m.aggregate = spy  # type: ignore[method-assign]
    for rnd in (0, 1):  # rolora alternates its factor; FedOpt methods start their moments
        server, report = run_round(
            rnd, m, server, FakeRuntime(_shifted(lambda c: 0.05)), clients=[0, 1, 2], privacy=_dp()
        )
        assert report.accepted == [0, 1, 2], report.rejected
        last = seen[-3:]
        assert all(torch.equal(u.state[k], last[0].state[k]) for u in last for k in last[0].state)
        assert all(torch.isfinite(v).all() for v in server.adapter.values())


def test_server_noise_turns_off_the_relative_checks_and_releases_noise_in_an_empty_round(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    # one client x1000: the norm bound would reject it; under DP it is clipped to C like any other
    rt = FakeRuntime(_shifted(lambda c: 1000.0 if c == 0 else 0.01))
    _, report = run_round(0, method, server, rt, clients=[0, 1, 2, 3], privacy=_dp(noise=0.0))
    assert report.accepted == [0, 1, 2, 3] and not report.rejected and report.metrics["dp_clipped"] >= 1
    new, empty = run_round(1, method, server, FakeRuntime(_shifted(lambda c: 0.0)), clients=[], privacy=_dp())
    assert empty.accepted == [] and new.round == 2
    moved = update_norm(update_delta(new.adapter, server.adapter))
    n = sum(v.numel() for v in server.adapter.values())
    assert moved == pytest.approx(0.8 * 1.0 / 4 * math.sqrt(n), rel=0.3)  # noise alone, std sigma*C/m


def test_client_noise_keeps_the_round_logic_but_drops_the_direction_check(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))

    def flipped(plan):  # clients agree on a direction; client 0 flips it, which the direction check rejects
        common = torch.Generator().manual_seed(7)
        own = torch.Generator().manual_seed(plan.client_id)
        sign = -1.0 if plan.client_id == 0 else 1.0
        state = {
            k: plan.download[k]
            + sign * 0.1 * torch.randn(v.shape, generator=common)
            + 0.01 * torch.randn(v.shape, generator=own)
            for k, v in plan.download.items()
        }
        return ClientUpdate(plan.client_id, state, num_examples=10, samples_seen=10, ranks=plan.ranks)

    _, plain = run_round(0, method, server, FakeRuntime(flipped), clients=[0, 1, 2, 3])
    assert 0 in plain.rejected
    _, private = run_round(
        0, method, server, FakeRuntime(flipped), clients=[0, 1, 2, 3], privacy=_dp(noise_at="client")
    )
    assert 0 not in private.rejected and "dp_clipped" not in private.metrics


# ------------------------------------------------------------------------------------------------ sampling
def test_poisson_sampling_is_seeded_independent_and_may_be_empty() -> None:
    rounds = [sample_clients(10, r, seed=4, fraction=0.3, sampling="poisson") for r in range(2000)]
    assert rounds[7] == sample_clients(10, 7, seed=4, fraction=0.3, sampling="poisson")
    assert rounds[:50] != [sample_clients(10, r, seed=5, fraction=0.3, sampling="poisson") for r in range(50)]
    share = sum(len(r) for r in rounds) / (2000 * 10)
    assert share == pytest.approx(0.3, abs=0.01)
    assert any(not r for r in rounds)  # (0.7)^10 = 2.8% of rounds are empty
    sizes = {len(r) for r in rounds}
    assert len(sizes) > 3  # the count varies
    with pytest.raises(ValueError, match="fraction"):
        sample_clients(10, 0, seed=0, sampling="poisson")


def test_empty_poisson_rounds_do_not_count_as_failed(layout, gen) -> None:
    method = build_method("fedit", layout)
    store = MemoryStore()
    rt = FakeRuntime(_shifted(lambda c: 0.01))
    server = start_state(method, rt, store, random_state(layout, gen), resume=False)
    schedule = Schedule(rounds=40, num_clients=3, seed=1, client_fraction=0.2, sampling="poisson")
    assert sum(1 for r in range(40) if not schedule.clients(r)) >= 3  # several empty rounds in a row possible
    run_federation(method, rt, store, schedule, server, max_failed_rounds=1)  # does not raise RunStalled
    empty = [r for r in store.metrics if r["clients"] == []]
    assert empty and all(r["accepted"] == 0 for r in empty)
    # a run whose clients all fail still stalls: its rounds with clients are counted, its empty ones are not
    short = dataclasses.replace(schedule, rounds=10)
    tried = sum(1 for r in range(10) if short.clients(r))
    assert 0 < tried < 10
    bad = FakeRuntime(lambda p: RuntimeError("boom"))
    store2 = MemoryStore()
    server2 = start_state(method, bad, store2, random_state(layout, gen), resume=False)
    with pytest.raises(RunStalled, match=f"any of the run's {tried} rounds"):
        run_federation(method, bad, store2, short, server2, max_failed_rounds=None)


# ------------------------------------------------------------------------------------------------ accountant
def _direct(event, rounds, delta, relation, kind, **kw):
    acc = (
        dpa.rdp.RdpAccountant(neighboring_relation=relation)
        if kind == "rdp"
        else dpa.pld.PLDAccountant(neighboring_relation=relation, **kw)
    )
    acc.compose(E.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("rounds", [1, 7])
def test_epsilon_equals_dp_accounting_called_directly(rounds: int) -> None:
    sigma, delta, n = 1.1, 1e-5, 8
    # Poisson sampling, rate q: amplified, add-or-remove neighbours, RDP and PLD
    ev = E.PoissonSampledDpEvent(0.25, E.GaussianDpEvent(sigma))
    ours = server_epsilon(sigma, rounds, delta, sampling="poisson", num_clients=n, rate=0.25)
    assert ours == pytest.approx(_direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "rdp"), rel=1e-12)
    pld = server_epsilon(sigma, rounds, delta, sampling="poisson", num_clients=n, rate=0.25, accountant="pld")
    assert pld == pytest.approx(_direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "pld"), rel=1e-3)  # library default
    assert pld < ours  # PLD is the tighter of the two here
    # every client every round: the Gaussian mechanism, composed
    ev = E.GaussianDpEvent(sigma)
    ours = server_epsilon(sigma, rounds, delta, sampling="fixed", num_clients=n, per_round=n)
    assert ours == pytest.approx(_direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "rdp"), rel=1e-12)
    pld = server_epsilon(sigma, rounds, delta, sampling="fixed", num_clients=n, per_round=n, accountant="pld")
    assert pld == pytest.approx(_direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "pld"), rel=1e-3)
    # fixed-size m < N without replacement: replace-one neighbours, sensitivity 2C, RDP only
    ev = E.SampledWithoutReplacementDpEvent(n, 3, E.GaussianDpEvent(sigma / 2))
    ours = server_epsilon(sigma, rounds, delta, sampling="fixed", num_clients=n, per_round=3)
    assert ours == pytest.approx(_direct(ev, rounds, delta, NR.REPLACE_ONE, "rdp"), rel=1e-12)
    assert server_epsilon(sigma, rounds, delta, sampling="fixed", num_clients=n, per_round=3, accountant="pld") is None
    # client noise: no amplification, sensitivity 2C, composed over a client's participations
    ev = E.GaussianDpEvent(sigma / 2)
    assert client_epsilon(sigma, rounds, delta) == pytest.approx(
        _direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "rdp")
    )
    assert client_epsilon(sigma, rounds, delta, accountant="pld") == pytest.approx(
        _direct(ev, rounds, delta, NR.ADD_OR_REMOVE_ONE, "pld"), rel=1e-3
    )


def test_epsilon_grows_with_rounds_and_falls_with_noise_and_sampling() -> None:
    kw = dict(sampling="poisson", num_clients=10)
    assert server_epsilon(1.0, 5, 1e-5, rate=0.2, **kw) < server_epsilon(1.0, 10, 1e-5, rate=0.2, **kw)
    assert server_epsilon(2.0, 5, 1e-5, rate=0.2, **kw) < server_epsilon(1.0, 5, 1e-5, rate=0.2, **kw)
    assert server_epsilon(1.0, 5, 1e-5, rate=0.2, **kw) < server_epsilon(1.0, 5, 1e-5, rate=1.0, **kw)
    assert server_epsilon(0.0, 5, 1e-5, rate=0.2, **kw) == math.inf
    assert server_epsilon(1.0, 0, 1e-5, rate=0.2, **kw) == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        dict(sampling="poisson", rate=0.3),
        dict(sampling="fixed", per_round=8),
        dict(noise_at="client"),
    ],
)
def test_calibration_reaches_the_target(kw) -> None:
    """(Fixed-size sampling of m < N is left out: its RDP costs 0.4 s per evaluation; the bisection is the same.)"""
    for target in (1.0, 8.0):
        dp = UserLevelDP(clip=1.0, noise=1.0, num_clients=8, **kw)

        def eps(s, dp=dp):
            return dataclasses.replace(dp, noise=s).epsilon(20)

        sigma = calibrate_noise(eps, target)
        assert eps(sigma) <= target  # meets the target...
        assert eps(sigma * (1 - 1e-4)) > target  # ...with the least noise (to the tolerance 1e-4)
        assert eps(sigma) > target * 0.99


def test_resolve_config_calibrates_the_noise_into_the_config(tmp_path) -> None:
    from fedlora.api import privacy_of, resolve_config

    cfg = resolve_config(RunConfig(rounds=20, dp_clip=0.5, dp_target_epsilon=4.0, out_dir=str(tmp_path)))
    assert cfg.dp_noise is not None and cfg.dp_noise > 0
    dp = privacy_of(cfg)
    assert dp.epsilon(20) <= 4.0 < dp.epsilon(21)
    assert json.loads(json.dumps(cfg.to_dict()))["dp_noise"] == cfg.dp_noise


def test_the_run_stops_before_the_round_that_would_exceed_the_target(layout, gen) -> None:
    method = build_method("fedit", layout)
    dp = _dp(noise=1.0, num_clients=4, per_round=4)
    target = (dp.epsilon(3) + dp.epsilon(4)) / 2
    dp = dataclasses.replace(dp, target_epsilon=target)
    store = MemoryStore()
    rt = FakeRuntime(_shifted(lambda c: 0.01))
    server = start_state(method, rt, store, random_state(layout, gen), resume=False)
    schedule = Schedule(rounds=6, num_clients=4)
    server = run_federation(method, rt, store, schedule, server, privacy=dp)
    assert server.round == 3 and [r["round"] for r in store.metrics] == [1, 2, 3]
    assert [r["dp_epsilon"] for r in store.metrics] == [dp.epsilon(k) for k in (1, 2, 3)]
    assert all(r["dp_delta"] == dp.delta and r["dp_noise"] == 1.0 for r in store.metrics)
    why = budget_stop(dp, schedule, server.round)
    assert why and "round 4" in why and f"{target:g}" in why
    assert budget_stop(dp, schedule, 2) is None


def test_resumed_runs_report_the_same_epsilon(layout, gen) -> None:
    method = build_method("fedit", layout)
    dp = _dp(noise=1.3, num_clients=5, noise_at="client", per_round=None, sampling="poisson", rate=0.5)
    schedule = Schedule(rounds=6, num_clients=5, seed=2, client_fraction=0.5, sampling="poisson")
    initial = random_state(layout, gen)

    def go(stop_after=None):
        store = MemoryStore()
        rt = FakeRuntime(_shifted(lambda c: 0.01))
        server = start_state(method, rt, store, initial, resume=False)
        if stop_after is not None:
            run_federation(method, rt, store, dataclasses.replace(schedule, rounds=stop_after), server, privacy=dp)
            server = start_state(method, rt, store, initial, resume=True)
        run_federation(method, rt, store, schedule, server, privacy=dp)
        return [(r["dp_epsilon"], r["dp_epsilon_pld"]) for r in store.metrics]

    full = go()
    assert go(stop_after=2) == full
    counts = [schedule.most_participations(k) for k in range(1, 7)]
    assert [e for e, _ in full] == [client_epsilon(1.3, k, dp.delta) for k in counts]  # the most-sampled client


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("method", ["flora", "fedex_lora", "flexlora", "hetlora", "fl_tac", "scaffold"])
def test_server_noise_is_refused_by_name_for_methods_it_does_not_fit(method: str) -> None:
    with pytest.raises(ConfigError, match=rf"{method} cannot use dp_noise_at='server'.*dp_noise_at='client'"):
        RunConfig(method=method, dp_clip=1.0, dp_noise=1.0)
    RunConfig(method=method, dp_clip=1.0, dp_noise=1.0, dp_noise_at="client")  # client noise fits every method


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedsa_lora", "feddpa", "fedadam", "flasc", "rolora"])
def test_server_noise_is_accepted_by_averaging_methods(method: str) -> None:
    RunConfig(method=method, dp_clip=1.0, dp_noise=1.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(dp_clip=0.0, dp_noise=1.0), "dp_clip=0.0 must be > 0"),
        (dict(dp_clip=1.0, dp_noise=-1.0), r"dp_noise=-1.0 must be >= 0"),
        (dict(dp_clip=1.0, dp_noise=1.0, dp_delta=1.0), "dp_delta"),
        (dict(dp_clip=1.0, dp_target_epsilon=0.0), "dp_target_epsilon"),
        (dict(dp_clip=1.0), "dp_noise .* or dp_target_epsilon"),
        (dict(dp_noise=1.0), "need dp_clip"),
        (dict(client_sampling="poisson"), "needs client_fraction"),
        (dict(client_sampling="poisson", clients_per_round=2), "drop clients_per_round"),
        (dict(client_sampling="bernoulli"), "allowed values: fixed, poisson"),
        (dict(dp_clip=1.0, dp_noise=1.0, aggregator="median"), "aggregator='median' with dp_noise_at=server"),
        (dict(dp_clip=1.0, dp_noise=1.0, dp_noise_at="local"), "allowed values: server, client"),
    ],
)
def test_bad_privacy_options_are_refused_clearly(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kw)


# ------------------------------------------------------------------------------------------------ end to end
def test_a_private_run_still_learns_and_logs_epsilon_every_round(tiny_bert: str, tmp_path) -> None:
    from fedlora.api import run

    result = run(tiny_config(tiny_bert, tmp_path, dp_clip=1.0, dp_noise=0.1))
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    dp = UserLevelDP(clip=1.0, noise=0.1, num_clients=4)
    assert [r["dp_epsilon"] for r in lines] == pytest.approx([dp.epsilon(k) for k in range(1, 6)])
    assert all(r["dp_epsilon_pld"] < r["dp_epsilon"] and r["dp_delta"] == 1e-5 for r in lines)
    # measured (seeds 0, 1, 2): 0.35, 0.36, 0.49 after 5 rounds (no DP: 0.42); chance is 1/8
    assert result.final["global_accuracy"] >= 0.25
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["privacy"]["dp_noise"] == 0.1 and result.stopped is None


def test_client_noise_changes_uploads_not_what_clients_keep(tiny_bert: str, tmp_path) -> None:
    from fedlora.api import build, privacy_of, resolve_config

    cfg = resolve_config(
        tiny_config(
            tiny_bert,
            tmp_path,
            method="fedsa_lora",
            clients=2,
            max_examples_per_label=10,
            local_epochs=1,
            dp_clip=0.05,
            dp_noise=0.3,
            dp_noise_at="client",
        )
    )
    setup = build(cfg)
    engine, method = setup.engine, setup.method
    assert engine.settings.user_dp == privacy_of(cfg)
    server = method.init_server(engine.initial)
    plans = [method.plan(0, c, server) for c in (0, 1)]
    noisy = engine.train(plans)
    engine.accept([0, 1])
    kept_noisy = {c: dict(v) for c, v in engine.personal.items()}
    engine.personal.clear()
    engine.settings = dataclasses.replace(engine.settings, user_dp=None)
    plain = engine.train(plans)
    engine.accept([0, 1])
    kept_plain = engine.personal
    for p, a, b in zip(plans, noisy, plain, strict=True):
        ref = method.reference(p)
        da, db = update_delta(a.state, ref), update_delta(b.state, ref)
        assert set(a.state) == set(b.state) and all(a.state[k].dtype == b.state[k].dtype for k in a.state)
        n = sum(v.numel() for v in da.values())
        assert update_norm(db) > 0.05  # the clip bites
        noise = update_norm({k: da[k] - clip_update(db, 0.05)[0][k] for k in da})
        assert noise == pytest.approx(0.3 * 0.05 * math.sqrt(n), rel=0.1)  # clipped to C, then N(0, (sigma C)^2)
        dp = privacy_of(cfg)
        gen = dp.generator("client", 0, p.client_id)  # exactly the client's own clip-and-noise of what it trained
        expected = privatize_upload(b.state, ref, clip=dp.clip, noise=dp.noise, generator=gen)
        for k in a.state:
            torch.testing.assert_close(a.state[k], expected[k])
        assert set(kept_noisy[p.client_id]) == set(kept_plain[p.client_id])  # personal B: untouched by the noise
        for k, v in kept_noisy[p.client_id].items():
            assert torch.equal(v, kept_plain[p.client_id][k])
