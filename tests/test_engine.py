"""End-to-end: every method learns on the default task (tiny BERT), exact methods reach the ideal model on real
peft layers (nn.Linear and Conv1D), runs resume to the same result, saved adapters reproduce the logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config
from method_cases import learning_cases, score_key

from fedlora import load_trained, run
from fedlora.adapters.peft_io import AdapterSlots, base_weights
from fedlora.adapters.state import delta_weight
from fedlora.api import build, resolve_config
from fedlora.federation.round import run_round
from fedlora.methods import get_method_class

LEARN_BOUND = 0.30  # accuracy after 5 rounds; chance is 1/8 = 0.125


@pytest.mark.parametrize(
    "method,overrides",
    learning_cases(),
    ids=[m + ("-mixed" if o.get("client_ranks") else "") for m, o in learning_cases()],
)
def test_method_learns_default_task(method: str, overrides: dict, tiny_bert: str, tmp_path) -> None:
    result = run(tiny_config(tiny_bert, tmp_path, method=method, run_name=method, **overrides))
    accs = [h[score_key(method)] for h in result.history]
    assert len(accs) == 5
    assert accs[-1] > LEARN_BOUND, accs
    assert accs[-1] > accs[0], accs
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 6))
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and not r["rejected"] for r in records)
    assert (result.run_dir / "metrics.png").stat().st_size > 10_000
    assert (result.run_dir / "checkpoints" / "round-0005" / "server.safetensors").is_file()
    if get_method_class(method).has_personal_state:
        assert sorted(p.name for p in (result.run_dir / "personal").iterdir()) == [f"client-{k}" for k in range(4)]
    if method == "fedsa_lora":
        b_key = next(k for k in result.personal[0] if k.endswith("lora_B.weight"))
        bs = [result.personal[c][b_key] for c in range(4)]
        assert all(not torch.equal(bs[i], bs[j]) for i in range(4) for j in range(i + 1, 4))  # one B per client
    if get_method_class(method).has_global_model:
        assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def _effective(model, layout) -> dict[str, torch.Tensor]:
    """W0 + s·B@A per adapted module, in nn.Linear layout, read from the live peft model."""
    st = AdapterSlots(model).read()
    out = {}
    for spec in layout.modules:
        w = base_weights(model, layout)[spec.name].detach()
        out[spec.name] = (w.T if spec.fan_in_fan_out else w).clone() + delta_weight(st, spec)
    return out


@pytest.mark.parametrize("method", ["fedex_lora", "flora"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_exact_methods_reach_ideal_model(method: str, arch: str, request, tmp_path) -> None:
    model_dir = request.getfixturevalue("tiny_bert" if arch == "bert" else "tiny_gpt2")
    cfg = resolve_config(tiny_config(model_dir, tmp_path, method=method, max_examples_per_label=20, local_epochs=1))
    setup = build(cfg)
    engine, method_obj, layout = setup.engine, setup.method, setup.layout
    if arch == "gpt2":
        assert all(spec.fan_in_fan_out for spec in layout.modules)
        assert any(spec.in_features != spec.out_features for spec in layout.modules)
    server = method_obj.init_server(engine.initial)
    server, _ = run_round(0, method_obj, server, engine, clients=[0, 1, 2, 3])

    captured = []
    original_train = engine.train

    def capture(plans):
        replies = original_train(plans)
        captured.extend(replies)
        return replies

    engine.train = capture  # type: ignore[method-assign]
    w0 = {
        n: (w.T if layout.module(n).fan_in_fan_out else w).detach().clone()
        for n, w in base_weights(setup.model, layout).items()
    }
    server, report = run_round(1, method_obj, server, engine, clients=[0, 1, 2, 3])
    assert len(report.accepted) == 4
    p = method_obj.weights(captured)
    engine.evaluate(server)  # the shared base takes the round's change here (as a client would from its next plan)
    got = _effective(setup.model, layout)
    for spec in layout.modules:
        ideal = w0[spec.name] + sum(
            pk * spec.scaling() * u.state[spec.b_key] @ u.state[spec.a_key] for pk, u in zip(p, captured, strict=True)
        )
        torch.testing.assert_close(got[spec.name], ideal, rtol=1e-5, atol=1e-6)
        assert (ideal - w0[spec.name]).abs().max() > 1e-4  # the round changed something


def test_saved_adapter_reproduces_logits_in_peft(tiny_bert: str, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run(tiny_config(tiny_bert, tmp_path, method="fedit", rounds=2, max_examples_per_label=20))
    setup = build(resolve_config(result.config))
    AdapterSlots(setup.model).load(result.global_adapter)
    setup.model.eval()
    batch = setup.task.collate(setup.engine.global_test, list(range(16)), setup.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = setup.model(**inputs).logits
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=8, ignore_mismatched_sizes=True)
        peft_model = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_base_changing_method_reloads_with_base_delta(tiny_bert: str, tmp_path) -> None:
    result = run(tiny_config(tiny_bert, tmp_path, method="fedex_lora", rounds=2, max_examples_per_label=20))
    assert (result.run_dir / "base_delta.safetensors").is_file()
    setup = build(resolve_config(result.config))
    from fedlora.adapters.peft_io import add_to_base

    add_to_base(setup.model, setup.layout, result.base_delta)
    AdapterSlots(setup.model).load(result.global_adapter)
    setup.model.eval()
    batch = setup.task.collate(setup.engine.global_test, list(range(16)), setup.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    loaded, _ = load_trained(result.run_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, setup.model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_local_csv_with_natural_partition(tiny_bert: str, tmp_path) -> None:
    import csv

    from fedlora.data import default_dataset_path, load_table

    table = load_table("default")
    rows = []
    for label in ("noun.animal", "noun.plant", "noun.person"):
        rows += table.filter(lambda r, lab=label: r["label"] == lab).select(range(0, 3000, 50)).to_list()
    path = tmp_path / "glosses.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gloss", "kind", "site"])
        for i, r in enumerate(rows):
            w.writerow([r["text"], r["label"], f"site-{i % 3}"])
    assert default_dataset_path().is_file()
    result = run(
        tiny_config(
            tiny_bert,
            tmp_path,
            dataset=str(path),
            text_column="gloss",
            label_column="kind",
            partition="natural:site",
            clients=3,
            rounds=2,
            max_examples_per_label=None,
        )
    )
    info = json.loads((result.run_dir / "data.json").read_text())
    assert info["labels"] == ["noun.animal", "noun.person", "noun.plant"]
    assert len(info["clients"]) == 3 and all(c["train"] > 0 for c in info["clients"])
    assert 0.0 <= result.final["global_accuracy"] <= 1.0


def test_fedsa_clients_start_from_their_own_b(tiny_bert: str, tmp_path) -> None:
    """Each client's personal B is the one it kept itself last round (never another client's: METHODS.md §19)."""
    cfg = resolve_config(
        tiny_config(tiny_bert, tmp_path, method="fedsa_lora", rounds=3, max_examples_per_label=20, local_epochs=1)
    )
    setup = build(cfg)
    engine, method = setup.engine, setup.method
    kept: dict[int, dict[str, torch.Tensor]] = {}
    starts: list[tuple[int, int, dict | None]] = []
    original_start, original_finish = method.start_state, method.finish

    training = {"on": False}

    def spy_start(plan, initial, personal):
        if training["on"]:  # evaluation also builds client models; record training starts only
            starts.append((plan.round, plan.client_id, None if personal is None else dict(personal)))
        return original_start(plan, initial, personal)

    original_train = engine.train

    def spy_train(plans):
        training["on"] = True
        try:
            return original_train(plans)
        finally:
            training["on"] = False

    def spy_finish(plan, trained, personal, stats):
        upload, keep = original_finish(plan, trained, personal, stats)
        kept[(plan.round, plan.client_id)] = keep
        return upload, keep

    method.start_state, method.finish = spy_start, spy_finish  # type: ignore[method-assign]
    engine.train = spy_train  # type: ignore[method-assign]
    server = method.init_server(engine.initial)
    for rnd, clients in enumerate([[0, 1, 2, 3], [1, 3], [0, 1, 2, 3]]):
        server, _ = run_round(rnd, method, server, engine, clients=clients)
    last: dict[int, int] = {}
    for rnd, cid, personal in starts:
        if rnd == 0 or personal is None:
            assert cid not in last
        else:
            own = kept[(last[cid], cid)]
            assert personal.keys() == own.keys()
            assert all(torch.equal(personal[k], own[k]) for k in own)
        last[cid] = rnd
    assert last == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len(starts) == 10
    # a client whose reply is rejected keeps the personal state it had (the engine commits accepted ones only)
    before = {k: v.clone() for k, v in engine.personal[2].items()}
    engine.train([method.plan(3, 2, server)])
    engine.accept([])
    assert all(torch.equal(engine.personal[2][k], v) for k, v in before.items())


def test_codecs_in_a_real_run_count_encoded_bytes_and_still_learn(tiny_bert: str, tmp_path) -> None:
    """int8 up, fp16 down for FedIT: the run learns, and the bytes are those of the encoded payloads."""
    plain = run(tiny_config(tiny_bert, tmp_path, run_name="plain", rounds=3))
    coded = run(
        tiny_config(tiny_bert, tmp_path, run_name="coded", rounds=3, upload_codec="int8", download_codec="fp16")
    )
    setup = build(resolve_config(coded.config))
    tensors = len(setup.layout.all_keys)
    for p, c in zip(plain.history, coded.history, strict=True):
        # int8: 1 byte per value + a 4-byte scale per tensor (vs 4 bytes per value); fp16: 2 bytes per value
        values = p["bytes_up"] // 4
        assert c["bytes_up"] == values + 4 * tensors * len(c["clients"])
        assert c["bytes_down"] == p["bytes_down"] // 2
    assert coded.final["global_accuracy"] > LEARN_BOUND
    assert abs(coded.final["global_accuracy"] - plain.final["global_accuracy"]) < 0.1


def test_initial_evaluation_is_the_untrained_model(tiny_bert: str, tmp_path) -> None:
    """``initial.json`` holds the model before round 1: with lr 0 a round changes nothing, so round 1's global
    metrics equal it; with training they differ. ``eval_initial=False`` writes none."""
    frozen = run(tiny_config(tiny_bert, tmp_path, run_name="frozen", rounds=1, lr=0.0, min_cosine=None))
    trained = run(tiny_config(tiny_bert, tmp_path, run_name="trained", rounds=1))
    initial = json.loads((frozen.run_dir / "initial.json").read_text())
    assert set(initial) == {"global_accuracy", "global_loss"} and initial == frozen.initial
    assert initial["global_accuracy"] == frozen.final["global_accuracy"]
    assert initial["global_loss"] == pytest.approx(frozen.final["global_loss"], rel=1e-5)
    assert trained.initial == initial  # same seed, same starting model
    assert trained.final["global_loss"] < initial["global_loss"] - 0.01
    assert json.loads((trained.run_dir / "summary.json").read_text())["initial"] == initial
    off = run(tiny_config(tiny_bert, tmp_path, run_name="off", rounds=1, eval_initial=False))
    assert off.initial == {} and not (off.run_dir / "initial.json").exists()
    assert "initial" not in json.loads((off.run_dir / "summary.json").read_text())


def test_initial_evaluation_of_a_personalised_method(tiny_bert: str, tmp_path) -> None:
    result = run(tiny_config(tiny_bert, tmp_path, method="fedsa_lora", rounds=1))
    assert {"personal_accuracy", "personal_loss"} <= set(result.initial)
    assert "global_accuracy" not in result.initial  # fedsa_lora has no global model
