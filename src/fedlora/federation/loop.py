"""The one run loop every engine uses: sampling, rounds, checkpoints and resume.

It is free of file formats: a :class:`Store` (the run directory, or anything with the same methods) keeps the
metrics and checkpoints, a :class:`fedlora.federation.round.Runtime` does the client work, and
:class:`LoopHooks` let a caller show progress. A Flower ServerApp calls :func:`run_federation` with its own runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedlora.adapters.state import AdapterState
from fedlora.federation.round import RoundReport, Runtime, run_round, sample_clients
from fedlora.methods.base import FedMethod, ServerState

log = logging.getLogger("fedlora")


class Store(Protocol):
    """Where a run keeps what must survive a crash."""

    def append_metrics(self, record: Mapping[str, Any]) -> None: ...

    def truncate_metrics(self, rounds_done: int) -> None: ...

    def save_checkpoint(
        self,
        server: ServerState,
        clients: Mapping[int, AdapterState],
        weights: Mapping[str, torch.Tensor],
    ) -> Any: ...

    def load_latest(
        self,
    ) -> tuple[ServerState, dict[int, AdapterState], dict[str, torch.Tensor]] | None: ...


class LoopHooks:
    """Callbacks of the run loop (progress display); the defaults do nothing."""

    def start_round(self, rnd: int, clients: list[int]) -> None: ...

    def end_round(self, report: RoundReport) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """How many rounds, and which clients take part in each (seeded)."""

    rounds: int
    num_clients: int
    seed: int = 0
    clients_per_round: int | None = None
    client_fraction: float | None = None

    def clients(self, rnd: int) -> list[int]:
        return sample_clients(
            self.num_clients, rnd, self.seed, per_round=self.clients_per_round, fraction=self.client_fraction
        )


def start_state(
    method: FedMethod, runtime: Runtime, store: Store, initial: AdapterState, *, resume: bool
) -> ServerState:
    """A fresh server state, or the latest checkpoint's (restoring the runtime's client state and base weights)."""
    if not resume:
        return method.init_server(initial)
    found = store.load_latest()
    if found is None:
        raise FileNotFoundError("no complete checkpoint to resume from")
    server, clients, weights = found
    runtime.restore(server, clients, weights)
    store.truncate_metrics(server.round)
    log.info("resuming after round %d", server.round)
    return server


def run_federation(
    method: FedMethod,
    runtime: Runtime,
    store: Store,
    schedule: Schedule,
    server: ServerState,
    hooks: LoopHooks | None = None,
) -> ServerState:
    """Run rounds ``server.round .. schedule.rounds - 1``, checkpointing after each; returns the final state."""
    hooks = hooks or LoopHooks()
    for rnd in range(server.round, schedule.rounds):
        clients = schedule.clients(rnd)
        hooks.start_round(rnd, clients)
        server, report = run_round(rnd, method, server, runtime, clients=clients)
        store.append_metrics(report.record())
        store.save_checkpoint(server, runtime.client_states(), runtime.base_weights() if method.changes_base else {})
        hooks.end_round(report)
    return server
