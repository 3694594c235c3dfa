"""The causal-LM task: response-only loss, prompt layouts, generation metrics, tiny Llama / GPT-2 runs, peft reload,
the GGUF conversion cache, and one run of the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch

from fedlora import RunConfig, run
from fedlora.config import ConfigError
from fedlora.tasks import get_task
from fedlora.tasks.base import Encoded
from fedlora.tasks.causal_lm import (
    IGNORE,
    CausalLM,
    LMTargets,
    exact_match,
    generate_answers,
    generate_ids,
    rouge_l,
    stop_ids,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A SmolLM2-like template: a default system turn, then ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
LABELS = ["noun.animal", "noun.food", "noun.plant"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_tokenizer(chat: bool = True):
    """A byte-level BPE (GPT-2 style, 600 tokens) trained on the WordNet definitions, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedlora.data.definitions import definitions_dataset

    ds = definitions_dataset()
    texts = [t for pair in zip(ds["text"][:4000:2], ds["response"][:4000:2], strict=True) for t in pair]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts + ["user assistant system You are a test model. Define the word"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.pad_token = fast.eos_token
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> str:
    """A 2-layer, 64-wide random Llama (tied embeddings, weights drawn with std 0.2) with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # at 0.02 the tied logits are nearly uniform and LoRA on q/v barely moves them
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def _lm_config(model: str, tmp_path, **kw) -> RunConfig:
    base = dict(
        task="causal-lm",
        model=model,
        labels=LABELS,
        partition="natural:label",
        clients=3,
        rounds=3,
        max_examples_per_label=40,
        local_epochs=3,
        batch_size=8,
        lr=3e-2,
        eval_generations=4,
        max_new_tokens=12,
        global_test_fraction=0.15,
        progress=False,
        out_dir=str(tmp_path),
        threads=1,
    )
    base.update(kw)
    return RunConfig(**base)


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are given per example: ``rows[token ids of the example][t]``."""

    def __init__(self, rows: dict[tuple[int, ...], torch.Tensor]) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
        width = input_ids.shape[1]
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask, strict=True)]
        return SimpleNamespace(logits=torch.stack([self.rows[k][:width] for k in keys]))


# ---------------------------------------------------------------------------------------------- loss masking
def test_loss_counts_response_tokens_only() -> None:
    """Two examples (prompt 3 + response 2 tokens; prompt 2 + response 1 token, padded): labels mask prompt and
    padding, and the loss is the mean over examples of each one's mean NLL of its response tokens."""
    task = CausalLM()
    enc = Encoded(input_ids=[[5, 6, 7, 1, 2], [5, 6, 3]], targets=LMTargets([3, 2], ["x", "y"]))
    batch = task.collate(enc, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2], [5, 6, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 1, 2], [IGNORE, IGNORE, 3, IGNORE, IGNORE]]

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, generator=gen)
    logp = logits.log_softmax(-1)
    # position t predicts token t+1: example 0's response tokens 1, 2 are predicted at positions 2, 3
    ex0 = -(logp[0, 2, 1] + logp[0, 3, 2]) / 2
    ex1 = -logp[1, 1, 3]
    expected = (ex0 + ex1) / 2
    model = _FixedLogits({(5, 6, 7, 1, 2): logits[0], (5, 6, 3): logits[1]})
    got = task.loss(model, batch)
    torch.testing.assert_close(got, expected)
    # the prompt's own tokens (6, 7 of example 0) would change it: they are not counted
    prompt_nll = -(logp[0, 0, 6] + logp[0, 1, 7])
    assert not torch.isclose(got, (ex0 * 2 + prompt_nll) / 4 / 2 + ex1 / 2)

    metrics = CausalLM(eval_generations=0).evaluate(model, enc, batch_size=1, pad_id=0)
    token_mean = (-(logp[0, 2, 1] + logp[0, 3, 2]) + ex1) / 3  # held-out loss: mean per response token
    assert metrics["loss"] == pytest.approx(float(token_mean), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(float(token_mean)), rel=1e-5)
    assert metrics["examples"] == 2


# ---------------------------------------------------------------------------------------------- prompt layout
def test_chat_template_and_plain_layout(tiny_tokenizer) -> None:
    task = CausalLM()
    prompt_ids, response_ids = task.tokenize(tiny_tokenizer, "Define the word dog.", "a domestic canine")
    assert tiny_tokenizer.decode(prompt_ids) == (
        "<|im_start|>system\nYou are a test model.<|im_end|>\n<|im_start|>user\nDefine the word dog.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(response_ids) == "a domestic canine<|im_end|>\n"
    # generation gets exactly the training prefix
    assert task.tokenize(tiny_tokenizer, "Define the word dog.")[0] == prompt_ids
    own = CausalLM(system_prompt="Be brief.").tokenize(tiny_tokenizer, "Define the word dog.", "x")[0]
    assert tiny_tokenizer.decode(own).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")

    plain_tok = _tiny_tokenizer(chat=False)
    p, r = CausalLM().tokenize(plain_tok, "Define the word dog.", "a domestic canine")  # auto: no template
    assert plain_tok.decode(p) == "Define the word dog.\n"
    assert r[-1] == plain_tok.eos_token_id and plain_tok.decode(r[:-1]) == "a domestic canine"
    assert (
        CausalLM(prompt_format="plain").tokenize(tiny_tokenizer, "Hi", "yo")[0]
        == p[:0] + plain_tok("Hi\n")["input_ids"]
    )
    with pytest.raises(ConfigError, match="no chat template"):
        CausalLM(prompt_format="chat").tokenize(plain_tok, "Hi", "yo")


def test_encode_cuts_at_max_length_and_drops_prompt_only_examples(tiny_tokenizer) -> None:
    task = CausalLM()
    data = {"text": ["Define the word dog.", "Define the word " + "very " * 40 + "long."], "response": ["a b c"] * 2}
    p, r = task.tokenize(tiny_tokenizer, data["text"][0], "a b c")
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        enc = task.encode(tiny_tokenizer, data, max_length=len(p) + 2)
    assert len(enc) == 1 and enc.input_ids[0] == (p + r)[: len(p) + 2] and enc.targets.prompt_lengths == [len(p)]
    with pytest.raises(ConfigError, match="raise --max-length"):
        task.encode(tiny_tokenizer, data, max_length=len(p))


# ---------------------------------------------------------------------------------------------- metrics
def test_generation_metrics_on_known_strings() -> None:
    assert exact_match("A domestic dog.", "a  domestic dog") == 1.0
    assert exact_match("a domestic cat", "a domestic dog") == 0.0
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": P = R = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS 2 ("a", "dog"): P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge_l("a dog", "a big brown dog") == pytest.approx(2 / 3)
    assert rouge_l("", "a dog") == 0.0 and rouge_l("xyz", "a dog") == 0.0
    assert rouge_l("a dog", "a dog") == 1.0


class _Echo(torch.nn.Module):
    """Generates fixed answers (by prompt length) and has uniform logits."""

    def __init__(self, answers: dict[int, list[int]], vocab: int) -> None:
        super().__init__()
        self.answers, self.vocab = answers, vocab

    def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))

    def generate(self, input_ids, attention_mask, generation_config):  # noqa: ANN001, ANN201
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            rows.append(ids.tolist() + self.answers[int(mask.sum())])
        width = max(map(len, rows))
        return torch.tensor([r + [generation_config.pad_token_id] * (width - len(r)) for r in rows])


def test_evaluate_scores_greedy_answers(tiny_tokenizer) -> None:
    """exact_match and rougeL of the answers to the first eval_generations prompts, against their references."""
    task = CausalLM(eval_generations=2)
    data = {"text": ["Define the word dog.", "Define the word cat!", "Define the word eel."], "response": []}
    data["response"] = ["a domestic canine", "a small feline", "an eel"]
    enc = task.encode(tiny_tokenizer, data, max_length=128)
    lengths = enc.targets.prompt_lengths
    assert lengths[0] != lengths[1]
    say = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tiny_tokenizer.eos_token_id]
    model = _Echo(
        {lengths[0]: say("A domestic canine.") + eos, lengths[1]: say("a feline pet") + eos}, len(tiny_tokenizer)
    )
    m = task.evaluate(model, enc, batch_size=8, pad_id=tiny_tokenizer.pad_token_id)
    assert m["exact_match"] == 0.5  # the third example is not generated
    assert m["rougeL"] == pytest.approx((1.0 + rouge_l("a feline pet", "a small feline")) / 2)
    assert m["loss"] == pytest.approx(math.log(len(tiny_tokenizer)))


def test_batched_generation_equals_one_by_one(tiny_llama, tiny_tokenizer) -> None:
    """Left padding and the attention mask make a batch's greedy answers those of each prompt alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = [CausalLM().tokenize(tiny_tokenizer, f"Define the word {w}.")[0] for w in ("dog", "hippopotamus", "a")]
    assert len({len(p) for p in prompts}) == 3
    pad = tiny_tokenizer.pad_token_id
    stop = stop_ids(model, tiny_tokenizer)
    together = generate_ids(model, prompts, pad, 8, stop)
    alone = [generate_ids(model, [p], pad, 8, stop)[0] for p in prompts]
    assert together == alone and all(together)
    assert all(len(row) == 8 or row[-1] in stop for row in together)
    assert generate_answers(model, tiny_tokenizer, prompts, pad, 8) == [
        tiny_tokenizer.decode(row, skip_special_tokens=True).strip() for row in together
    ]


# ---------------------------------------------------------------------------------------------- data
def test_definitions_dataset_and_supersense_partition() -> None:
    from fedlora.data import prepare_federated_data
    from fedlora.data.definitions import definitions_dataset

    ds = definitions_dataset()
    row = ds.filter(lambda r: r["synset"] == "02084071-n")[0]  # dog, domestic dog, Canis familiaris
    assert row["text"] == "Define the word dog." and row["label"] == "noun.animal"
    assert row["response"].startswith("a member of the genus Canis")
    data = prepare_federated_data(
        "wordnet-definitions",
        num_clients=3,
        partition="natural:label",
        labels=LABELS,
        max_examples_per_label=20,
        extra_columns={"response": "response"},
    )
    assert data.label_names == LABELS
    for client in data.clients:  # one supersense per client
        assert len(set(client.train["label"]) | set(client.test["label"])) == 1
        assert all(t.startswith("Define the word ") for t in client.train["text"])
        assert all(r for r in client.train["response"])
    assert set(data.test.column_names) == {"text", "label", "response"}


def test_resolve_config_uses_the_tasks_defaults() -> None:
    from fedlora.api import resolve_config

    cfg = resolve_config(RunConfig(task="causal-lm"))
    assert (cfg.model, cfg.dataset, cfg.max_examples_per_label) == ("smollm2-135m-instruct", "wordnet-definitions", 16)
    assert len(cfg.labels) == 8
    plain = resolve_config(RunConfig())
    assert (plain.model, plain.dataset, plain.max_examples_per_label) == ("default", "default", 300)


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def lm_run(tiny_llama, tmp_path_factory):
    """A 3-round run of the tiny Llama (3 clients, one supersense each) and its held-out loss before training."""
    from fedlora.api import build, resolve_config

    cfg = _lm_config(tiny_llama, tmp_path_factory.mktemp("lm-runs"), run_name="llama")
    setup = build(resolve_config(cfg))
    from fedlora.methods import ServerState

    start = setup.engine.evaluate_global(ServerState(round=0, adapter=setup.engine.initial))
    return run(cfg), start


LOSS_DROP = 0.5
"""The tiny random Llama's held-out loss per response token falls by at least this many nats in 3 rounds
(measured: 7.57 before training, then 7.20, 6.97, 6.83)."""


def test_tiny_llama_run_learns_and_reports_task_metrics(lm_run) -> None:
    result, start = lm_run
    losses = [h["global_loss"] for h in result.history]
    assert start["global_loss"] - losses[-1] > LOSS_DROP, (start, losses)
    assert losses[-1] < losses[0]
    final = result.final
    assert final["global_perplexity"] == pytest.approx(math.exp(final["global_loss"]))
    assert 0.0 <= final["global_rougeL"] <= 1.0 and 0.0 <= final["global_exact_match"] <= 1.0
    assert "global_accuracy" not in final
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"global_loss", "global_rougeL"} <= set(r) for r in records)
    assert (result.run_dir / "metrics.png").stat().st_size > 10_000
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final"]["global_loss"] == final["global_loss"]
    adapter_cfg = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM" and set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}


def test_saved_adapter_generates_the_same_text_in_peft(lm_run, tiny_llama) -> None:
    """PeftModel.from_pretrained(base, run/adapter) answers exactly as the trained federated model does, and
    differently from the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.adapters.peft_io import AdapterSlots
    from fedlora.api import build, resolve_config

    result, _ = lm_run
    setup = build(resolve_config(result.config))
    AdapterSlots(setup.model).load(result.global_adapter)
    enc = setup.engine.global_test
    index = list(range(min(6, len(enc))))
    ours = setup.task.generate(setup.model.eval(), enc, index, setup.pad_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    untrained = setup.task.generate(base.eval(), enc, index, setup.pad_id)
    reloaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    theirs = setup.task.generate(reloaded, enc, index, setup.pad_id)
    assert theirs == ours
    assert theirs != untrained
    batch = setup.task.collate(enc, index, setup.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, setup.model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_personalised_method_reports_personal_task_metrics(tiny_llama, tmp_path) -> None:
    result = run(
        _lm_config(tiny_llama, tmp_path, method="fedsa_lora", rounds=1, eval_generations=1, max_examples_per_label=16)
    )
    final = result.final
    assert {"personal_loss", "personal_perplexity", "personal_rougeL", "personal_exact_match"} <= set(final)
    assert math.isfinite(final["personal_loss"])


def test_gpt2_conv1d_targets(tiny_tokenizer, tmp_path) -> None:
    """GPT-2 keeps its attention in a Conv1D ``c_attn`` (weight stored (in, out)): the default target, adapted with
    fan_in_fan_out, trains, and the saved adapter reloads in peft with the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from fedlora.adapters.peft_io import AdapterSlots
    from fedlora.api import build, resolve_config

    torch.manual_seed(0)
    gpt2_cfg = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(gpt2_cfg).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    cfg = _lm_config(str(tmp_path / "gpt2"), tmp_path, rounds=2, max_examples_per_label=16, eval_generations=2)
    setup = build(resolve_config(cfg))
    assert [s.fan_in_fan_out for s in setup.layout.modules] == [True, True]
    assert all(s.name.endswith("c_attn") for s in setup.layout.modules)
    result = run(cfg)
    assert result.final["global_loss"] < result.history[0]["global_loss"] + 1e-6
    AdapterSlots(setup.model).load(result.global_adapter)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2")), str(result.run_dir / "adapter")
    ).eval()
    batch = setup.task.collate(setup.engine.global_test, [0, 1], setup.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, setup.model.eval()(**inputs).logits)


def test_unknown_architecture_needs_target_modules(tiny_llama) -> None:
    from fedlora.models import ModelError, default_target_modules
    from fedlora.models.loading import load_causal_lm, wrap_lora

    model = load_causal_lm(tiny_llama, seed=0)
    model.config.model_type = "mystery-lm"
    with pytest.raises(ModelError, match="--target-modules"):
        default_target_modules(model)
    wrapped = wrap_lora(
        model,
        task_type="CAUSAL_LM",
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["o_proj"],
        modules_to_save=None,
        use_rslora=False,
        init_lora_weights="default",
        seed=0,
    )
    assert any(n.endswith("o_proj.lora_A.default.weight") for n, _ in wrapped.named_parameters())


def test_classification_model_is_refused_with_a_clear_message(tmp_path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    from fedlora.models import ModelError
    from fedlora.models.loading import load_causal_lm

    cfg = DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16)
    DistilBertModel(cfg).save_pretrained(tmp_path / "enc")  # an encoder without a causal-LM class
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm(str(tmp_path / "enc"), seed=0)


# ---------------------------------------------------------------------------------------------- GGUF cache
def _write_tiny_gguf(path, tokenizer) -> None:
    """A GGUF file (llama architecture, float32 tensors, GPT-2 style BPE tokenizer with a chat template) of a random
    2-layer, 32-wide model, written like llama.cpp's converter lays one out."""
    import gguf
    import numpy as np

    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    hidden, ff, layers, heads, kv_heads = 32, 64, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(len(tokens), hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(hidden // heads * kv_heads, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(hidden // heads * kv_heads, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-model.gguf"
    _write_tiny_gguf(path, tiny_tokenizer)
    return path


def test_gguf_conversion_is_cached_verified_and_rebuilt(tiny_gguf, tiny_tokenizer, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from fedlora.models import gguf as g
    from fedlora.models import load_tokenizer, resolve_model

    target = g.gguf_checkpoint(tiny_gguf)
    assert g.verify_checkpoint(target) is None
    marker = json.loads((target / g.MARKER).read_text())
    assert marker["source_sha256"] == g.sha256_file(tiny_gguf) and "model.safetensors" in marker["files"]
    # the converted model is the GGUF's: same logits as loading the GGUF itself
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits)
    tok = load_tokenizer(str(tiny_gguf))  # a .gguf model path resolves to the converted directory
    assert tok("Define the word dog.")["input_ids"] == tiny_tokenizer("Define the word dog.")["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE

    calls = []
    real_convert = g.convert_gguf
    monkeypatch.setattr(g, "convert_gguf", lambda *a, **k: calls.append(1) or real_convert(*a, **k))
    assert resolve_model(str(tiny_gguf)) == str(target) and not calls  # reused, not converted again

    weights = target / "model.safetensors"
    with weights.open("r+b") as f:  # corrupted in place (same size): the digest catches it
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00" * 64)
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert "sha256" in g.verify_checkpoint(target)
    assert g.gguf_checkpoint(tiny_gguf) == target and len(calls) == 1
    assert g.verify_checkpoint(target) is None

    (target / g.MARKER).unlink()  # a conversion that died before its marker: rebuilt
    assert "did not finish" in g.verify_checkpoint(target)
    g.gguf_checkpoint(tiny_gguf)
    assert len(calls) == 2 and g.verify_checkpoint(target) is None
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary or stale directories


def test_concurrent_conversions_are_safe(tiny_gguf, monkeypatch) -> None:
    """Another process finishes the same conversion while this one converts: each writes its own temporary
    directory, the first rename wins, and this one finds the finished directory, uses it and leaves no debris."""
    from fedlora.models import gguf as g

    real_convert = g.convert_gguf
    raced = []

    def convert_while_another_process_wins(gguf_path, out, **kw):  # noqa: ANN001, ANN202
        if not raced:
            raced.append(out)
            target = out.parent / out.name[1:].split(".tmp-")[0]
            other = out.parent / f".{target.name}.tmp-other"
            other.mkdir()
            real_convert(gguf_path, other, **kw)
            os.rename(other, target)
        return real_convert(gguf_path, out, **kw)

    monkeypatch.setattr(g, "convert_gguf", convert_while_another_process_wins)
    target = g.gguf_checkpoint(tiny_gguf)
    assert raced and raced[0].parent == target.parent and not raced[0].exists()
    assert g.verify_checkpoint(target) is None
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_gguf_with_wrong_digest_is_refused(tiny_gguf) -> None:
    from fedlora.models import ModelError
    from fedlora.models import gguf as g

    with pytest.raises(ModelError, match="corrupt"):
        g.gguf_checkpoint(tiny_gguf, name="x", sha256="0" * 64)


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_smollm2_run(tmp_path) -> None:
    """The embedded SmolLM2-135M-Instruct (converted once into the user's cache, about 25 s): two clients, one round
    on a few definitions; the held-out loss falls and the saved adapter answers the same in peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.adapters.peft_io import AdapterSlots
    from fedlora.api import build, resolve_config
    from fedlora.methods import ServerState
    from fedlora.models.gguf import smollm2_dir

    cfg = RunConfig(
        task="causal-lm",
        clients=2,
        rounds=1,
        labels=["noun.animal", "noun.food"],
        partition="natural:label",
        max_examples_per_label=5,
        global_test_fraction=0.2,
        client_test_fraction=0.0,
        max_length=48,
        system_prompt="",
        eval_generations=1,
        max_new_tokens=8,
        progress=False,
        out_dir=str(tmp_path),
        threads=1,
    )
    setup = build(resolve_config(cfg))
    start = setup.engine.evaluate_global(ServerState(round=0, adapter=setup.engine.initial))
    result = run(cfg)
    assert result.config.model == "smollm2-135m-instruct"
    assert result.final["global_loss"] < start["global_loss"], (start, result.final)
    AdapterSlots(setup.model).load(result.global_adapter)
    enc = setup.engine.global_test
    ours = setup.task.generate(setup.model.eval(), enc, [0], setup.pad_id)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(smollm2_dir())), str(result.run_dir / "adapter")
    ).eval()
    assert setup.task.generate(reloaded, enc, [0], setup.pad_id) == ours
    assert json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_get_task_builds_from_config() -> None:
    task = get_task("causal-lm", RunConfig(task="causal-lm", eval_generations=3, system_prompt="S"))
    assert isinstance(task, CausalLM) and task.eval_generations == 3 and task.system_prompt == "S"
    assert task.extra_columns == {"response": "response"}


def test_a_flower_node_holds_its_own_prompt_response_file(tiny_llama, tmp_path) -> None:
    """``fedlora node --data`` with the causal-LM task: the node's client trains on the file's prompts and
    responses (the response column travels with them); a file without the response column is refused by name."""
    import json

    pytest.importorskip("flwr")
    from fedlora.api import resolve_config
    from fedlora.data import DataError, load_client_file
    from fedlora.flower.node import NodeSession

    rows = [
        {"prompt": f"Define the word w{i}.", "answer": f"gloss number {i}", "sense": LABELS[i % 2]} for i in range(12)
    ]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = resolve_config(
        _lm_config(
            tiny_llama, tmp_path, clients=2, text_column="prompt", response_column="answer", label_column="sense"
        )
    )
    session = NodeSession(cfg, data_file=str(path), client_id=1, labels=tuple(LABELS))
    mine = load_client_file(
        str(path),
        client_id=1,
        label_names=LABELS,
        text_column="prompt",
        label_column="sense",
        client_test_fraction=cfg.client_test_fraction,
        seed=cfg.seed,
        extra_columns={"response": "answer"},
    )
    by_prompt = {r["prompt"]: r["answer"] for r in rows}
    assert len(mine.train) + len(mine.test) == 12 and all(by_prompt[r["text"]] == r["response"] for r in mine.train)
    assert session.hello(1)["num_examples"] == len(session.engine.clients[1].train) == len(mine.train)
    with pytest.raises(DataError, match="response column 'reply'"):
        load_client_file(
            str(path),
            client_id=1,
            label_names=LABELS,
            text_column="prompt",
            label_column="sense",
            extra_columns={"response": "reply"},
        )
