"""Bounded client influence: the weight cap (water-filling) and the robust aggregators, on hand-built tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import HEAD, pretrained_weights, random_state

from fedlora.adapters.state import coordinate_median, parse_aggregator, trimmed_count, trimmed_mean
from fedlora.config import ConfigError, RunConfig
from fedlora.methods import ClientUpdate, build_method, get_method_class, method_ids
from fedlora.methods.base import DEFAULT_MAX_WEIGHT_RATIO, cap_weights

ROBUST = ("median", "trimmed_mean:0.2")


# ---------------------------------------------------------------------------------------------- weight cap
@pytest.mark.parametrize(
    ("weights", "ratio", "want"),
    [
        # cap 1.5/4 = 0.375: 0.5 is clipped, its excess 0.125 goes to the others in proportion (3:1:1)
        ([0.5, 0.3, 0.1, 0.1], 1.5, [0.375, 0.375, 0.125, 0.125]),
        # cap 0.4: clipping 0.6 lifts 0.3 to 0.45 > 0.4, so a second pass clips it too and the two small ones share
        # the rest (a single clip-and-redistribute pass would leave 0.45)
        ([0.6, 0.3, 0.05, 0.05], 1.6, [0.4, 0.4, 0.1, 0.1]),
        # ratio 1: everything uniform
        ([0.7, 0.2, 0.1], 1.0, [1 / 3, 1 / 3, 1 / 3]),
        # one client of eight claims almost everything: it gets exactly 3/8, the others share 5/8 equally
        ([1 - 7e-12] + [1e-12] * 7, 3.0, [3 / 8] + [5 / 56] * 7),
    ],
)
def test_water_filling_by_hand(weights: list[float], ratio: float, want: list[float]) -> None:
    got = cap_weights(weights, ratio)
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(got) == pytest.approx(1.0, abs=1e-12)


def test_water_filling_properties_on_random_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        k = 1 + trial % 12
        raw = torch.rand(k, generator=gen, dtype=torch.float64) ** 4  # skewed
        p = (raw / raw.sum()).tolist()
        ratio = 1.0 + 3.0 * float(torch.rand(1, generator=gen))
        q = cap_weights(p, ratio)
        assert sum(q) == pytest.approx(1.0, abs=1e-12)
        assert max(q) <= ratio / k + 1e-12  # the cap holds
        for i in range(k):  # order preserved (ties stay ties)
            for j in range(k):
                if p[i] > p[j]:
                    assert q[i] >= q[j] - 1e-15
        if max(p) <= ratio / k:
            assert q == p  # no-op under the cap, bit for bit
        else:
            # only weights at the cap changed downwards; the others rose in proportion
            free = [i for i in range(k) if q[i] < ratio / k - 1e-12]
            if len(free) >= 2:
                a, b = free[0], free[1]
                assert q[a] * p[b] == pytest.approx(q[b] * p[a], rel=1e-9)


def test_water_filling_edges() -> None:
    assert cap_weights([0.9, 0.1], None) == [0.9, 0.1]
    assert cap_weights([1.0], 1.0) == [1.0]
    assert cap_weights([0.25, 0.25, 0.25, 0.25], 1.0) == [0.25] * 4
    with pytest.raises(ValueError, match="max_weight_ratio=0.5 must be a finite number >= 1"):
        cap_weights([0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="max_weight_ratio=inf"):
        cap_weights([0.5, 0.5], float("inf"))


def test_default_cap_leaves_an_honest_dirichlet_split_alone() -> None:
    # training-set sizes of prepare_federated_data("default", num_clients=8, partition="dirichlet:0.5",
    # labels=DEFAULT_LABELS, max_examples_per_label=300, seed=0): largest share 352/1729 = 1.63 x 1/8
    sizes = [352, 109, 123, 278, 169, 172, 332, 194]
    p = [n / sum(sizes) for n in sizes]
    assert cap_weights(p, DEFAULT_MAX_WEIGHT_RATIO) == p
    # a tighter cap would move mass there: 1.5 x 1/8 takes the top client's excess
    assert cap_weights(p, 1.5) != p


def test_method_weights_are_capped(layout, gen) -> None:
    ups = [ClientUpdate(k, random_state(layout, gen), num_examples=10, samples_seen=10) for k in range(8)]
    ups[3] = dataclasses.replace(ups[3], num_examples=10**12)  # a client claiming 1e12 examples
    m = build_method("fedit", layout)
    assert m.weights(ups) == pytest.approx([5 / 56] * 3 + [3 / 8] + [5 / 56] * 4)
    assert build_method("fedit", layout, max_weight_ratio=None).weights(ups)[3] == pytest.approx(1.0)
    # every method's aggregate uses the capped weights: the liar moves the head by 3/8 of its value, not all of it
    server = m.init_server(random_state(layout, gen))
    got = m.aggregate(0, server, ups).adapter[HEAD]
    want = sum(w * u.state[HEAD] for w, u in zip(m.weights(ups), ups, strict=True))
    torch.testing.assert_close(got, want)


def test_hetlora_norm_weights_are_capped(layout, gen) -> None:
    ups = [ClientUpdate(k, random_state(layout, gen), num_examples=10, samples_seen=10) for k in range(8)]
    big = dict(ups[5].state)
    spec = layout.modules[0]
    big[spec.b_key] = big[spec.b_key] * 1e6  # a product a million times the others'
    ups[5] = dataclasses.replace(ups[5], state=big)
    m = build_method("hetlora", layout, num_clients=8)
    w = m.norm_weights(spec, ups)
    assert w[5] == pytest.approx(3 / 8) and sum(w) == pytest.approx(1.0)
    w_free = build_method("hetlora", layout, num_clients=8, max_weight_ratio=None).norm_weights(spec, ups)
    assert w_free[5] > 0.999


# ---------------------------------------------------------------------------------------------- robust reductions
def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_median_and_trimmed_mean_by_hand() -> None:
    # five clients, two coordinates
    xs = [_t(1.0, -3.0), _t(7.0, 0.0), _t(2.0, 5.0), _t(-4.0, 1.0), _t(100.0, 2.0)]
    torch.testing.assert_close(coordinate_median(xs), _t(2.0, 1.0))
    # beta 0.2 of 5: ceil(1.0) = 1 dropped at each end -> mean of the middle three
    torch.testing.assert_close(trimmed_mean(xs, 0.2), _t((1 + 7 + 2) / 3, (0 + 1 + 2) / 3))
    # four clients: the median is the mean of the two middle values, not torch's lower median
    ys = [_t(1.0), _t(10.0), _t(4.0), _t(2.0)]
    torch.testing.assert_close(coordinate_median(ys), _t(3.0))
    # beta 0.1 of 8: ceil(0.8) = 1 at each end; beta 0.25: ceil(2.0) = 2 (no float round-up to 3)
    zs = [_t(float(v)) for v in (5, 1, 8, 3, 2, 7, 4, 6)]
    torch.testing.assert_close(trimmed_mean(zs, 0.1), _t((2 + 3 + 4 + 5 + 6 + 7) / 6))
    torch.testing.assert_close(trimmed_mean(zs, 0.25), _t((3 + 4 + 5 + 6) / 4))
    assert (trimmed_count(8, 0.1), trimmed_count(8, 0.25), trimmed_count(10, 0.1)) == (1, 2, 1)
    assert trimmed_count(25, 0.28) == 7  # 0.28 * 25 is 7.000000000000001 in floating point
    # beta 0.45 of 4 would drop 2 + 2: clamped to 1 at each end, i.e. the median
    torch.testing.assert_close(trimmed_mean(ys, 0.45), coordinate_median(ys))
    assert trimmed_count(2, 0.3) == 0 and trimmed_count(1, 0.4) == 0
    # the order of the clients does not matter; the input dtype is kept (float32 inside)
    torch.testing.assert_close(coordinate_median(xs[::-1]), coordinate_median(xs))
    half = [x.half() for x in xs]
    assert coordinate_median(half).dtype == torch.float16 and trimmed_mean(half, 0.2).dtype == torch.float16


def test_parse_aggregator() -> None:
    assert parse_aggregator("mean") == ("mean", 0.0)
    assert parse_aggregator("median") == ("median", 0.0)
    assert parse_aggregator("trimmed_mean:0.1") == ("trimmed_mean", 0.1)
    for bad, msg in [
        ("trimmed_mean", "needs the trimmed fraction beta"),
        ("trimmed_mean:0.5", "beta=0.5 is outside 0 < beta < 0.5"),
        ("trimmed_mean:0", "outside 0 < beta < 0.5"),
        ("trimmed_mean:nan", "outside 0 < beta < 0.5"),
        ("trimmed_mean:a", "beta='a' is not a number"),
        ("krum", "aggregator='krum' is unknown; allowed: mean, median, trimmed_mean:<beta>"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_aggregator(bad)


@pytest.mark.parametrize("aggregator", ROBUST)
def test_one_huge_outlier_among_eight_barely_moves_robust_aggregates(layout, gen, aggregator: str) -> None:
    """Honest clients hold values in [-1, 1]; one holds 1e6 everywhere and claims 1e12 examples. The robust
    aggregate stays inside the honest clients' range (so it moves by less than their spread, 2, from the honest-only
    aggregate); the mean moves by about 3/8·1e6 even with the cap, and by about 1e6 without it."""
    honest = [
        ClientUpdate(
            k, {key: torch.rand(v.shape, generator=gen) * 2 - 1 for key, v in random_state(layout, gen).items()}, 10, 10
        )
        for k in range(7)
    ]
    liar = ClientUpdate(7, {key: torch.full_like(v, 1e6) for key, v in honest[0].state.items()}, 10**12, 10)
    ups = [*honest, liar]
    server = build_method("fedit", layout).init_server(random_state(layout, gen))
    robust = build_method("fedit", layout, aggregator=aggregator)
    got = robust.aggregate(0, server, ups).adapter
    alone = robust.aggregate(0, server, honest).adapter
    mean = build_method("fedit", layout).aggregate(0, server, ups).adapter
    uncapped = build_method("fedit", layout, max_weight_ratio=None).aggregate(0, server, ups).adapter
    for key in layout.all_keys:
        lo = torch.stack([u.state[key] for u in honest]).amin(0)
        hi = torch.stack([u.state[key] for u in honest]).amax(0)
        assert bool(((got[key] >= lo) & (got[key] <= hi)).all()), key
        assert float((got[key] - alone[key]).abs().max()) < 2.0
        assert float((mean[key] - alone[key]).abs().min()) > 3 / 8 * 1e6 - 2
        assert float((uncapped[key] - alone[key]).abs().min()) > 0.99e6
    # robust aggregates ignore the client weights: the claimed counts change nothing
    even = [dataclasses.replace(u, num_examples=10) for u in ups]
    for key in layout.all_keys:
        assert torch.equal(robust.aggregate(0, server, even).adapter[key], got[key])


# ---------------------------------------------------------------------------------------------- the registry
def _bounded_round(name: str, layout, gen, aggregator: str) -> None:
    """One aggregation of 7 honest replies (within 0.1 of what the plan sent) and one reply 1e6 away: everything
    the server publishes stays within 1 of where it was."""
    m = build_method(name, layout, num_clients=8, aggregator=aggregator, base_weights=pretrained_weights(layout))
    server = m.init_server(random_state(layout, gen))
    ups = []
    for k in range(8):
        plan = m.plan(0, k, server)
        state = {}
        for key, spec in plan.upload.items():
            ref = plan.download.get(key)
            base = ref.float() if ref is not None and tuple(ref.shape) == spec.shape else torch.zeros(spec.shape)
            noise = 1e6 * torch.ones(spec.shape) if k == 7 else (torch.rand(spec.shape, generator=gen) - 0.5) * 0.2
            state[key] = (base + noise).to(spec.dtype)
        ups.append(ClientUpdate(k, state, num_examples=10 if k < 7 else 10**12, samples_seen=10, ranks=plan.ranks))
    res = m.aggregate(0, server, ups)
    for key, value in res.adapter.items():
        assert float((value.float() - server.adapter[key].float()).abs().max()) < 1.0, f"{name}: {key}"
    for module, delta in (res.base_delta or {}).items():
        dense = delta if isinstance(delta, torch.Tensor) else delta[0].float() @ delta[1].float()
        assert float(dense.abs().max()) < 1.0, f"{name}: base change of {module}"
    for key, value in (res.tensors or {}).items():
        if key.startswith("cluster"):
            continue  # FL-TAC: the outlier forms a cluster of its own, whose adapter is its own submission
        before = server.tensors.get(key, torch.zeros_like(value))
        assert float((value.float() - before.float()).abs().max()) < 1.0, f"{name}: server tensor {key}"


@pytest.mark.parametrize("name", method_ids())
def test_every_method_supports_robust_aggregation_or_refuses_it(name: str, layout, gen) -> None:
    cls = get_method_class(name)
    if cls.supports_robust_aggregation:
        for aggregator in ROBUST:
            _bounded_round(name, layout, gen, aggregator)
        return
    assert cls.robust_refusal, f"{name} refuses robust aggregation without saying why"
    for aggregator in ROBUST:
        with pytest.raises(ValueError, match=f"^{name} cannot use aggregator='{aggregator}': "):
            build_method(name, layout, num_clients=8, aggregator=aggregator)
        with pytest.raises(ConfigError, match=f"aggregator: {name} cannot use aggregator="):
            RunConfig(method=name, aggregator=aggregator)
    build_method(name, layout, num_clients=8, aggregator="mean")  # the mean is always allowed


def test_products_and_padding_methods_refuse() -> None:
    refusing = {m for m in method_ids() if not get_method_class(m).supports_robust_aggregation}
    assert {"fedex_lora", "flora", "flexlora", "hetlora", "pad_zero", "pad_replicate"} <= refusing
    assert {"fedit", "fedavgm", "scaffold", "flasc", "fl_tac"}.isdisjoint(refusing)


def test_scaffold_median_bounds_the_control_variate(layout) -> None:
    m = build_method("scaffold", layout, num_clients=10, aggregator="median")
    theta = {k: torch.zeros(v.shape) for k, v in random_state(layout, torch.Generator().manual_seed(0)).items()}
    server = m.init_server(theta)
    dcs = [1.0, 2.0, 3.0, 1e6]  # 4 of N = 10 clients reply
    ups = [
        ClientUpdate(
            i,
            {
                **{k: torch.full(v.shape, 0.5) for k, v in theta.items()},
                **{"scaffold.dc/" + k: torch.full(v.shape, dc) for k, v in theta.items()},
            },
            1,
            1,
        )
        for i, dc in enumerate(dcs)
    ]
    res = m.aggregate(0, server, ups)
    for key in layout.all_keys:
        # c = 0 + (|S|/N)·median(Δc) = 0.4·2.5 (the mean form would give (1+2+3+1e6)/10)
        torch.testing.assert_close(res.tensors["scaffold.c/" + key], torch.full(theta[key].shape, 1.0))
        torch.testing.assert_close(res.adapter[key], torch.full(theta[key].shape, 0.5))


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"aggregator": "trimmed_mean:0.6"}, "aggregator='trimmed_mean:0.6': beta=0.6 is outside 0 < beta < 0.5"),
        ({"aggregator": "mode"}, "aggregator='mode' is unknown; allowed: mean, median, trimmed_mean:<beta>"),
        ({"max_weight_ratio": 0.9}, "max_weight_ratio=0.9 must be >= 1"),
        ({"max_weight_ratio": "inf"}, "max_weight_ratio=inf must be"),
        ({"method": "flora", "aggregator": "median"}, "flora cannot use aggregator='median': it merges the exact"),
        ({"method": "fedex_lora", "aggregator": "trimmed_mean:0.1"}, "fedex_lora cannot use aggregator="),
    ],
)
def test_config_rejects_bad_bounds(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)


def test_config_defaults_and_context(layout) -> None:
    cfg = RunConfig.from_dict({"max-weight-ratio": "null", "aggregator": "trimmed_mean:0.1", "method": "fedavgm"})
    assert cfg.max_weight_ratio is None and cfg.aggregator == "trimmed_mean:0.1"
    assert RunConfig().max_weight_ratio == DEFAULT_MAX_WEIGHT_RATIO and RunConfig().aggregator == "mean"
    with pytest.raises(ValueError, match="max_weight_ratio=0.5 must be a finite number >= 1"):
        build_method("fedit", layout, max_weight_ratio=0.5)
    with pytest.raises(ValueError, match="aggregator='avg' is unknown"):
        build_method("fedit", layout, aggregator="avg")


def test_cli_refuses_a_robust_aggregator_before_any_work(capsys, tmp_path) -> None:
    from fedlora.cli import main

    assert main(["run", "--method", "flexlora", "--aggregator", "median", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "flexlora cannot use aggregator='median'" in err and "truncated SVD" in err
    assert not any(tmp_path.iterdir())
