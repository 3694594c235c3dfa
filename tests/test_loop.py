"""The run loop: round-0 checkpoint before any client trains, 1-based rounds, stopping a run that accepts nothing,
resume without a checkpoint, and simulated client failures."""

from __future__ import annotations

import pytest
import torch
from helpers import random_state

from fedlora.federation import MemoryStore, RoundPolicy, RunStalled, Schedule, run_federation, start_state
from fedlora.methods import ClientUpdate, build_method


class Runtime:
    def __init__(self, reply, store=None):
        self.reply = reply
        self.store = store
        self.trained_with_checkpoint: list[bool] = []
        self.plans = []

    def train(self, plans):
        self.trained_with_checkpoint.append(self.store is not None and self.store.latest is not None)
        self.plans.extend(plans)
        return [self.reply(p) for p in plans]

    def accept(self, ids):
        pass

    def evaluate(self, server):
        return {"global_accuracy": 0.5}

    def client_states(self):
        return {}

    def base_weights(self):
        return {}

    def restore(self, server, clients, weights):
        pass


def _good(plan):
    return ClientUpdate(plan.client_id, dict(plan.download), num_examples=5, samples_seen=5, ranks=plan.ranks)


def _setup(layout, gen, reply):
    method = build_method("fedit", layout)
    store = MemoryStore()
    rt = Runtime(reply, store)
    return method, store, rt, random_state(layout, gen)


def test_round_zero_checkpoint_exists_before_any_client_trains_and_rounds_are_one_based(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, _good)
    server = start_state(method, rt, store, initial, resume=False)
    assert store.latest is not None and store.latest[0].round == 0
    run_federation(method, rt, store, Schedule(rounds=3, num_clients=2), server)
    assert rt.trained_with_checkpoint == [True, True, True]
    assert [r["round"] for r in store.metrics] == [1, 2, 3]
    assert store.latest[0].round == 3


def test_a_run_accepting_nothing_stops_with_the_reasons(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, lambda p: RuntimeError("no space left"))
    server = start_state(method, rt, store, initial, resume=False)
    with pytest.raises(RunStalled, match=r"3 rounds in a row \(rounds 1..3\).*client 0: client failed.*no space"):
        run_federation(method, rt, store, Schedule(rounds=10, num_clients=2), server, max_failed_rounds=3)
    assert len(store.metrics) == 3  # what happened is recorded and checkpointed
    assert store.latest[0].round == 3


def test_a_run_that_never_accepted_a_reply_fails_even_without_an_early_stop(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, lambda p: None)
    server = start_state(method, rt, store, initial, resume=False)
    with pytest.raises(RunStalled, match="any of the run's 2 rounds"):
        run_federation(method, rt, store, Schedule(rounds=2, num_clients=2), server, max_failed_rounds=None)


def test_failed_rounds_count_across_a_resume(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, lambda p: None)
    server = start_state(method, rt, store, initial, resume=False)
    store.metrics = [{"round": 1, "accepted": 2}, {"round": 2, "accepted": 0}, {"round": 3, "accepted": 0}]
    server = store.latest[0].__class__(**{**store.latest[0].__dict__, "round": 3})
    with pytest.raises(RunStalled, match="3 rounds in a row"):
        run_federation(method, rt, store, Schedule(rounds=10, num_clients=2), server, max_failed_rounds=3)
    assert len(store.metrics) == 4  # one more failed round was enough


def test_resume_without_any_checkpoint_starts_afresh(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, _good)
    store.metrics = [{"round": 1, "accepted": 1}]  # written by a run killed before its checkpoint: dropped
    server = start_state(method, rt, store, initial, resume=True)
    assert server.round == 0 and store.metrics == [] and store.latest is not None
    for k in layout.all_keys:
        assert torch.equal(server.adapter[k], initial[k])


def test_simulated_dropouts_are_rejected_and_stragglers_work_less(layout, gen) -> None:
    method, store, rt, initial = _setup(layout, gen, _good)
    policy = RoundPolicy(dropout=0.3, stragglers=0.3, straggler_work=0.25, seed=1)
    server = start_state(method, rt, store, initial, resume=False)

    def reply(plan):
        return RuntimeError("dropped") if plan.fail_after is not None else _good(plan)

    rt.reply = reply
    run_federation(method, rt, store, Schedule(rounds=20, num_clients=10), server, policy=policy)
    fails = [p for p in rt.plans if p.fail_after is not None]
    slow = [p for p in rt.plans if p.fail_after is None and p.work == 0.25]
    assert 0.2 < len(fails) / len(rt.plans) < 0.4 and 0.15 < len(slow) / len(rt.plans) < 0.3
    assert sum(len(r["rejected"]) for r in store.metrics) == len(fails)


def test_a_straggler_trains_its_share_of_the_local_steps() -> None:
    from fedlora.client.train import TrainSettings, _budget

    s = TrainSettings(epochs=2, batch_size=16)
    assert _budget(s, 100, 1.0) is s  # 2 epochs of 7 batches
    assert _budget(s, 100, 0.5).steps == 7 and _budget(s, 100, 0.01).steps == 1
    assert _budget(TrainSettings(steps=10), 100, 0.25).steps == 3
