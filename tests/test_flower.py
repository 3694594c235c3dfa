"""The Flower app in process: the ServerApp runs fedlora's run loop, ClientApps run its client code, with an
in-process Grid (the same functions, messages and records as a deployment; only the transport is missing).

The loopback deployment (SuperLink and SuperNodes as processes) is tested in tests/test_flower_deployment.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import flower_run_config, read_metrics
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedlora import api  # noqa: E402
from fedlora.config import ConfigError, RunConfig  # noqa: E402
from fedlora.data import DEFAULT_LABELS  # noqa: E402
from fedlora.flower.app import config_from_flower  # noqa: E402
from fedlora.flower.inprocess import run_in_process  # noqa: E402
from fedlora.flower.wire import ClientFailed, pack_plan, pack_reply, unpack_plan, unpack_reply  # noqa: E402
from fedlora.methods import get_method_class  # noqa: E402
from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, ModuleRank, Stage, TensorSpec  # noqa: E402


def _run_config(model: str, out, name: str, **kw) -> dict:
    return flower_run_config(model, out, name, **kw)


_metrics = read_metrics


def _same_run(flower_dir, local_dir, *, adapter: bool = True) -> None:
    a, b = _metrics(flower_dir), _metrics(local_dir)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        x.pop("seconds"), y.pop("seconds")
        assert x == y  # every metric, personal ones included (the nodes evaluate their own models), bit for bit
    if adapter:
        fa = load_file(flower_dir / "adapter" / "adapter_model.safetensors")
        la = load_file(local_dir / "adapter" / "adapter_model.safetensors")
        assert set(fa) == set(la)
        for k in fa:
            assert torch.equal(fa[k], la[k]), k


@pytest.mark.parametrize(
    "method,extra",
    [
        ("fedit", {}),
        ("fedsa_lora", {}),  # personal state kept in the nodes' Context
        ("flexlora", {"client-ranks": "2,4"}),  # mixed ranks
        ("fedex_lora", {}),  # changes the frozen base weights on every node
        ("fedalt", {}),  # personalised downloads, and a token-wise gate kept on the node, never sent
    ],
)
def test_the_flower_app_gives_the_local_engines_run_bit_for_bit(tiny_bert, tmp_path, method, extra):
    rc = _run_config(tiny_bert, tmp_path, "flower", method=method, **extra)
    run_in_process(rc, 3)
    local = api.run(RunConfig.from_dict({**rc, "run-name": "local", "progress": False}))
    _same_run(tmp_path / "flower", local.run_dir, adapter=get_method_class(method).has_global_model)
    if method in ("fedsa_lora", "fedalt"):
        assert "personal_accuracy" in _metrics(tmp_path / "flower")[-1]
    if method == "fedex_lora":
        fb = load_file(tmp_path / "flower" / "base_delta.safetensors")
        lb = load_file(local.run_dir / "base_delta.safetensors")
        assert fb and all(torch.equal(fb[k], lb[k]) for k in fb)


def test_a_failing_or_silent_node_is_a_rejected_reply_not_a_dead_run(tiny_bert, tmp_path):
    def fail(node: int, msg) -> str | None:
        if msg.metadata.message_type != "train":
            return None
        if node == 1 and msg.metadata.group_id == "1":
            return "SuperNode lost"
        if node == 2 and msg.metadata.group_id == "2":
            return "silent"
        return None

    rc = _run_config(tiny_bert, tmp_path, "flaky", **{"reply-timeout": 0.5})
    run_in_process(rc, 3, fail=fail)
    m = _metrics(tmp_path / "flaky")
    assert len(m) == 2
    assert set(m[0]["rejected"]) == {"0"} and "SuperNode lost" in m[0]["rejected"]["0"]
    assert set(m[1]["rejected"]) == {"1"} and "no reply" in m[1]["rejected"]["1"]
    assert m[0]["accepted"] == 2 and m[1]["accepted"] == 2


def test_the_server_app_resumes_from_the_run_directory(tiny_bert, tmp_path):
    rc = _run_config(tiny_bert, tmp_path, "resumed", method="fedit", rounds=1)
    run_in_process(rc, 3)
    run_in_process({**rc, "rounds": 2, "resume": str(tmp_path / "resumed")}, 3)
    once = _run_config(tiny_bert, tmp_path, "once", method="fedit", rounds=2)
    run_in_process(once, 3)
    _same_run(tmp_path / "resumed", tmp_path / "once")


@pytest.mark.parametrize("method", ["fedsa_lora", "fedex_lora"])
def test_a_restarted_server_app_resumes_methods_whose_clients_keep_state(tiny_bert, tmp_path, method):
    """fedsa_lora keeps each client's B on its node, fedex_lora changes the frozen weights each node holds a copy
    of. A restarted ServerApp is a new Flower run with empty Contexts: the nodes pick their clients' memories up
    from their state directory (by the run directory's name), and the restored server tells them which round of
    each client it accepted: in the first run the nodes could not evaluate (for fedsa_lora, the message that
    would have committed round 1's state), so only that tells them to keep it. The resumed run's second round and
    final state equal an uninterrupted run's, bit for bit."""
    from fedlora.flower.server import accepted_rounds

    state = {k: {"fedlora-state-dir": str(tmp_path / f"node{k}")} for k in range(3)}
    rc = _run_config(tiny_bert, tmp_path, "resumed", method=method, rounds=1)
    run_in_process(
        rc, 3, node_extra=state, fail=lambda node, msg: "down" if msg.metadata.message_type == "evaluate" else None
    )
    assert accepted_rounds(_metrics(tmp_path / "resumed")) == {0: 0, 1: 0, 2: 0}
    run_in_process({**rc, "rounds": 2, "resume": str(tmp_path / "resumed")}, 3, node_extra=state)
    run_in_process(_run_config(tiny_bert, tmp_path, "once", method=method, rounds=2), 3)
    a, b = _metrics(tmp_path / "resumed")[-1], _metrics(tmp_path / "once")[-1]
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    fs = load_file(tmp_path / "resumed" / "checkpoints" / "round-0002" / "server.safetensors")
    ls = load_file(tmp_path / "once" / "checkpoints" / "round-0002" / "server.safetensors")
    assert fs.keys() == ls.keys() and all(torch.equal(fs[k], ls[k]) for k in fs)
    assert all(any((tmp_path / f"node{k}").rglob("client-*.bin")) for k in range(3))


def test_accepted_rounds_come_from_the_run_history():
    from fedlora.flower.server import accepted_rounds

    history = [
        {"round": 1, "clients": [0, 1, 2], "rejected": {"1": "norm"}},
        {"round": 2, "clients": [0, 1], "rejected": {}},
        {"round": 3, "clients": [2, 0], "rejected": {"0": "timeout"}},
    ]
    assert accepted_rounds(history) == {0: 1, 1: 1, 2: 2}


def test_flower_run_config_is_validated_like_fedlora_run():
    cfg, opts = config_from_flower(
        {"method": "fedsa_lora", "rounds": 3, "method-options.local_head": "false", "reply-timeout": 5.0}
    )
    assert cfg.rounds == 3 and cfg.method_options["local_head"] is False and opts.reply_timeout == 5.0
    with pytest.raises(ConfigError, match="unknown config key 'roundz'"):
        config_from_flower({"roundz": 3})
    with pytest.raises(ConfigError, match="rounds"):
        config_from_flower({"rounds": 0})
    with pytest.raises(ConfigError, match="reply-timeout"):
        config_from_flower({"reply-timeout": -1.0})
    with pytest.raises(ValueError, match="local_hed"):
        config_from_flower({"method": "fedsa_lora", "method-options.local_hed": "true"})


def _plan() -> ClientPlan:
    g = torch.Generator().manual_seed(0)
    return ClientPlan(
        round=3,
        client_id=1,
        download={"m.lora_A.weight": torch.randn(2, 5, generator=g), "head": torch.randn(3, 5, generator=g)},
        upload={"m.lora_A.weight": TensorSpec((2, 5), torch.float32)},
        ranks={"m": ModuleRank(2, 4.0)},
        stages=(Stage(frozenset({"m.lora_A.weight"}), {"": 1.0, "local": 0.5}),),
        reinit_seed=7,
        rank_may_shrink=True,
        base_update=BaseUpdate(2, {"m": torch.ones(4, 5), "n": (torch.ones(4, 2), torch.ones(2, 5))}, True),
        upload_codec="int8",
        download_codec="fp16",
        work=0.5,
        fail_after=0.25,
    )


def test_a_plan_survives_the_wire_exactly():
    plan = _plan()
    got, extra = unpack_plan(pack_plan(plan, {"commit_round": 2}))
    assert extra == {"commit_round": 2}
    for f in ("round", "client_id", "upload", "ranks", "stages", "reinit_seed", "rank_may_shrink", "upload_codec"):
        assert getattr(got, f) == getattr(plan, f), f
    assert (got.download_codec, got.work, got.fail_after) == ("fp16", 0.5, 0.25)
    assert all(torch.equal(got.download[k], plan.download[k]) for k in plan.download)
    assert got.base_update.version == 2 and got.base_update.cumulative
    assert torch.equal(got.base_update.deltas["m"], plan.base_update.deltas["m"])
    assert [t.shape for t in got.base_update.deltas["n"]] == [(4, 2), (2, 5)]


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00" * 3, b"\xff" * 8 + b"x", (5).to_bytes(8, "little") + b"{]", (2).to_bytes(8, "little") + b"[]", "str"],
)
def test_an_unreadable_reply_is_an_error_value_never_an_exception(blob):
    update, extra = unpack_reply(blob)
    assert isinstance(update, Exception) and extra == {}


def test_a_reply_round_trips_and_a_reported_failure_stays_a_failure():
    upd = ClientUpdate(1, {"k": torch.ones(2)}, 10, 20, {"train_loss": 0.5}, {"m": ModuleRank(2, 4.0)})
    got, _ = unpack_reply(pack_reply(upd))
    assert (got.client_id, got.num_examples, got.samples_seen, got.metrics) == (1, 10, 20, {"train_loss": 0.5})
    assert (got.ranks["m"].rank, got.ranks["m"].scale) == (2, 4.0) and torch.equal(got.state["k"], torch.ones(2))
    from fedlora.flower.wire import pack_error

    failed, _ = unpack_reply(pack_error(RuntimeError("disk full")))
    assert isinstance(failed, ClientFailed) and "disk full" in str(failed)


def test_a_client_keeps_only_the_state_of_a_round_the_server_accepted():
    from fedlora.flower.node import ClientMemory

    mem = ClientMemory(kept={"b": torch.zeros(1)}, pending={"b": torch.ones(1)}, pending_round=4)
    mem.commit(3)  # round 4's reply was rejected: the server's latest accepted round is 3
    assert torch.equal(mem.kept["b"], torch.zeros(1)) and mem.pending is None
    mem = ClientMemory.from_bytes(ClientMemory(pending={"b": torch.ones(1)}, pending_round=4).to_bytes())
    mem.commit(4)
    assert torch.equal(mem.kept["b"], torch.ones(1)) and mem.pending is None


def test_the_flower_app_declares_every_fedlora_option_with_its_default():
    import tomllib
    from pathlib import Path

    import options_table  # scripts/options_table.py

    app = (Path(__file__).resolve().parents[1] / "flower" / "pyproject.toml").read_text()
    assert options_table.flower_config() in app, "flower/pyproject.toml is stale: run scripts/options_table.py --write"
    declared = tomllib.loads(app)["tool"]["flwr"]["app"]["config"]
    cfg, opts = config_from_flower(declared)  # the declared defaults are a valid configuration: fedlora's defaults
    assert cfg.to_dict() == api.resolve_config(RunConfig(progress=False)).to_dict()
    assert opts.resume is None


def _own_data_file(tmp_path, labels: list[str], per_label: int = 12, extra_label: str | None = None):
    """A node's own CSV: ``per_label`` rows of each given label from the embedded dataset (+ one odd row)."""
    import csv

    import pyarrow.parquet as pq

    from fedlora.data import default_dataset_path

    table = pq.read_table(default_dataset_path(), columns=["text", "label"]).to_pylist()
    rows = [r for lab in labels for r in [x for x in table if x["label"] == lab][:per_label]]
    if extra_label is not None:
        rows.append({"text": "a row whose label the run does not have", "label": extra_label})
    path = tmp_path / "own.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path, len(rows)


def test_a_node_with_its_own_data_file_trains_on_it_and_declares_its_size(tiny_bert, tmp_path):
    """Node 0 holds its own file (two of the run's labels); node 1 its partition of the run's dataset. The server
    learns node 0's training-set size from its hello and validates its replies against it (a wrong count would
    reject them), and the node's engine holds exactly the file's rows."""
    from fedlora.flower import node as node_mod

    node_mod._SESSIONS.clear()
    rc = _run_config(tiny_bert, tmp_path, "own", clients=2, method="fedit")
    path, n = _own_data_file(tmp_path, list(DEFAULT_LABELS[:2]))
    sizes = []
    real = node_mod.NodeSession.hello

    def spy(self, cid):
        out = real(self, cid)
        sizes.append((cid, out["num_examples"], out["own_data"], len(self.engine.clients[cid].test)))
        return out

    node_mod.NodeSession.hello = spy
    try:
        run_in_process(rc, 2, node_extra={0: {"fedlora-data": str(path)}})
    finally:
        node_mod.NodeSession.hello = real
    own = [s for s in sizes if s[0] == 0]
    assert own and own[0][2] is True and own[0][1] + own[0][3] == n  # the whole file, split into train and test
    assert all(not s[2] for s in sizes if s[0] == 1)
    records = _metrics(tmp_path / "own")
    assert [r["accepted"] for r in records] == [2, 2], records


def test_a_node_file_with_a_label_outside_the_run_is_refused_by_name(tiny_bert, tmp_path):
    from fedlora.flower import node as node_mod
    from fedlora.flower.server import NodeError

    node_mod._SESSIONS.clear()
    rc = _run_config(tiny_bert, tmp_path, "bad", clients=2, method="fedit", **{"node-wait": 5})
    path, _ = _own_data_file(tmp_path, list(DEFAULT_LABELS[:2]), extra_label="verb.motion")
    with pytest.raises(NodeError, match="verb.motion"):
        run_in_process(rc, 2, node_extra={0: {"fedlora-data": str(path)}})


def test_a_node_pinned_to_another_model_refuses_the_run(tiny_bert, tmp_path):
    from fedlora.flower.server import NodeError

    rc = _run_config(tiny_bert, tmp_path, "pin", clients=2, method="fedit", **{"node-wait": 5})
    with pytest.raises(NodeError, match="serves model 'some/other-model' only"):
        run_in_process(rc, 2, node_extra={1: {"fedlora-model": "some/other-model"}})
