"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from fedlora.adapters import LoraLayout

HEAD = "head.weight"


def random_state(layout: LoraLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for spec in layout.modules:
        state[spec.a_key] = torch.randn(spec.rank, spec.in_features, generator=gen)
        state[spec.b_key] = torch.randn(spec.out_features, spec.rank, generator=gen)
    state[HEAD] = torch.randn(3, 5, generator=gen)
    return state


LORA_KW = dict(
    task_type="SEQ_CLS",
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=None,
    modules_to_save=None,
    use_rslora=False,
    init_lora_weights="default",
    seed=0,
)
"""Arguments of ``fedlora.models.loading.wrap_lora`` for the tiny test models."""
