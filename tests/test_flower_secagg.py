"""Secure aggregation with Flower's SecAgg+ on fedlora's Flower path: in process (the same ServerApp and ClientApp
functions, messages and records as a deployment, with Flower's own SecAggPlusWorkflow and secaggplus_mod), and the
round logic's secure path without a model."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import flower_run_config, random_state, read_metrics
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from fedlora import api  # noqa: E402
from fedlora.config import ConfigError, RunConfig  # noqa: E402
from fedlora.federation import RunStalled  # noqa: E402
from fedlora.federation.round import RoundPolicy, SecureAggregate, SecureShare, run_round  # noqa: E402
from fedlora.flower import secagg  # noqa: E402
from fedlora.flower.app import config_from_flower  # noqa: E402
from fedlora.flower.inprocess import run_in_process  # noqa: E402
from fedlora.flower.wire import ClientFailed, pack_error, pack_reply  # noqa: E402
from fedlora.methods import ClientUpdate, build_method  # noqa: E402
from fedlora.methods.base import ModuleRank  # noqa: E402

C, Q = secagg.SECAGG_DEFAULTS["secagg-clipping-range"], secagg.SECAGG_DEFAULTS["secagg-quantization-range"]


def _run_config(model: str, out, name: str, **kw) -> dict:
    return flower_run_config(model, out, name, **{"rounds": 1, "max-examples-per-label": 20, **kw})


_metrics = read_metrics


def _spy_strategies(monkeypatch) -> list:
    made = []
    real = secagg.make_strategy

    def make(fitins):
        made.append(real(fitins))
        return made[-1]

    monkeypatch.setattr(secagg, "make_strategy", make)
    return made


# ------------------------------------------------------------------------------------------------ in process
def test_a_secure_fedit_round_is_the_weighted_mean_within_the_quantisation_bound(tiny_bert, tmp_path, monkeypatch):
    strategies = _spy_strategies(monkeypatch)
    rc = _run_config(tiny_bert, tmp_path, "secure", method="fedit")
    grid = run_in_process({**rc, "secure-aggregation": True}, 3)
    plain = api.run(RunConfig.from_dict({**rc, "run-name": "plain", "progress": False}))
    (s,), (p,) = _metrics(tmp_path / "secure"), _metrics(plain.run_dir)
    assert s["accepted"] == p["accepted"] == 3 and s["rejected"] == {}
    # After one round the global adapter IS the aggregate: the plain run's weighted mean Σ p_k x_k in float32, the
    # secure run's the mean SecAgg+ unmasks. Client k sends x_k·dq_k (dq_k = round(w_k/W·Q)/Q, W = the largest
    # weight, so dq_k <= 1 and |x_k·dq_k| <= c) stochastically rounded to a step of 2c/Q: an error below 2c/Q. The
    # unmasked sum is divided by Σ dq_k >= 1 (the largest client takes part): at most K·2c/Q per coordinate. Rounding
    # each weight to 1/Q moves the mean by at most 2·max|x|·K/(2Q·Σ dq) <= K·c/Q more. Bound: 3·K·c/Q (+ float32).
    tol = 3 * 3 * C / Q + 1e-6  # 1.8e-5
    fa = load_file(tmp_path / "secure" / "adapter" / "adapter_model.safetensors")
    la = load_file(plain.run_dir / "adapter" / "adapter_model.safetensors")
    assert set(fa) == set(la)
    worst = max(float((fa[k] - la[k]).abs().max()) for k in fa)
    print(f"largest |secure - plain| after one round: {worst:.3g} (bound {tol:.3g})")
    assert worst <= tol
    assert abs(s["global_loss"] - p["global_loss"]) < 1e-4
    # what the server held: the shim strategy was handed one parameter set, the mean, and nothing else ...
    assert len(strategies) == 1 and len(strategies[0].seen) == 1
    # ... and no reply that reached the server carried a tensor: SecAgg+ replies hold masked integers in config
    # records and, in the clear, only each client's weight and counts
    train = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train) == 4 * 3  # four protocol stages, three nodes
    assert all(not any(len(r) for r in m.content.array_records.values()) for m in train)
    assert all("fedlora" not in m.content.config_records for m in train)
    fitres = [m.content.config_records["fitres.metrics"] for m in train if "fitres.metrics" in m.content.config_records]
    assert len(fitres) == 3 and all(set(r) == {"num_examples", "samples_seen"} for r in fitres)


def test_a_secure_fedsa_lora_run_keeps_personal_state_on_the_nodes(tiny_bert, tmp_path):
    rc = _run_config(tiny_bert, tmp_path, "secure", method="fedsa_lora", rounds=2)
    grid = run_in_process({**rc, "secure-aggregation": True}, 3)
    plain = api.run(RunConfig.from_dict({**rc, "run-name": "plain", "progress": False}))
    a, b = _metrics(tmp_path / "secure"), _metrics(plain.run_dir)
    for x, y in zip(a, b, strict=True):
        assert x["accepted"] == y["accepted"] == 3
        # round 2's personal models start from each node's own B of round 1, kept only because the server accepted
        # it (commit protocol); the shared A differs from the plain run's by the quantisation error alone
        assert abs(x["personal_loss"] - y["personal_loss"]) < 1e-3
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-3  # travels inside the secure sum, scaled into range
    # only A (8 x 64 per module) travels: B (64 x 8, personal) never leaves a node. Each masked vector is the weight
    # factor, the four A matrices and the loss
    masked = [
        [bytes_to_ndarray(b).shape for b in m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        for m in grid.received
        if Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == 2 * 3 and all(shapes == [(1,)] + [(8, 64)] * 4 + [(1,)] for shapes in masked)


def test_a_node_that_drops_mid_protocol_is_rejected_and_the_run_goes_on(tiny_bert, tmp_path):
    def fail(node: int, msg) -> str | None:
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if msg.metadata.group_id == "1" and node == 1 and stage == "collect_masked_vectors":
            return "SuperNode lost"  # after sharing its keys: its masks are rebuilt from the others' shares
        if msg.metadata.group_id == "2" and node in (2, 3) and stage == "setup":
            return "silent"  # two of three gone: fewer than the threshold (2) remain, SecAgg+ halts
        return None

    rc = _run_config(tiny_bert, tmp_path, "flaky", method="fedit", rounds=2)
    run_in_process({**rc, "secure-aggregation": True, "reply-timeout": 1.0}, 3, fail=fail)
    m = _metrics(tmp_path / "flaky")
    assert len(m) == 2
    assert m[0]["accepted"] == 2 and set(m[0]["rejected"]) == {"0"} and "SuperNode lost" in m[0]["rejected"]["0"]
    assert m[1]["accepted"] == 0 and set(m[1]["rejected"]) == {"0", "1", "2"}
    assert all("halted" in why for why in m[1]["rejected"].values())
    assert "no reply" in m[1]["rejected"]["1"]


def test_a_value_beyond_the_clipping_range_is_refused_by_its_node(tiny_bert, tmp_path):
    rc = _run_config(tiny_bert, tmp_path, "clipped", method="fedit")
    with pytest.raises(RunStalled):  # its only round accepted nobody
        run_in_process({**rc, "secure-aggregation": True, "secagg-clipping-range": 0.05}, 3)
    (m,) = _metrics(tmp_path / "clipped")
    assert m["accepted"] == 0 and set(m["rejected"]) == {"0", "1", "2"}
    assert all("secagg-clipping-range=0.05" in why for why in m["rejected"].values())


# ------------------------------------------------------------------------------------------------ node side
def _reply_blob(values: dict[str, torch.Tensor], n: int = 30, seen: int = 60, loss: float = 0.7) -> bytes:
    upd = ClientUpdate(4, values, n, seen, {"train_loss": loss}, {"m": ModuleRank(2, 1.0)})
    return pack_reply(upd)


@pytest.mark.parametrize(("weighting", "weight"), [("num_examples", 30), ("samples_seen", 60), ("uniform", 1)])
def test_a_node_answers_in_the_legacy_fitres_format_secaggplus_mod_expects(weighting, weight):
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    values = {"b.lora_B": torch.full((3, 2), -0.5), "a.lora_A": torch.arange(6.0).reshape(2, 3) / 10}
    settings = {secagg.WEIGHTING_KEY: weighting, secagg.CLIP_KEY: 8.0, secagg.MAX_WEIGHT_KEY: 100.0}
    res = recorddict_to_fitres(secagg.fitres_content(_reply_blob(values), 4, settings), keep_input=True)
    arrays = parameters_to_ndarrays(res.parameters)
    assert res.num_examples == weight and res.metrics == {"num_examples": 30, "samples_seen": 60}
    assert len(arrays) == 3  # the travelling tensors sorted by key, then the loss
    np.testing.assert_array_equal(arrays[0], values["a.lora_A"].numpy())
    np.testing.assert_array_equal(arrays[1], values["b.lora_B"].numpy())
    assert float(arrays[2][0]) * secagg.LOSS_CAP / 8.0 == pytest.approx(0.7)


def test_a_node_refuses_to_send_what_secaggplus_would_clip_or_overweigh():
    settings = {secagg.WEIGHTING_KEY: "num_examples", secagg.CLIP_KEY: 8.0, secagg.MAX_WEIGHT_KEY: 100.0}
    with pytest.raises(ValueError, match=r"fedlora client 4: k .*9\.5.*secagg-clipping-range=8"):
        secagg.fitres_content(_reply_blob({"k": torch.tensor([1.0, -9.5])}), 4, settings)
    with pytest.raises(ValueError, match="weight 300 exceeds the round's max_weight 100"):
        secagg.fitres_content(_reply_blob({"k": torch.zeros(2)}, n=300), 4, settings)
    with pytest.raises(RuntimeError, match="fedlora client 4: ClientFailed: dropped"):
        secagg.fitres_content(pack_error(ClientFailed("dropped")), 4, settings)


def test_the_forwarding_client_app_handles_secaggplus_rounds_without_torch():
    code = """
import struct, sys, json
import numpy as np
from safetensors.numpy import save
from fedlora.flower import app, secagg
header = json.dumps({"kind": "reply", "num_examples": 3, "samples_seen": 3, "metrics": {}}).encode()
blob = struct.pack("<Q", len(header)) + header + save({"k": np.ones(2, dtype=np.float32)})
s = {secagg.WEIGHTING_KEY: "uniform", secagg.CLIP_KEY: 8.0, secagg.MAX_WEIGHT_KEY: 1.0}
secagg.fitres_content(blob, 0, s)
app.reply_timeout_of({})
assert "torch" not in sys.modules, "torch was imported"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"method": "flexlora"}, r"flexlora cannot use secure-aggregation: .*Use one of: .*fedit"),
        ({"method": "fedex_lora"}, r"fedex_lora cannot use secure-aggregation"),
        ({"method": "scaffold"}, r"scaffold cannot use secure-aggregation"),
        ({"aggregator": "median"}, r"aggregator='median' with secure-aggregation"),
        ({"dp-clip": 1.0, "dp-noise": 1.0}, r"dp-noise-at='server' with secure-aggregation.*dp-noise-at='client'"),
        ({"upload-codec": "int8"}, r"upload-codec='int8' with secure-aggregation"),
        ({"clients-per-round": 1}, r"at least 2 clients per round"),
        (
            {"clients-per-round": 3, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 4},
            r"every round would halt",
        ),
        ({"secagg-num-shares": 2}, r"secagg-num-shares=2: an integer must be >= 3"),
        ({"secagg-num-shares": 1.5}, r"secagg-num-shares=1.5: a float must be in \(0, 1\]"),
        (
            {"secagg-reconstruction-threshold": 3},
            r"secagg-reconstruction-threshold=3 must be below secagg-num-shares=3",
        ),
        ({"secagg-clipping-range": 0.0}, r"secagg-clipping-range=0.0 must be a finite number > 0"),
        ({"secagg-quantization-range": 2**31}, r"times the range must stay below 2\*\*32"),
        ({"secure-aggregation": "maybe"}, r"secure-aggregation='maybe' must be true or false"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_do_by_name(extra, match):
    with pytest.raises(ConfigError, match=match):
        config_from_flower({"clients": 8, "secure-aggregation": True, **extra})


def test_secure_aggregation_options_and_the_methods_it_fits():
    _, opts = config_from_flower({"method": "fedsa_lora", "secure-aggregation": True, "secagg-num-shares": 0.5})
    assert opts.secagg == secagg.SecAggSettings(num_shares=0.5)
    assert config_from_flower({"method": "flexlora"})[1].secagg is None  # off by default: every method runs
    from fedlora.privacy.user_level import averaging_methods

    fits = averaging_methods()
    assert {"fedit", "fedsa_lora", "ffa_lora", "fedadam", "rolora"} <= set(fits)
    assert not {"flexlora", "fedex_lora", "flora", "hetlora", "fl_tac", "scaffold"} & set(fits)
    # the workflow's own rules: 5 shares of a round of 8 → each client's 5 neighbours, threshold 3 of them
    assert secagg.SecAggSettings(num_shares=5, reconstruction_threshold=3).neighbourhood(8) == (5, 3)
    assert secagg.SecAggSettings(num_shares=1.0, reconstruction_threshold=0.5).neighbourhood(4) == (4, 2)


# ------------------------------------------------------------------------------------------------ round logic
class SecureFake:
    """A runtime that aggregates securely: it computes Σ w_k x_k / Σ w_k itself and hands out only that."""

    secure_aggregation = True

    def __init__(self, layout, gen, sizes, *, weight_of=None, counts_of=None):
        self.layout, self.gen, self.sizes = layout, gen, sizes
        self.weight_of = weight_of or (lambda cid, n: n)
        self.counts_of = counts_of or (lambda cid, n: n)
        self.uploads: dict[int, dict[str, torch.Tensor]] = {}
        self.max_weights, self.accepted = [], []

    def train(self, plans):
        raise AssertionError("a securely aggregated round never asks for individual replies")

    def train_secure(self, plans, *, max_weight):
        self.max_weights.append(max_weight)
        for p in plans:
            st = random_state(self.layout, self.gen)
            self.uploads[p.client_id] = {k: st[k] for k in p.upload}
        w = {p.client_id: self.weight_of(p.client_id, self.sizes[p.client_id]) for p in plans}
        total = sum(w.values())
        keys = plans[0].upload
        mean = {k: sum(w[c] * self.uploads[c][k] for c in w) / total for k in keys}
        shares = {c: SecureShare(w[c], self.counts_of(c, self.sizes[c]), self.sizes[c]) for c in w}
        return SecureAggregate(mean, shares, {}, train_loss=0.25, bytes_up=123)

    def accept(self, ids):
        self.accepted.append(list(ids))

    def evaluate(self, server):
        return {}


def _secure_round(layout, gen, runtime, method="fedit"):
    m = build_method(method, layout)
    server = m.init_server(random_state(layout, gen))
    policy = RoundPolicy(client_examples=runtime.sizes, max_samples_per_stage=runtime.sizes)
    seen = []
    real = m.aggregate
    m.aggregate = lambda rnd, srv, updates: seen.append(list(updates)) or real(rnd, srv, updates)
    new, report = run_round(0, m, server, runtime, clients=sorted(runtime.sizes), policy=policy)
    return m, server, new, report, seen


def test_the_method_aggregates_the_secure_mean_as_one_update_with_its_own_result(layout, gen):
    rt = SecureFake(layout, gen, {0: 10, 1: 30, 2: 60})
    m, server, new, report, seen = _secure_round(layout, gen, rt)
    assert len(seen) == 1 and len(seen[0]) == 1  # one update: the weighted mean
    plain = [ClientUpdate(c, rt.uploads[c], n, n, ranks=seen[0][0].ranks) for c, n in rt.sizes.items()]
    want = m.aggregate(0, server, plain).adapter  # the method's own aggregate of the individual uploads
    for k in want:
        torch.testing.assert_close(new.adapter[k], want[k])
    assert rt.max_weights == [60.0]  # the largest weight a sampled client can claim (its training-set size)
    assert report.accepted == [0, 1, 2] and rt.accepted == [[0, 1, 2]] and report.rejected == {}
    assert report.bytes_up == 123 and report.train_loss == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("fake", "match"),
    [
        ({"weight_of": lambda cid, n: 1}, r"weight in the secure mean is 1, but its num_examples weight is 10"),
        ({"counts_of": lambda cid, n: 10 * n if cid == 1 else n}, r"num_examples=300, but client 1 holds 30"),
    ],
)
def test_a_secure_round_whose_weights_or_counts_do_not_check_out_is_discarded(layout, gen, fake, match):
    rt = SecureFake(layout, gen, {0: 10, 1: 30, 2: 60}, **fake)
    _, server, new, report, seen = _secure_round(layout, gen, rt)
    assert seen == [] and report.accepted == [] and set(report.rejected) == {0, 1, 2}
    assert any(re.search(match, why) for why in report.rejected.values()), report.rejected
    assert all(torch.equal(new.adapter[k], server.adapter[k]) for k in server.adapter)


def test_the_secure_path_is_found_through_a_wrapping_runtime_and_refuses_server_noise(layout, gen):
    from fedlora.federation.round import secure_runtime
    from fedlora.privacy import UserLevelDP

    rt = SecureFake(layout, gen, {0: 10, 1: 30, 2: 60})

    class Wrapper:  # as the DP-SGD accountant wraps a runtime
        runtime = rt

    assert secure_runtime(Wrapper()) is rt and secure_runtime(object()) is None
    m = build_method("fedit", layout)
    with pytest.raises(RuntimeError, match="server-side DP clips each client's update"):
        run_round(
            0, m, m.init_server(random_state(layout, gen)), rt, clients=[0, 1, 2], privacy=UserLevelDP(1.0, 1.0, 3)
        )


def test_a_weight_the_method_would_cap_is_reported_not_silently_changed(layout, gen):
    rt = SecureFake(layout, gen, {0: 1, 1: 1, 2: 1, 3: 100})  # client 3: 97% of the weight, cap 3/4
    m, server, new, report, seen = _secure_round(layout, gen, rt)
    assert report.metrics["secagg_uncapped"] == 1.0 and report.accepted == [0, 1, 2, 3]
    plain = [ClientUpdate(c, rt.uploads[c], n, n, ranks=seen[0][0].ranks) for c, n in rt.sizes.items()]
    capped = m.aggregate(0, server, plain).adapter  # what the plain path computes, with the cap
    k = layout.a_keys[0]
    assert not torch.allclose(new.adapter[k], capped[k])  # SecAgg+ weighed by the raw counts
