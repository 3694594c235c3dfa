"""FL optimisers on adapters (METHODS.md §36): FedProx, SCAFFOLD, FedAvgM, FedAdam, FedYogi, FedAdagrad.

Hand-built tensors on the ``layout`` fixture (non-square modules, one Conv1D-style, a head); client training is
driven through the library's one loop (:func:`fedlora.client.train.train_local`) with a toy task whose loss is a
hand-written function of the adapter tensors, so the expected values are closed forms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import pytest
import torch
from helpers import HEAD, random_state

from fedlora.adapters import LoraLayout
from fedlora.client.codecs import decode_state, encode_state, parse_codec
from fedlora.client.train import TrainSettings, train_local
from fedlora.methods import ClientUpdate, OptionError, ServerState, Stage, TrainStats, build_method
from fedlora.tasks.base import Encoded, Task

P_NUM = [0.1, 0.3, 0.6]  # num_examples 10, 30, 60


# ---------------------------------------------------------------------------------------------- helpers
class ToyTask(Task):
    """A task whose loss is ``loss_fn(params)``: no data, no model, only the adapter tensors."""

    name = "toy"
    peft_task_type = "none"

    def __init__(
        self, params: Mapping[str, torch.Tensor], loss_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    ):
        self.params = params
        self.loss_fn = loss_fn

    def load_model(self, source, *, num_labels, seed):  # pragma: no cover - never called
        raise NotImplementedError

    def encode(self, tokenizer, data, max_length):  # pragma: no cover - never called
        raise NotImplementedError

    def collate(self, encoded, index, pad_id):
        return {}

    def loss(self, model, batch):
        return self.loss_fn(self.params)

    def evaluate(self, model, encoded, batch_size, pad_id):  # pragma: no cover - never called
        raise NotImplementedError


def train_toy(
    start: Mapping[str, torch.Tensor],
    keys,
    loss_fn,
    objective,
    *,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """Plain SGD (no momentum, no clipping) on ``keys`` of ``start`` through the library's training loop."""
    params = {k: torch.nn.Parameter(start[k].detach().clone().float()) for k in sorted(keys)}
    data = Encoded(input_ids=[[0]] * 4, targets=[0] * 4)
    settings = TrainSettings(steps=steps, batch_size=4, optimizer="sgd", lr=lr, momentum=0.0, max_grad_norm=None)
    out = train_local(
        torch.nn.Module(),
        list(params.values()),
        ToyTask(params, loss_fn),
        data,
        settings,
        seed=0,
        pad_id=0,
        objective=objective,
        views=lambda: params,
        grads=lambda: {k: p.grad for k, p in params.items() if p.grad is not None},
    )
    trained = {**start, **{k: p.detach().clone() for k, p in params.items()}}
    return trained, TrainStats(int(out["steps"]), int(out["samples_seen"]), float(out["train_loss"]), lr)


def linear_loss(g: Mapping[str, torch.Tensor]):
    return lambda params: sum((g[k] * params[k]).sum() for k in g)


def quadratic_loss(target: Mapping[str, torch.Tensor]):
    return lambda params: sum(0.5 * (params[k] - target[k]).square().sum() for k in target)


def shaped(layout: LoraLayout, fn: Callable[[torch.Size], torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tensor per key of T (every A, B and the head), made by ``fn(shape)``."""
    ref = random_state(layout, torch.Generator().manual_seed(0))
    return {k: fn(ref[k].shape) for k in layout.all_keys}


def replies(theta: Mapping[str, torch.Tensor], deltas: list[Mapping[str, torch.Tensor]], ns=(10, 30, 60)):
    """Client updates ``θ + Δ_k`` with data sizes ``ns``."""
    return [
        ClientUpdate(client_id=i, state={k: theta[k] + d[k] for k in d}, num_examples=n, samples_seen=n)
        for i, (d, n) in enumerate(zip(deltas, ns, strict=True))
    ]


def next_server(server: ServerState, res) -> ServerState:
    return dataclasses.replace(
        server,
        round=server.round + 1,
        adapter=res.adapter,
        tensors=server.tensors if res.tensors is None else res.tensors,
        meta=server.meta if res.meta is None else res.meta,
    )


def wsum(states: list[Mapping[str, torch.Tensor]], key: str, p) -> torch.Tensor:
    return sum(pk * s[key] for pk, s in zip(p, states, strict=True))


# ---------------------------------------------------------------------------------------------- FedProx
@pytest.mark.invariant("fedprox")
def test_fedprox_mu_zero_is_fedit(layout, updates, gen) -> None:
    initial = random_state(layout, gen)
    prox, fedit = build_method("fedprox", layout, options={"mu": 0}), build_method("fedit", layout)
    server = prox.init_server(initial)
    plan, plan_fedit = prox.plan(0, 1, server), fedit.plan(0, 1, server)
    assert plan == plan_fedit
    start = prox.start_state(plan, initial, None)
    assert prox.objective(plan, start, None) is None  # no term at all, not a zero term
    res, res_fedit = prox.aggregate(0, server, updates), fedit.aggregate(0, server, updates)
    for key in layout.all_keys:
        assert torch.equal(res.adapter[key], res_fedit.adapter[key])
    # the same local trajectory as FedIT
    target = random_state(layout, gen)
    a, _ = train_toy(start, plan.train_keys, quadratic_loss(target), prox.objective(plan, start, None), steps=4, lr=0.1)
    b, _ = train_toy(start, plan.train_keys, quadratic_loss(target), None, steps=4, lr=0.1)
    for key in layout.all_keys:
        assert torch.equal(a[key], b[key])


@pytest.mark.invariant("fedprox")
def test_fedprox_gradient_is_zero_at_the_anchor_and_step_one_equals_fedit(layout, gen) -> None:
    m = build_method("fedprox", layout, options={"mu": 0.7})
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    plan = m.plan(0, 0, server)
    start = m.start_state(plan, initial, None)
    obj = m.objective(plan, start, None)
    params = {k: start[k].clone().requires_grad_(True) for k in plan.train_keys}
    term = obj.loss(params)
    term.backward()
    assert float(term.detach()) == 0.0
    for key in plan.train_keys:
        assert torch.count_nonzero(params[key].grad) == 0, key
    target = random_state(layout, gen)
    one_prox, _ = train_toy(start, plan.train_keys, quadratic_loss(target), obj, steps=1, lr=0.1)
    one_fedit, _ = train_toy(start, plan.train_keys, quadratic_loss(target), None, steps=1, lr=0.1)
    for key in layout.all_keys:
        assert torch.equal(one_prox[key], one_fedit[key])
    two_prox, _ = train_toy(start, plan.train_keys, quadratic_loss(target), obj, steps=2, lr=0.1)
    two_fedit, _ = train_toy(start, plan.train_keys, quadratic_loss(target), None, steps=2, lr=0.1)
    assert not torch.equal(two_prox[layout.a_keys[0]], two_fedit[layout.a_keys[0]])  # from step 2 on it pulls back


@pytest.mark.invariant("fedprox")
def test_fedprox_gradient_and_quadratic_closed_form(layout, gen) -> None:
    mu = 0.5
    m = build_method("fedprox", layout, options={"mu": mu})
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    plan = m.plan(0, 2, server)
    start = m.start_state(plan, initial, None)
    anchor = {k: server.adapter[k] for k in layout.all_keys}  # X_g: the downloaded global
    target = random_state(layout, gen)  # F_k(X) = ½‖X − T_k‖²
    obj = m.objective(plan, start, None)
    # the gradient of F_k + prox at a point X is (X − T_k) + μ(X − X_g)
    x = {k: (start[k] + torch.randn(start[k].shape, generator=gen)).requires_grad_(True) for k in layout.all_keys}
    (quadratic_loss(target)(x) + obj.loss(x)).backward()
    for key in layout.all_keys:
        want = (x[key] - target[key]) + mu * (x[key] - anchor[key])
        torch.testing.assert_close(x[key].grad, want.detach())
    # the local minimiser is (T_k + μ X_g) / (1 + μ), per tensor
    trained, _ = train_toy(start, plan.train_keys, quadratic_loss(target), obj, steps=300, lr=0.2)
    for key in layout.all_keys:
        torch.testing.assert_close(trained[key], (target[key] + mu * anchor[key]) / (1 + mu), rtol=1e-5, atol=1e-6)
    # without the term the minimiser is T_k itself
    plain, _ = train_toy(start, plan.train_keys, quadratic_loss(target), None, steps=300, lr=0.2)
    torch.testing.assert_close(plain[HEAD], target[HEAD], rtol=1e-5, atol=1e-6)


@pytest.mark.invariant("fedprox")
def test_fedprox_frozen_tensors_never_enter_the_penalty(layout, gen) -> None:
    mu = 0.4
    m = build_method("fedprox", layout, options={"mu": mu})
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    trained_keys = frozenset(layout.b_keys + (HEAD,))  # A frozen, as a plan with an FFA-style stage would say
    plan = dataclasses.replace(m.plan(0, 0, server), stages=(Stage(trained_keys),))
    start = m.start_state(plan, initial, None)
    obj = m.objective(plan, start, None)
    assert set(obj.anchors) == set(trained_keys)
    moved_b = {k: start[k] + 0.5 for k in trained_keys}
    base = {**{k: start[k] for k in layout.a_keys}, **moved_b}
    want = 0.5 * mu * sum(0.25 * start[k].numel() for k in trained_keys)  # (μ/2)·Σ‖0.5‖²
    torch.testing.assert_close(obj.loss(base), torch.tensor(want))
    perturbed = {**base, **{k: start[k] + 3.0 for k in layout.a_keys}}
    assert torch.equal(obj.loss(perturbed), obj.loss(base))


def test_fedprox_server_weights_by_examples(layout, updates, gen) -> None:
    m = build_method("fedprox", layout)
    assert m.options.mu == 0.01 and m.weighting == "num_examples"
    server = m.init_server(random_state(layout, gen))
    res = m.aggregate(0, server, updates)
    for key in layout.all_keys:
        torch.testing.assert_close(res.adapter[key], wsum([u.state for u in updates], key, P_NUM))


# ---------------------------------------------------------------------------------------------- SCAFFOLD
def _scaffold(layout, **kw):
    return build_method("scaffold", layout, num_clients=kw.pop("num_clients", 4), **kw)


@pytest.mark.invariant("scaffold")
def test_scaffold_first_participation_is_fedavg(layout, gen) -> None:
    m = _scaffold(layout)
    fedit = build_method("fedit", layout, weighting="uniform")
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    ups = []
    for k in range(3):
        plan = m.plan(0, k, server)
        for key in layout.all_keys:
            assert torch.equal(plan.download[key], server.adapter[key])
            assert torch.count_nonzero(plan.download["scaffold.c/" + key]) == 0
        start = m.start_state(plan, initial, None)
        assert m.objective(plan, start, None) is None  # c = c_i = 0: no correction
        trained = {**start, **random_state(layout, gen)}
        upload, keep = m.finish(plan, trained, None, TrainStats(steps=5, samples_seen=20, train_loss=0.0, lr=0.1))
        ups.append(ClientUpdate(k, upload, num_examples=10 * (k + 1), samples_seen=20))
    res = m.aggregate(0, server, ups)
    want = fedit.aggregate(
        0, server, [dataclasses.replace(u, state={k: u.state[k] for k in layout.all_keys}) for u in ups]
    )
    for key in layout.all_keys:
        torch.testing.assert_close(res.adapter[key], want.adapter[key], rtol=1e-6, atol=1e-6)


@pytest.mark.invariant("scaffold")
def test_scaffold_linear_losses_recover_the_gradients(layout, gen) -> None:
    """F_i(θ) = ⟨g_i, θ⟩ with plain SGD: option II gives c_i⁺ = g_i exactly, and c = (1/N) Σ_{i∈S} g_i."""
    n_clients, steps, lr = 4, 3, 0.1
    m = _scaffold(layout, num_clients=n_clients)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    g = [shaped(layout, lambda s: torch.randn(s, generator=gen)) for _ in range(n_clients)]
    kept: dict[int, dict[str, torch.Tensor]] = {}
    c_want = {k: torch.zeros_like(initial[k]) for k in layout.all_keys}
    for rnd, sampled in enumerate([[0, 2], [0, 1]]):
        ups = []
        for i in sampled:
            plan = m.plan(rnd, i, server)
            start = m.start_state(plan, initial, kept.get(i))
            obj = m.objective(plan, start, kept.get(i))
            trained, stats = train_toy(start, plan.train_keys, linear_loss(g[i]), obj, steps=steps, lr=lr)
            assert stats.steps == steps
            c_i = kept.get(i, {}).get  # previous c_i (zeros before the first participation)
            for key in layout.all_keys:  # y = θ − Kη(g_i − c_i + c)
                ci = c_i("scaffold.ci/" + key, torch.zeros_like(initial[key]))
                y = server.adapter[key] - steps * lr * (g[i][key] - ci + server.tensors["scaffold.c/" + key])
                torch.testing.assert_close(trained[key], y, rtol=1e-5, atol=1e-5)
            upload, keep = m.finish(plan, trained, kept.get(i), stats)
            for key in layout.all_keys:
                torch.testing.assert_close(keep["scaffold.ci/" + key], g[i][key], rtol=1e-4, atol=1e-4)
            ups.append(ClientUpdate(i, upload, num_examples=5, samples_seen=4 * steps))
            kept[i] = keep
        res = m.aggregate(rnd, server, ups)
        participated = sorted(kept)
        for key in layout.all_keys:
            c_want[key] = sum(g[i][key] for i in participated) / n_clients
            torch.testing.assert_close(res.tensors["scaffold.c/" + key], c_want[key], rtol=1e-4, atol=1e-4)
            mean_y = sum(u.state[key] for u in ups) / len(ups)
            torch.testing.assert_close(res.adapter[key], mean_y, rtol=1e-6, atol=1e-6)
        server = next_server(server, res)


def test_scaffold_finish_option_two_by_hand(layout) -> None:
    m = _scaffold(layout)
    theta = shaped(layout, lambda s: torch.full(s, 1.0))
    server = dataclasses.replace(
        m.init_server(theta), tensors={"scaffold.c/" + k: torch.full(v.shape, 0.5) for k, v in theta.items()}
    )
    plan = m.plan(3, 1, server)
    personal = {"scaffold.ci/" + k: torch.full(v.shape, 0.25) for k, v in theta.items()}
    trained = {**m.start_state(plan, theta, personal), **{k: torch.full(v.shape, 0.4) for k, v in theta.items()}}
    upload, keep = m.finish(plan, trained, personal, TrainStats(steps=3, samples_seen=9, train_loss=0.0, lr=0.1))
    assert set(upload) == set(plan.upload) == set(layout.all_keys) | {"scaffold.dc/" + k for k in layout.all_keys}
    assert set(keep) == {"scaffold.ci/" + k for k in layout.all_keys}
    for key in layout.all_keys:
        # c_i⁺ = 0.25 − 0.5 + (1 − 0.4)/(3·0.1) = 1.75; Δc_i = 1.5; y travels as trained
        torch.testing.assert_close(keep["scaffold.ci/" + key], torch.full(theta[key].shape, 1.75))
        torch.testing.assert_close(upload["scaffold.dc/" + key], torch.full(theta[key].shape, 1.5))
        assert torch.equal(upload[key], trained[key])
    # the correction during training is c − c_i = 0.25: by default after each step (θ −= lr·0.25), gradient untouched
    obj = m.objective(plan, trained, personal)
    grads = {k: torch.zeros_like(v) for k, v in theta.items()}
    params = {k: torch.ones_like(v) for k, v in theta.items()}
    obj.after_backward(grads)
    obj.after_step(params, 0.1)
    for key in layout.all_keys:
        assert torch.count_nonzero(grads[key]) == 0
        torch.testing.assert_close(params[key], torch.full(theta[key].shape, 1 - 0.025))
    # correction=gradient: g += 0.25 before the step, parameters untouched afterwards
    mg = _scaffold(layout, options={"correction": "gradient"})
    obj = mg.objective(mg.plan(0, 1, server), trained, personal)
    grads = {k: torch.zeros_like(v) for k, v in theta.items()}
    params = {k: torch.ones_like(v) for k, v in theta.items()}
    obj.after_backward(grads)
    obj.after_step(params, 0.1)
    for key in layout.all_keys:
        torch.testing.assert_close(grads[key], torch.full(theta[key].shape, 0.25))
        assert bool((params[key] == 1).all())


def test_scaffold_server_update_by_hand(layout) -> None:
    m = _scaffold(layout, num_clients=5, options={"server_lr": 0.5})
    assert m.weighting == "uniform"
    theta = shaped(layout, lambda s: torch.full(s, 2.0))
    server = m.init_server(theta)
    server = dataclasses.replace(server, tensors={k: v + 0.1 for k, v in server.tensors.items()})
    ys, dcs = (1.0, 4.0), (0.5, 2.0)
    ups = [
        ClientUpdate(
            i,
            {
                **{k: torch.full(v.shape, y) for k, v in theta.items()},
                **{"scaffold.dc/" + k: torch.full(v.shape, dc) for k, v in theta.items()},
            },
            num_examples=1 + 9 * i,
            samples_seen=3,
        )
        for i, (y, dc) in enumerate(zip(ys, dcs, strict=True))
    ]
    res = m.aggregate(0, server, ups)
    for key in layout.all_keys:
        # θ = 2 + 0.5·((1 − 2) + (4 − 2))/2 = 2.25;  c = 0.1 + (0.5 + 2)/5 = 0.6 (N = 5, not |S| = 2)
        torch.testing.assert_close(res.adapter[key], torch.full(theta[key].shape, 2.25))
        torch.testing.assert_close(res.tensors["scaffold.c/" + key], torch.full(theta[key].shape, 0.6))


@pytest.mark.invariant("scaffold")
def test_scaffold_control_variates_have_the_shapes_of_t(layout, gen) -> None:
    m = _scaffold(layout)
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    assert set(server.tensors) == {"scaffold.c/" + k for k in layout.all_keys}
    for key in layout.all_keys:
        assert server.tensors["scaffold.c/" + key].shape == initial[key].shape
        assert server.tensors["scaffold.c/" + key].dtype == torch.float32
    plan = m.plan(0, 3, server)
    assert plan.train_keys == frozenset(layout.all_keys)
    assert set(plan.download) == set(layout.all_keys) | {"scaffold.c/" + k for k in layout.all_keys}
    for key in layout.all_keys:
        assert plan.upload["scaffold.dc/" + key].shape == tuple(initial[key].shape)
        assert plan.upload["scaffold.dc/" + key].dtype == torch.float32
    start = m.start_state(plan, initial, None)
    trained = {**start, **random_state(layout, gen)}
    _, keep = m.finish(plan, trained, None, TrainStats(steps=2, samples_seen=4, train_loss=0.0, lr=0.01))
    assert {k: v.shape for k, v in keep.items()} == {"scaffold.ci/" + k: initial[k].shape for k in layout.all_keys}
    with pytest.raises(ValueError, match="global rank"):
        _scaffold(layout, client_ranks=(1, 1, 1, 1))


def test_scaffold_keeps_what_the_server_decodes(layout, gen) -> None:
    """With a lossy upload codec the client keeps c_i + decode(Δc_i), so c stays the mean of the c_i."""
    m = _scaffold(layout, upload_codec="int8")
    initial = random_state(layout, gen)
    server = m.init_server(initial)
    server = dataclasses.replace(
        server, tensors={k: torch.randn(v.shape, generator=gen) for k, v in server.tensors.items()}
    )
    plan = m.plan(0, 0, server)
    personal = {"scaffold.ci/" + k: torch.randn(initial[k].shape, generator=gen) for k in layout.all_keys}
    trained = {**m.start_state(plan, initial, personal), **random_state(layout, gen)}
    upload, keep = m.finish(plan, trained, personal, TrainStats(steps=7, samples_seen=4, train_loss=0.0, lr=0.03))
    codec = parse_codec("int8")
    specs = {k: (s.shape, s.dtype) for k, s in plan.upload.items()}
    decoded = decode_state(codec, encode_state(codec, upload, plan.download), specs, plan.download)
    for key in layout.all_keys:
        dc = decoded["scaffold.dc/" + key]
        assert not torch.equal(dc, upload["scaffold.dc/" + key])  # the codec is lossy
        assert torch.equal(keep["scaffold.ci/" + key], personal["scaffold.ci/" + key] + dc)


# ---------------------------------------------------------------------------------------------- FedAvgM
@pytest.mark.invariant("fedavgm")
def test_fedavgm_without_momentum_is_fedit(layout, updates, gen) -> None:
    m = build_method("fedavgm", layout, options={"momentum": 0.0, "server_lr": 1.0})
    fedit = build_method("fedit", layout)
    assert m.weighting == "num_examples"
    server = m.init_server(random_state(layout, gen))
    fserver = fedit.init_server(server.adapter)
    for rnd in range(3):
        ups = [dataclasses.replace(u, state=random_state(layout, gen)) for u in updates]
        res, fres = m.aggregate(rnd, server, ups), fedit.aggregate(rnd, fserver, ups)
        for key in layout.all_keys:
            torch.testing.assert_close(res.adapter[key], fres.adapter[key], rtol=1e-6, atol=1e-6)
        server, fserver = next_server(server, res), next_server(fserver, fres)


@pytest.mark.invariant("fedavgm")
@pytest.mark.parametrize("form", ["tff", "openfedllm"])
def test_fedavgm_two_rounds_match_the_closed_forms(form: str, layout, gen) -> None:
    beta, eta = 0.9, 0.5 if form == "tff" else 1.0
    opts = {"momentum": beta, "server_lr": eta, "dampening": 0.0 if form == "tff" else beta}
    m = build_method("fedavgm", layout, options=opts)
    theta0 = random_state(layout, gen)
    server = m.init_server(theta0)
    per_round = []
    for rnd in range(2):
        deltas = [random_state(layout, gen) for _ in range(3)]
        res = m.aggregate(rnd, server, replies(server.adapter, deltas))
        per_round.append({k: wsum(deltas, k, P_NUM) for k in layout.all_keys})  # Δ_t, n_k-weighted
        server = next_server(server, res)
    d0, d1 = per_round
    assert server.meta["fedopt.steps"] == 2
    for key in layout.all_keys:
        if form == "tff":  # θ_2 = θ_0 + η(Δ_0 + βΔ_0 + Δ_1)
            want = theta0[key] + eta * (d0[key] + beta * d0[key] + d1[key])
        else:  # θ_2 = θ_0 + Δ_0 + (βΔ_0 + (1−β)Δ_1)
            want = theta0[key] + d0[key] + (beta * d0[key] + (1 - beta) * d1[key])
        torch.testing.assert_close(server.adapter[key], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- adaptive
def _scalar_rounds(method: str, deltas: list[float], layout, **opts) -> tuple[list[float], ServerState]:
    """θ after each round when every coordinate of every tensor of T has pseudo-gradient ``deltas[t]``."""
    m = build_method(method, layout, options=opts)
    theta = shaped(layout, lambda s: torch.zeros(s))
    server = m.init_server(theta)
    out = []
    for rnd, d in enumerate(deltas):
        ups = replies(server.adapter, [shaped(layout, lambda s, d=d: torch.full(s, d))] * 3)
        server = next_server(server, m.aggregate(rnd, server, ups))
        values = torch.cat([server.adapter[k].reshape(-1) for k in layout.all_keys])
        assert torch.all(values == values[0])
        out.append(float(values[0]))
    return out, server


@pytest.mark.invariant("fedadam")
def test_fedadam_without_moments_steps_by_the_sign(layout, gen) -> None:
    eta = 0.05
    m = build_method("fedadam", layout, options={"beta1": 0, "beta2": 0, "tau": 0, "server_lr": eta})
    assert m.weighting == "uniform"
    theta = random_state(layout, gen)
    server = m.init_server(theta)
    for rnd in range(2):
        deltas = [random_state(layout, gen) for _ in range(3)]
        for d in deltas:
            d[HEAD][0] = 0.0  # a coordinate no client changes
        res = m.aggregate(rnd, server, replies(server.adapter, deltas))
        for key in layout.all_keys:
            mean = sum(d[key] for d in deltas) / 3  # uniform, as Algorithm 2
            torch.testing.assert_close(res.adapter[key], server.adapter[key] + eta * torch.sign(mean))
        assert torch.equal(res.adapter[HEAD][0], theta[HEAD][0])
        server = next_server(server, res)


@pytest.mark.invariant("fedadagrad")
def test_fedadagrad_accumulates_squares(layout, gen) -> None:
    tau, eta = 1e-2, 0.1
    m = build_method("fedadagrad", layout, options={"tau": tau, "server_lr": eta})
    assert m.options.beta1 == 0.0
    theta = random_state(layout, gen)
    server = m.init_server(theta)
    for key in layout.all_keys:
        torch.testing.assert_close(server.tensors["fedopt.v/" + key], torch.full(theta[key].shape, tau**2))
    squares = {k: torch.full(theta[k].shape, tau**2) for k in layout.all_keys}
    for rnd in range(3):
        deltas = [random_state(layout, gen) for _ in range(3)]
        res = m.aggregate(rnd, server, replies(server.adapter, deltas))
        for key in layout.all_keys:
            d = sum(x[key] for x in deltas) / 3
            squares[key] = squares[key] + d**2  # v_t = τ² + Σ_{s≤t} Δ_s²
            torch.testing.assert_close(res.tensors["fedopt.v/" + key], squares[key])
            torch.testing.assert_close(res.adapter[key], server.adapter[key] + eta * d / (squares[key].sqrt() + tau))
        server = next_server(server, res)


@pytest.mark.invariant("fedyogi")
def test_fedyogi_second_moment(layout) -> None:
    tau, b1, b2, eta = 1e-3, 0.9, 0.99, 1e-2
    opts = {"tau": tau, "beta1": b1, "beta2": b2, "server_lr": eta}
    d0, d1 = 2e-2, 1e-3
    thetas, server = _scalar_rounds("fedyogi", [d0, d1], layout, **opts)
    v0 = tau**2 + (1 - b2) * d0**2  # Δ_0² > τ²: v grows
    m0 = (1 - b1) * d0
    assert thetas[0] == pytest.approx(eta * m0 / (v0**0.5 + tau), rel=1e-5)
    v1 = v0 - (1 - b2) * d1**2  # Δ_1² < v_0: v shrinks by (1 − β2)Δ_1²
    m1 = b1 * m0 + (1 - b1) * d1
    assert thetas[1] == pytest.approx(thetas[0] + eta * m1 / (v1**0.5 + tau), rel=1e-5)
    v = server.tensors["fedopt.v/" + HEAD]
    torch.testing.assert_close(v, torch.full(v.shape, v1))
    # FedAdam from the same start differs (β2 v + (1−β2) Δ²)
    adam, _ = _scalar_rounds("fedadam", [d0], layout, **opts)
    assert adam[0] != pytest.approx(thetas[0], rel=1e-4)


@pytest.mark.invariant("fedavgm")
@pytest.mark.invariant("fedadam")
@pytest.mark.invariant("fedyogi")
@pytest.mark.invariant("fedadagrad")
@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("variant", ["paper", "openfedllm"])
def test_unchanged_coordinates_never_move_and_state_has_the_shapes_of_t(method, variant, layout, gen) -> None:
    opts = {"dampening": 0.9} if method == "fedavgm" and variant == "openfedllm" else {}
    if method != "fedavgm":
        opts = {"variant": variant, "server_lr": 0.3}
    m = build_method(method, layout, options=opts)
    theta = random_state(layout, gen)
    server = m.init_server(theta)
    spaces = ("fedopt.m",) if method == "fedavgm" else ("fedopt.m", "fedopt.v")
    assert set(server.tensors) == {f"{ns}/{k}" for ns in spaces for k in layout.all_keys}
    for name, value in server.tensors.items():
        assert value.shape == theta[name.split("/", 1)[1]].shape and value.dtype == torch.float32
    still = layout.b_keys[1]  # a tensor no client ever changes, and one coordinate of another
    for rnd in range(3):
        deltas = [random_state(layout, gen) for _ in range(3)]
        for d in deltas:
            d[still] = torch.zeros_like(d[still])
            d[layout.a_keys[0]][1, 2] = 0.0
        res = m.aggregate(rnd, server, replies(server.adapter, deltas))
        assert set(res.tensors) == set(server.tensors)
        assert torch.equal(res.adapter[still], theta[still])
        assert res.adapter[layout.a_keys[0]][1, 2] == theta[layout.a_keys[0]][1, 2]
        assert not torch.equal(res.adapter[layout.a_keys[0]], server.adapter[layout.a_keys[0]])
        server = next_server(server, res)


@pytest.mark.invariant("fedadam")
def test_first_step_numbers_of_the_three_conventions(layout) -> None:
    """Δ = 1e-2, η = τ = 1e-3, β = (0.9, 0.99): OpenFedLLM 4.1e-3, Algorithm 2 (v_{−1} = τ²) 4.1e-4, Flower 5.0e-4."""
    opts = {"server_lr": 1e-3, "tau": 1e-3, "beta1": 0.9, "beta2": 0.99}
    paper, _ = _scalar_rounds("fedadam", [1e-2], layout, **opts)
    openfedllm, _ = _scalar_rounds("fedadam", [1e-2], layout, variant="openfedllm", **opts)
    flower, _ = _scalar_rounds("fedadam", [1e-2], layout, initial_v=0.0, **opts)
    assert paper[0] == pytest.approx(1e-6 / (1.99e-6**0.5 + 1e-3), rel=1e-5)
    assert round(paper[0], 5) == 4.1e-4
    assert openfedllm[0] == pytest.approx(10 * paper[0], rel=1e-5)
    assert round(openfedllm[0], 4) == 4.1e-3
    assert flower[0] == pytest.approx(5.0e-4, rel=1e-5)
    # from round 1 on, OpenFedLLM builds v from m², not Δ²: after Δ = (1e-2, −1e-2) the second moments differ
    _, s_paper = _scalar_rounds("fedadam", [1e-2, -1e-2], layout, **opts)
    _, s_ofl = _scalar_rounds("fedadam", [1e-2, -1e-2], layout, variant="openfedllm", **opts)
    v_paper = 0.99 * (0.99 * 1e-6 + 0.01 * 1e-4) + 0.01 * 1e-4
    m1 = 0.9 * 1e-2 + 0.1 * -1e-2  # m_0 = Δ_0, then the EMA
    v_ofl = 0.99 * (0.99 * 1e-6 + 0.01 * 1e-4) + 0.01 * m1**2
    assert float(s_paper.tensors["fedopt.v/" + HEAD][0, 0]) == pytest.approx(v_paper, rel=1e-5)
    assert float(s_ofl.tensors["fedopt.v/" + HEAD][0, 0]) == pytest.approx(v_ofl, rel=1e-5)


@pytest.mark.invariant("fedyogi")
@pytest.mark.invariant("fedadagrad")
def test_openfedllm_variant_first_step_for_yogi_and_adagrad(layout) -> None:
    opts = {"server_lr": 1e-3, "tau": 1e-3}
    yogi, _ = _scalar_rounds("fedyogi", [1e-2], layout, beta1=0.9, beta2=0.99, **opts)
    yogi_ofl, _ = _scalar_rounds("fedyogi", [1e-2], layout, beta1=0.9, beta2=0.99, variant="openfedllm", **opts)
    v0 = 1e-6 + 0.01 * 1e-4  # Yogi from τ² with Δ² > τ²
    assert yogi[0] == pytest.approx(1e-3 * 1e-3 / (v0**0.5 + 1e-3), rel=1e-5)
    assert yogi_ofl[0] == pytest.approx(10 * yogi[0], rel=1e-5)
    # OpenFedLLM's FedAdagrad: m = Δ, v = τ² + Δ² (the same as Algorithm 2 with β1 = 0)
    ada, _ = _scalar_rounds("fedadagrad", [1e-2, 3e-3], layout, **opts)
    ada_ofl, _ = _scalar_rounds("fedadagrad", [1e-2, 3e-3], layout, variant="openfedllm", **opts)
    v = [1e-6 + 1e-4, 1e-6 + 1e-4 + 9e-6]
    want0 = 1e-3 * 1e-2 / (v[0] ** 0.5 + 1e-3)
    assert ada[0] == pytest.approx(want0, rel=1e-5)
    assert ada[1] == pytest.approx(want0 + 1e-3 * 3e-3 / (v[1] ** 0.5 + 1e-3), rel=1e-5)
    assert ada_ofl == pytest.approx(ada, rel=1e-6)


def test_adaptive_weighting_is_uniform_by_default_and_explicit(layout, gen) -> None:
    theta = random_state(layout, gen)
    deltas = [shaped(layout, lambda s, c=c: torch.full(s, c)) for c in (1.0, 2.0, 4.0)]
    opts = {"beta1": 0, "server_lr": 1.0, "tau": 1.0, "initial_v": 0.0}
    for weighting, mean in (("auto", 7 / 3), ("num_examples", 0.1 + 0.6 + 2.4)):
        m = build_method("fedadagrad", layout, options=opts, weighting=weighting)
        res = m.aggregate(0, m.init_server(theta), replies(theta, deltas))
        torch.testing.assert_close(res.adapter[HEAD], theta[HEAD] + mean / (mean + 1.0))


def test_server_optimisers_refuse_ranks_below_the_global_one_and_bad_options(layout) -> None:
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        with pytest.raises(ValueError, match="global rank"):
            build_method(name, layout, client_ranks=(1, 1))
    with pytest.raises(OptionError, match="variant"):
        build_method("fedadam", layout, options={"variant": "keras"})
    with pytest.raises(OptionError, match="momentum"):
        build_method("fedavgm", layout, options={"momentum": "1.5"})
    with pytest.raises(OptionError, match="beta2"):
        build_method("fedadagrad", layout, options={"beta2": "0.9"})
