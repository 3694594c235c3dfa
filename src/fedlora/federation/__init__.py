"""The round logic shared by every engine: sampling, plans, reply validation, aggregation, evaluation, bytes."""

from fedlora.federation.round import Ledger, RoundReport, Runtime, run_round, sample_clients, validate_update

__all__ = ["Ledger", "RoundReport", "Runtime", "run_round", "sample_clients", "validate_update"]
