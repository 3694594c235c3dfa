"""FedDPA (METHODS.md §17): only the global adapter travels, each client keeps its own local adapter, the local step
leaves the global bit-identical (stop-gradient), the server averages uniformly, mixing weights sum to one; on a real
peft model: the stages train what they say, the saved personal adapters reproduce the client's logits, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import random_state, tiny_config

import fedlora.client.train as client_train
from fedlora import RunConfig, load_trained, resume, run
from fedlora.adapters import LoraLayout
from fedlora.api import build, resolve_config
from fedlora.federation.round import run_round
from fedlora.methods import ClientUpdate, OptionError, ServerState, TrainStats, build_method

STATS = TrainStats(steps=1, samples_seen=1, train_loss=0.0, lr=1e-3)
LOCAL = "local/"


def _initial(m, layout: LoraLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """What the engine's initial state looks like: the default adapter and a ``local/`` adapter with B = 0."""
    state = random_state(layout, gen)
    for spec in m.extra_layouts["local"].modules:
        state[spec.a_key] = torch.randn(spec.rank, spec.in_features, generator=gen)
        state[spec.b_key] = torch.zeros(spec.out_features, spec.rank)
    return state


def _trained(start: dict[str, torch.Tensor], keys, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``start`` with ``keys`` replaced by fresh values (what a client's training produced)."""
    out = dict(start)
    for k in keys:
        out[k] = torch.randn(start[k].shape, generator=gen)
    return out


@pytest.mark.invariant("feddpa")
def test_feddpa_global_travels_local_stays_and_server_averages_uniformly(layout, gen) -> None:
    a, w = 0.3, 0.8  # not 0.5, so that swapped weights show
    m = build_method("feddpa", layout, options={"local_weight": a, "inference_weight": w}, rounds=3)
    assert m.weighting == "uniform"
    local_keys = set(m.extra_layouts["local"].lora_keys)
    global_keys = set(layout.all_keys)
    assert local_keys and all(k.startswith(LOCAL) for k in local_keys) and not global_keys & local_keys
    initial = _initial(m, layout, gen)
    server = m.init_server(initial)
    assert set(server.adapter) == global_keys  # the server never holds a local adapter
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for rnd in range(3):
        ups = []
        for k, n in enumerate((10, 30, 60)):
            plan = m.plan(rnd, k, server)
            # down and up: the global adapter (A, B, heads) only
            assert set(plan.download) == global_keys and set(plan.upload) == global_keys
            for key in global_keys:
                assert torch.equal(plan.download[key], server.adapter[key])
            # stages: round 0 the global step alone; then the local step (local keys only, global stop-gradient)
            *local_stage, global_stage = plan.stages
            assert global_stage.train_keys == global_keys and dict(global_stage.adapter_weights) == {"": 1.0}
            if rnd == 0:
                assert local_stage == []
            else:
                (st,) = local_stage
                assert st.train_keys == local_keys
                assert dict(st.adapter_weights) == pytest.approx({"": 1 - a, "local": a})
            for st in plan.stages:
                assert sum(st.adapter_weights.values()) == pytest.approx(1.0)
            # start: the download and the client's OWN local adapter (initial one at its first participation)
            start = m.start_state(plan, initial, kept.get(k))
            for key in global_keys:
                assert torch.equal(start[key], server.adapter[key])
            for key in local_keys:
                assert torch.equal(start[key], kept[k][key] if k in kept else initial[key])
            # the local step changes only the local adapter; the global step only the global one
            after_local = _trained(start, local_keys if rnd else (), gen)
            for key in global_keys:
                assert torch.equal(after_local[key], plan.download[key])  # bit-identical to the download
            trained = _trained(after_local, global_keys, gen)
            upload, keep = m.finish(plan, trained, kept.get(k), STATS)
            assert set(upload) == global_keys and not any(key.startswith(LOCAL) for key in upload)
            assert set(keep) == local_keys
            for key in local_keys:
                assert torch.equal(keep[key], after_local[key])
            kept[k] = keep
            ups.append(ClientUpdate(k, upload, num_examples=n, samples_seen=2 * n))
        res = m.aggregate(rnd, server, ups)
        assert set(res.adapter) == global_keys
        for key in global_keys:  # uniform 1/K, A, B and heads separately, whatever the data sizes
            torch.testing.assert_close(res.adapter[key], sum(u.state[key] for u in ups) / 3)
        server = ServerState(round=rnd + 1, adapter=res.adapter)
    # one local adapter per client, never shared
    b = next(k for k in local_keys if k.endswith("lora_B.weight"))
    assert all(not torch.equal(kept[i][b], kept[j][b]) for i in range(3) for j in range(i + 1, 3))
    # inference: w on the global adapter (reference code), 1 - w on the local one; or the other way round
    assert dict(m.inference_weights(0)) == pytest.approx({"": w, "local": 1 - w})
    other = build_method("feddpa", layout, options={"inference_weight": w, "weight_on": "local"})
    assert dict(other.inference_weights(2)) == pytest.approx({"": 1 - w, "local": w})
    for meth in (m, other):
        assert sum(meth.inference_weights(1).values()) == pytest.approx(1.0)


def test_feddpa_schedules_and_options(layout) -> None:
    def local_rounds(rounds: int, **opts) -> list[int]:
        m = build_method("feddpa", layout, options=opts, rounds=rounds)
        server = m.init_server(_initial(m, layout, torch.Generator().manual_seed(0)))
        return [r for r in range(rounds) if len(m.plan(r, 0, server).stages) == 2]

    assert local_rounds(5) == [1, 2, 3, 4]  # FedDPA-T: from round 1, as the reference
    assert local_rounds(5, variant="sequential") == [4]  # FedDPA-F: local fine-tune in the last round
    assert local_rounds(1, variant="sequential") == [0]
    assert local_rounds(5, variant="sequential", local_from_round="2") == [2, 3, 4]
    assert local_rounds(3, local_from_round=0) == [0, 1, 2]
    m = build_method("feddpa", layout, options={"variant": "sequential"}, rounds=4)
    assert m.plan(3, 0, m.init_server(_initial(m, layout, torch.Generator()))).stages[0].train_keys == frozenset(
        m.extra_layouts["local"].lora_keys
    )
    with pytest.raises(OptionError, match="local_weight=0.0 must be > 0"):
        build_method("feddpa", layout, options={"local_weight": "0"})
    with pytest.raises(OptionError, match="allowed values: iterative, sequential"):
        build_method("feddpa", layout, options={"variant": "feddpa_t"})
    with pytest.raises(OptionError, match="inference_weight=1.5 must be <= 1"):
        build_method("feddpa", layout, options={"inference_weight": "1.5"})
    with pytest.raises(OptionError, match="allowed values: global, local"):
        build_method("feddpa", layout, options={"weight_on": "both"})
    d = build_method("feddpa", layout)
    assert d.extra_adapters == ("local",) and d.has_personal_state and d.has_global_model


def test_feddpa_local_init(layout, gen) -> None:
    shared = build_method("feddpa", layout)
    initial = _initial(shared, layout, gen)
    server = shared.init_server(initial)
    local_keys = shared.extra_layouts["local"].lora_keys
    for k in range(2):
        start = shared.start_state(shared.plan(1, k, server), initial, None)
        assert all(torch.equal(start[key], initial[key]) for key in local_keys)
    per = build_method("feddpa", layout, options={"local_init": "per_client"}, seed=3)
    starts = [per.start_state(per.plan(1, k, server), initial, None) for k in range(2)]
    again = per.start_state(per.plan(2, 0, server), initial, None)
    for spec in per.extra_layouts["local"].modules:
        assert not torch.equal(starts[0][spec.a_key], starts[1][spec.a_key])
        assert not torch.equal(starts[0][spec.a_key], initial[spec.a_key])
        assert torch.equal(again[spec.a_key], starts[0][spec.a_key])  # seeded by (run seed, client): resumable
        assert starts[0][spec.a_key].shape == initial[spec.a_key].shape
        assert torch.count_nonzero(starts[0][spec.b_key]) == 0
    # a client that has trained resumes from its own local adapter, not a new draw
    own = {key: torch.full_like(initial[key], 0.5) for key in local_keys}
    st = per.start_state(per.plan(1, 0, server), initial, own)
    assert all(torch.equal(st[key], own[key]) for key in local_keys)


# ------------------------------------------------------------------------------------------ real peft model
def _tiny(model: str, tmp_path, **kw) -> RunConfig:
    return tiny_config(
        model, tmp_path, **{"method": "feddpa", "rounds": 2, "max_examples_per_label": 20, "local_epochs": 1, **kw}
    )


@pytest.mark.invariant("feddpa")
def test_feddpa_stages_on_real_model(tiny_bert: str, tmp_path, monkeypatch) -> None:
    """In the engine: the local stage trains the local adapter alone on the (1-a, a) mix and leaves the global bit-
    identical to the download; the global stage trains the global alone; only the global travels; each client
    starts from its own kept local adapter."""
    a = 0.3
    setup = build(resolve_config(_tiny(tiny_bert, tmp_path, method_options={"local_weight": a})))
    engine, method = setup.engine, setup.method
    slots = engine.slots
    local_keys = set(method.extra_layouts["local"].lora_keys)
    global_keys = set(setup.layout.all_keys)
    assert set(slots.params) == local_keys | global_keys
    layer, _ = slots.layers[setup.layout.modules[0].name]
    s = setup.layout.modules[0].scaling()

    passes: list[dict] = []
    original = client_train.train_local

    def spy(model, params, *args, **kwargs):
        before = slots.read()
        scaling = dict(layer.scaling)
        active = sorted(layer.active_adapters)
        trainable = {k for k, p in slots.params.items() if p.requires_grad}
        out = original(model, params, *args, **kwargs)
        passes.append(dict(before=before, after=slots.read(), scaling=scaling, active=active, trainable=trainable))
        return out

    monkeypatch.setattr(client_train, "train_local", spy)
    plans, replies = [], []
    original_train = engine.train

    def spy_train(ps):
        plans.extend(ps)
        out = original_train(ps)
        replies.extend(out)
        return out

    engine.train = spy_train  # type: ignore[method-assign]
    server = method.init_server(engine.initial)
    server, _ = run_round(0, method, server, engine, clients=[0, 1, 2, 3])
    assert len(passes) == 4  # round 0: the global step only
    kept0 = {cid: dict(engine.personal[cid]) for cid in range(4)}
    for cid in range(4):  # untrained in round 0: the initial local adapter
        assert all(torch.equal(kept0[cid][k], engine.initial[k]) for k in local_keys)
    passes.clear()
    plans.clear()
    replies.clear()
    server, report = run_round(1, method, server, engine, clients=[0, 1, 2, 3])
    assert len(report.accepted) == 4 and len(passes) == 8
    for i, plan in enumerate(plans):
        local_pass, global_pass = passes[2 * i], passes[2 * i + 1]
        # the client started from the download and from its own kept local adapter
        assert all(torch.equal(local_pass["before"][k], plan.download[k]) for k in global_keys)
        assert all(torch.equal(local_pass["before"][k], kept0[plan.client_id][k]) for k in local_keys)
        # local stage: only local tensors trainable, both adapters active, scales s(1-a) and s·a
        assert local_pass["trainable"] == local_keys
        assert local_pass["active"] == ["default", "local"]
        assert local_pass["scaling"]["default"] == pytest.approx(s * (1 - a))
        assert local_pass["scaling"]["local"] == pytest.approx(s * a)
        for k in global_keys:  # stop-gradient: the global is bit-identical to the download after the local step
            assert torch.equal(local_pass["after"][k], plan.download[k]), k
        assert any(not torch.equal(local_pass["after"][k], local_pass["before"][k]) for k in local_keys)
        # global stage: the global alone, from the download; the local adapter does not move
        assert global_pass["trainable"] == global_keys
        assert global_pass["active"] == ["default"] and global_pass["scaling"]["default"] == pytest.approx(s)
        for k in local_keys:
            assert torch.equal(global_pass["after"][k], local_pass["after"][k])
        assert any(not torch.equal(global_pass["after"][k], plan.download[k]) for k in global_keys)
        # only the global adapter travelled; the client keeps what its local stage produced
        reply = replies[i]
        assert set(reply.state) == global_keys
        for k in global_keys:
            assert torch.equal(reply.state[k], global_pass["after"][k])
        for k in local_keys:
            assert torch.equal(engine.personal[plan.client_id][k], local_pass["after"][k])
    b = next(k for k in local_keys if k.endswith("lora_B.weight"))
    bs = [engine.personal[c][b] for c in range(4)]
    assert all(not torch.equal(bs[i], bs[j]) for i in range(4) for j in range(i + 1, 4))
    # round 2 with two clients: each starts from the local adapter it trained in round 1; the others keep theirs
    kept1 = {cid: dict(engine.personal[cid]) for cid in range(4)}
    passes.clear()
    plans.clear()
    run_round(2, method, server, engine, clients=[1, 3])
    assert [p.client_id for p in plans] == [1, 3] and len(passes) == 4
    for i, cid in enumerate((1, 3)):
        assert all(torch.equal(passes[2 * i]["before"][k], kept1[cid][k]) for k in local_keys)
        assert any(not torch.equal(engine.personal[cid][k], kept1[cid][k]) for k in local_keys)
    for cid in (0, 2):
        assert all(torch.equal(engine.personal[cid][k], kept1[cid][k]) for k in local_keys)


def _inputs(setup, data):
    batch = setup.task.collate(data, list(range(min(16, len(data)))), setup.pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_feddpa_saved_personal_adapters_reproduce_client_logits(tiny_bert: str, tmp_path) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSequenceClassification

    opts = {"inference_weight": 0.7}  # unequal shares, so swapped saved scales would show
    result = run(_tiny(tiny_bert, tmp_path, method_options=opts, run_name="dpa"))
    client_dir = result.run_dir / "personal" / "client-0"
    assert (client_dir / "adapter_model.safetensors").is_file()
    assert (client_dir / "local" / "adapter_model.safetensors").is_file()
    setup = build(resolve_config(result.config))
    engine = setup.engine
    server = ServerState(round=result.config.rounds, adapter=result.global_adapter)
    engine.restore(server, result.personal, {})
    setup.model.eval()
    inputs = _inputs(setup, engine.clients[0].test)
    with torch.no_grad():
        engine.load_client_model(0, server)
        ours = setup.model(**inputs).logits
        engine.slots.load(result.global_adapter)
        engine.slots.reset_scales()
        global_only = setup.model(**inputs).logits
    assert (ours - global_only).abs().max() > 1e-3  # the local adapter matters

    loaded, _ = load_trained(result.run_dir, "personal/client-0")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours, rtol=1e-5, atol=1e-5)

    # plain peft: the default adapter, then "local" from its subfolder, both active on every LoRA layer
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=8, ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, str(client_dir))
    peft_model.load_adapter(str(client_dir / "local"), adapter_name="local")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(["default", "local"])
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, ours, rtol=1e-5, atol=1e-5)


def test_feddpa_per_client_resume_is_bit_identical(tiny_bert: str, tmp_path) -> None:
    """The registry-wide resume test covers the defaults; this one the per-client local draw with partial
    participation (a client first drawn in the round that is cut)."""
    opts = {"local_init": "per_client"}
    # seed 2 samples clients [1, 2], [1, 3], [0, 3]: client 0 draws its local adapter in round 2, client 3 resumes
    # the one it trained in round 1, client 1 keeps its own while absent
    cfg = _tiny(tiny_bert, tmp_path, rounds=3, run_name="full", method_options=opts, clients_per_round=2, seed=2)
    cfg = cfg.replace(local_steps=3, batch_size=8)
    full = run(cfg)
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "round-0003")
    for name in ("adapter", "personal"):
        shutil.rmtree(cut / name, ignore_errors=True)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    resumed = resume(cut, progress=False)
    for key, value in full.global_adapter.items():
        assert torch.equal(resumed.global_adapter[key], value), key
    assert full.personal.keys() == resumed.personal.keys() == {0, 1, 2, 3}
    for cid, st in full.personal.items():
        assert any(k.startswith(LOCAL) for k in st)
        for key, value in st.items():
            assert torch.equal(resumed.personal[cid][key], value), (cid, key)
    assert resumed.history[2] == {**full.history[2], "seconds": resumed.history[2]["seconds"]}
