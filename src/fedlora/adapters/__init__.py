"""Adapter state and LoRA algebra (pure tensors), plus the bridge to a live peft model."""

from fedlora.adapters.algebra import (
    LowRankTerm,
    SVDFactors,
    dense_sum,
    dense_svd,
    factored_svd,
    fresh_lora_factors,
    stack_terms,
)
from fedlora.adapters.state import (
    AdapterState,
    LoraLayout,
    LoraModuleSpec,
    clone_state,
    delta_weight,
    factors,
    state_bytes,
    subset,
    to_base_layout,
    weighted_mean,
)

__all__ = [
    "AdapterState",
    "LoraLayout",
    "LoraModuleSpec",
    "LowRankTerm",
    "SVDFactors",
    "clone_state",
    "delta_weight",
    "dense_sum",
    "dense_svd",
    "factored_svd",
    "factors",
    "fresh_lora_factors",
    "stack_terms",
    "state_bytes",
    "subset",
    "to_base_layout",
    "weighted_mean",
]
