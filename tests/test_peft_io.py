"""The bridge to a live peft model: in-place adapter slots and writes into the frozen base (layout rule)."""

from __future__ import annotations

import pytest
import torch
from helpers import LORA_KW

from fedlora.adapters import LoraLayout
from fedlora.adapters.peft_io import AdapterSlots, add_to_base, base_weights
from fedlora.models.loading import load_sequence_classifier, wrap_lora

KW = LORA_KW


@pytest.fixture
def gpt2(tiny_gpt2: str):
    model = wrap_lora(load_sequence_classifier(tiny_gpt2, 3, seed=0), **KW)
    return model, LoraLayout.from_peft_model(model)


def test_slots_load_read_in_place(gpt2) -> None:
    model, layout = gpt2
    slots = AdapterSlots(model)
    assert set(slots.keys) == set(layout.all_keys)
    state = {k: torch.randn_like(v) for k, v in slots.read().items()}
    ptrs = {k: p.data_ptr() for k, p in slots.params.items()}
    slots.load(state)
    assert all(slots.params[k].data_ptr() == ptrs[k] for k in ptrs)  # no new tensors: copied in place
    for k, v in slots.read().items():
        assert torch.equal(v, state[k])
    trainable = slots.set_trainable(layout.b_keys)
    assert len(trainable) == len(layout.b_keys)
    assert all(not slots.params[k].requires_grad for k in layout.a_keys)
    with pytest.raises(ValueError, match="shape"):
        slots.load({layout.a_keys[0]: torch.zeros(1, 1)})
    with pytest.raises(KeyError):
        slots.load({"nope": torch.zeros(1)})


def test_add_to_base_respects_conv1d_layout(gpt2) -> None:
    model, layout = gpt2
    spec = layout.modules[0]
    assert spec.fan_in_fan_out and (spec.in_features, spec.out_features) == (32, 96)
    layer = dict(model.named_modules())[spec.name]
    x = torch.randn(5, spec.in_features)
    before = layer.get_base_layer()(x)
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(spec.out_features, 2, generator=gen), torch.randn(2, spec.in_features, generator=gen)
    add_to_base(model, layout, {spec.name: (b, a)})  # factored
    # y = W x + b in nn.Linear terms: the (out, in) delta must act as x @ Δᵀ
    torch.testing.assert_close(layer.get_base_layer()(x), before + x @ (b @ a).T, rtol=1e-4, atol=1e-4)
    add_to_base(model, layout, {spec.name: -(b @ a)})  # dense, undoes it
    torch.testing.assert_close(layer.get_base_layer()(x), before, rtol=1e-4, atol=1e-4)
    assert base_weights(model, layout)[spec.name].shape == (32, 96)
