"""Resume is bit-identical for every registered method: a run killed in the middle of a round and resumed from
its last checkpoint ends exactly where an uninterrupted run does (adapter, server state, client state, base
weights, metrics). A method that keeps mutable state anywhere but the checkpointed server and client state fails."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config
from method_cases import E2E_OVERRIDES

from fedlora import RunConfig, resume, run
from fedlora.engines.local import LocalEngine
from fedlora.methods import method_ids
from fedlora.runs import RunDir


def _config(model: str, tmp_path, method: str, name: str) -> RunConfig:
    return tiny_config(
        model,
        tmp_path,
        method=method,
        clients=3,
        clients_per_round=2,  # partial participation: stale clients, base versions, kept state of absent clients
        rounds=3,
        max_examples_per_label=8,
        local_steps=2,
        batch_size=8,
        partition="iid",
        run_name=name,
        **E2E_OVERRIDES.get(method, {}),
    )


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], tuple):
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)), f"{what}: {k}"
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("method", method_ids())
def test_killed_run_resumes_bit_identical(method: str, tiny_bert: str, tmp_path, monkeypatch) -> None:
    full = run(_config(tiny_bert, tmp_path, method, "full"))

    original = LocalEngine.train

    def dies_in_round_2(self, plans):
        if plans and plans[0].round == 2:
            original(self, plans[:1])  # one client trains, then the process dies
            raise KeyboardInterrupt
        return original(self, plans)

    monkeypatch.setattr(LocalEngine, "train", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tiny_bert, tmp_path, method, "cut"))
    monkeypatch.setattr(LocalEngine, "train", original)
    resumed = resume(tmp_path / "cut", progress=False)

    _assert_same(full.global_adapter, resumed.global_adapter, "global adapter")
    _assert_same(full.base_delta, resumed.base_delta, "base delta")
    assert full.personal.keys() == resumed.personal.keys()
    for cid in full.personal:
        _assert_same(full.personal[cid], resumed.personal[cid], f"client {cid} state")
    s_full, c_full, w_full = RunDir(full.run_dir).load_latest()
    s_res, c_res, w_res = RunDir(resumed.run_dir).load_latest()
    _assert_same(s_full.tensors, s_res.tensors, "server tensors")
    _assert_same(s_full.last_base_update, s_res.last_base_update, "last base update")
    _assert_same(w_full, w_res, "base weights")
    assert s_full.meta == s_res.meta and s_full.client_base == s_res.client_base
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    # the evaluation before round 1 is written once, by the first start, and kept by the resumed run
    assert full.initial and resumed.initial == full.initial
    assert json.loads((resumed.run_dir / "summary.json").read_text())["initial"] == full.initial
