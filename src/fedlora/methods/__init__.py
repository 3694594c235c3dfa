"""The registry of federated methods; importing this package registers every built-in method.

Every module of this package except ``base`` defines and registers methods (``@register_method``); they are
imported here by discovery, so adding a method is adding a module.
"""

import importlib
import pkgutil

from fedlora.methods.base import (
    WEIGHTINGS,
    AggregateResult,
    BaseUpdate,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    MethodContext,
    ModuleRank,
    OptionError,
    ServerState,
    Stage,
    TensorSpec,
    TrainStats,
    build_method,
    canonical_id,
    derive_seed,
    describe_options,
    get_method_class,
    method_ids,
    option,
    parse_options,
    register_method,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "WEIGHTINGS",
    "AggregateResult",
    "BaseUpdate",
    "ClientPlan",
    "ClientUpdate",
    "FedMethod",
    "MethodContext",
    "ModuleRank",
    "OptionError",
    "ServerState",
    "Stage",
    "TensorSpec",
    "TrainStats",
    "build_method",
    "canonical_id",
    "derive_seed",
    "describe_options",
    "get_method_class",
    "method_ids",
    "option",
    "parse_options",
    "register_method",
]
