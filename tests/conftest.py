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
