"""Round logic without a model: sampling, reply validation and rejection, byte counting, base-delta handling."""

from __future__ import annotations

import dataclasses
import logging

import torch
from helpers import HEAD, random_state

from fedlora.adapters import state_bytes
from fedlora.federation.round import run_round, sample_clients, validate_update
from fedlora.methods import ClientUpdate, build_method


class FakeRuntime:
    """Replies with prepared states (or errors) and records what the round logic asked for."""

    def __init__(self, replies):
        self.replies = replies
        self.evaluated = 0
        self.accepted = []
        self.plans = []

    def train(self, plans):
        self.plans.extend(plans)
        return [self.replies(p) for p in plans]

    def accept(self, client_ids):
        self.accepted.append(list(client_ids))

    def evaluate(self, server):
        self.evaluated += 1
        return {"global_accuracy": 0.5}


def test_sampling_is_seeded_and_sized() -> None:
    a = sample_clients(20, 3, seed=1, per_round=5)
    assert a == sample_clients(20, 3, seed=1, per_round=5) and len(a) == 5 and a == sorted(a)
    assert a != sample_clients(20, 4, seed=1, per_round=5)
    assert len(sample_clients(20, 0, seed=1, fraction=0.25)) == 5
    assert sample_clients(6, 0, seed=1) == list(range(6))


def _reply_from(layout, gen, n=10):
    def reply(plan):
        st = random_state(layout, gen)
        return ClientUpdate(
            plan.client_id, {k: st[k] for k in plan.upload_keys}, num_examples=n, samples_seen=n, ranks=plan.ranks
        )

    return reply


def test_bad_replies_are_rejected_and_round_goes_on(layout, gen, caplog) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    good = _reply_from(layout, gen)
    a0 = layout.a_keys[0]

    def replies(plan):
        u = good(plan)
        if plan.client_id == 1:
            return dataclasses.replace(u, state={**u.state, a0: torch.full_like(u.state[a0], float("nan"))})
        if plan.client_id == 2:
            return dataclasses.replace(u, state={**u.state, a0: torch.zeros(5, 5)})
        if plan.client_id == 3:
            return dataclasses.replace(u, state={k: v for k, v in u.state.items() if k != HEAD})
        if plan.client_id == 4:
            return RuntimeError("out of memory")
        if plan.client_id == 5:
            return dataclasses.replace(u, state={**u.state, a0: u.state[a0].double()})
        return u

    rt = FakeRuntime(replies)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        new, report = run_round(0, method, server, rt, clients=list(range(6)))
    assert report.accepted == [0]
    assert set(report.rejected) == {1, 2, 3, 4, 5}
    assert "non-finite" in report.rejected[1]
    assert "shape (5, 5), expected (2, 4)" in report.rejected[2]
    assert "missing ['head.weight']" in report.rejected[3]
    assert "out of memory" in report.rejected[4]
    assert "dtype torch.float64" in report.rejected[5]
    assert "rejected the reply of client 2" in caplog.text
    assert new.round == 1 and rt.evaluated == 1
    assert rt.accepted == [[0]]  # only accepted clients may commit personal state


def test_all_rejected_keeps_global_state(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    rt = FakeRuntime(lambda p: ValueError("boom"))
    new, report = run_round(0, method, server, rt, clients=[0, 1])
    assert report.accepted == [] and new.round == 1
    for k in layout.all_keys:
        assert torch.equal(new.adapter[k], server.adapter[k])


def test_bytes_count_what_travels(layout, gen) -> None:
    full = sum(s.rank * (s.in_features + s.out_features) * 4 for s in layout.modules) + 15 * 4
    for name, up_per_client in [
        ("fedit", full),
        ("ffa_lora", sum(s.rank * s.out_features * 4 for s in layout.modules) + 60),
        ("fedsa_lora", sum(s.rank * s.in_features * 4 for s in layout.modules)),
    ]:
        method = build_method(name, layout)
        server = method.init_server(random_state(layout, gen))
        _, report = run_round(0, method, server, FakeRuntime(_reply_from(layout, gen)), clients=[0, 2, 3])
        assert report.bytes_up == 3 * up_per_client, name
        assert report.bytes_down == 3 * state_bytes(method.plan(0, 0, server).download), name


def test_base_delta_travels_in_plans_accumulates_and_is_counted(layout, gen) -> None:
    method = build_method("fedex_lora", layout)
    server = method.init_server(random_state(layout, gen))
    rt = FakeRuntime(_reply_from(layout, gen))
    dense = sum(4 * s.in_features * s.out_features for s in layout.modules)
    s1, r1 = run_round(0, method, server, rt, clients=[0, 1])
    s2, r2 = run_round(1, method, s1, rt, clients=[0, 2])
    s3, r3 = run_round(2, method, s2, rt, clients=[0, 1])
    assert [p.base_update for p in rt.plans[:2]] == [None, None]  # nothing to apply before the first aggregation
    first = s1.last_base_update
    for p in rt.plans[2:4]:  # one version behind: the last change, additive
        assert p.base_update.version == 1 and not p.base_update.cumulative
        assert all(torch.equal(p.base_update.deltas[n], first[n]) for n in first)
    late = rt.plans[5]  # client 1 missed round 1: it gets the whole change since version 0
    assert late.client_id == 1 and late.base_update.cumulative and late.base_update.version == 2
    for spec in layout.modules:
        torch.testing.assert_close(s2.base_delta[spec.name], first[spec.name] + s2.last_base_update[spec.name])
        assert torch.equal(late.base_update.deltas[spec.name], s2.base_delta[spec.name])
    adapter_down = state_bytes(method.plan(0, 0, server).download)
    assert r1.bytes_down == 2 * adapter_down
    assert r2.bytes_down == 2 * adapter_down + 2 * dense
    assert s3.client_base == {0: 2, 1: 2, 2: 1}


def test_validate_update_rejects_wrong_client(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    plan = method.plan(0, 3, server)
    u = ClientUpdate(4, dict(server.adapter), num_examples=1, samples_seen=1, ranks=plan.ranks)
    assert "client 4" in validate_update(u, plan)
    assert validate_update(dataclasses.replace(u, client_id=3), plan) is None
    assert "num_examples=0" in validate_update(dataclasses.replace(u, client_id=3, num_examples=0), plan)


def test_reported_losses_are_display_only_and_cannot_crash_the_round(layout, gen) -> None:
    method = build_method("fedit", layout)
    server = method.init_server(random_state(layout, gen))
    good = _reply_from(layout, gen)

    def replies(plan):
        u = good(plan)
        metrics = {0: {"train_loss": 2.0}, 1: {"train_loss": "lots"}, 2: {"train_loss": float("nan")}}[plan.client_id]
        return dataclasses.replace(u, metrics=metrics)

    _, report = run_round(0, method, server, FakeRuntime(replies), clients=[0, 1, 2])
    assert report.accepted == [0, 1, 2] and report.train_loss == 2.0
