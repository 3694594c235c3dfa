"""The registry of federated LoRA methods; importing this package registers every built-in method."""

from fedlora.methods import fedex_lora, fedit, fedsa_lora, ffa_lora, flexlora, flora, rolora  # noqa: F401
from fedlora.methods.base import (
    WEIGHTINGS,
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ServerState,
    build_method,
    derive_seed,
    get_method_class,
    method_ids,
    register_method,
)

__all__ = [
    "WEIGHTINGS",
    "AggregateResult",
    "ClientPlan",
    "ClientUpdate",
    "FedMethod",
    "ServerState",
    "build_method",
    "derive_seed",
    "get_method_class",
    "method_ids",
    "register_method",
]
