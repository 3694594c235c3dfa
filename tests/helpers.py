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
