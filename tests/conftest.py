"""Shared fixtures: hand-built adapter layouts and client updates, and one torch thread for the suite."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import HEAD, random_state

from fedlora.adapters import LoraLayout, LoraModuleSpec
from fedlora.methods import ClientUpdate

torch.set_num_threads(int(os.environ.get("FEDLORA_TEST_THREADS", "1")))


@pytest.fixture
def layout() -> LoraLayout:
    """Two modules, one non-square (a transpose error changes the result) and one Conv1D-style, plus a head."""
    return LoraLayout(
        modules=(
            LoraModuleSpec("enc.q", in_features=4, out_features=6, rank=2, lora_alpha=4.0),
            LoraModuleSpec("enc.c_attn", in_features=5, out_features=7, rank=3, lora_alpha=3.0, fan_in_fan_out=True),
        ),
        other_keys=(HEAD,),
    )


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def updates(layout: LoraLayout, gen: torch.Generator) -> list[ClientUpdate]:
    """Three clients with different data sizes (10, 30, 60) and equal samples seen."""
    return [
        ClientUpdate(client_id=k, state=random_state(layout, gen), num_examples=n, samples_seen=40)
        for k, n in enumerate((10, 30, 60))
    ]


def _build_tiny_bert(path) -> str:
    """A 2-layer, 64-wide BERT built from a config, with the default model's tokenizer.

    Its transformer weights are random; its word embeddings are the default model's, projected to 64 dims by
    PCA, so that LoRA on a frozen random encoder learns the default task within seconds.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.models import default_model_dir

    torch.manual_seed(0)
    hidden = 64
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        initializer_range=0.1,
        hidden_dropout_prob=0.0,  # the frozen model's own dropout: ~20% of a test run's time, nothing to test
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg)
    src = default_model_dir()
    weights = load_file(str(src / "model.safetensors"))
    emb = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight")).float()
    emb = emb - emb.mean(0)
    _, _, v = torch.pca_lowrank(emb, q=hidden, center=False)
    proj = emb @ v[:, :hidden]
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(proj / proj.std() * 0.2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return str(path)


def _build_tiny_gpt2(path) -> str:
    """A 2-layer GPT-2 (Conv1D layers: base weights stored (in, out)) with the default model's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from fedlora.models import default_model_dir

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=30522,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return _build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return _build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
