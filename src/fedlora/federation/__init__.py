"""The round logic and the run loop shared by every engine: sampling, plans, reply validation, aggregation,
evaluation, bytes, checkpoints and resume."""

from fedlora.federation.loop import (
    LoopHooks,
    MemoryStore,
    RunStalled,
    Schedule,
    Store,
    budget_stop,
    privacy_metrics,
    run_federation,
    start_state,
)
from fedlora.federation.round import (
    RoundPolicy,
    RoundReport,
    Runtime,
    base_update_for,
    decode_reply,
    prepare_plan,
    run_round,
    sample_clients,
    validate_update,
)

__all__ = [
    "LoopHooks",
    "MemoryStore",
    "RoundPolicy",
    "RoundReport",
    "RunStalled",
    "Runtime",
    "Schedule",
    "Store",
    "base_update_for",
    "budget_stop",
    "decode_reply",
    "prepare_plan",
    "privacy_metrics",
    "run_federation",
    "run_round",
    "sample_clients",
    "start_state",
    "validate_update",
]
