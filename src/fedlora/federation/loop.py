"""The one run loop every engine uses: sampling, rounds, checkpoints and resume.

It is free of file formats: a :class:`Store` (the run directory, or anything with the same methods) keeps the
metrics and checkpoints, a :class:`fedlora.federation.round.Runtime` does the client work, and
:class:`LoopHooks` let a caller show progress. A Flower ServerApp calls :func:`run_federation` with its own runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedlora.adapters.state import AdapterState
from fedlora.federation.round import RoundPolicy, RoundReport, Runtime, run_round, sample_clients, sample_size
from fedlora.methods.base import FedMethod, ServerState
from fedlora.privacy.user_level import UserLevelDP

log = logging.getLogger("fedlora")


class Store(Protocol):
    """Where a run keeps what must survive a crash."""

    def append_metrics(self, record: Mapping[str, Any]) -> None: ...

    def read_metrics(self) -> list[dict[str, Any]]: ...

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


class MemoryStore:
    """A :class:`Store` in memory (benchmarks, tests, experiments that need no run directory): metrics and the
    latest checkpoint only."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.latest: tuple[ServerState, dict[int, AdapterState], dict[str, torch.Tensor]] | None = None

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        self.metrics.append(dict(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(self.metrics)

    def truncate_metrics(self, rounds_done: int) -> None:
        self.metrics = [r for r in self.metrics if r["round"] <= rounds_done]

    def save_checkpoint(
        self, server: ServerState, clients: Mapping[int, AdapterState], weights: Mapping[str, torch.Tensor]
    ) -> None:
        self.latest = (server, dict(clients), dict(weights))

    def load_latest(self) -> tuple[ServerState, dict[int, AdapterState], dict[str, torch.Tensor]] | None:
        return self.latest


class LoopHooks:
    """Callbacks of the run loop (progress display); the defaults do nothing."""

    def start_round(self, rnd: int, clients: list[int]) -> None:
        """Round ``rnd`` (1-based) is about to start with these sampled clients."""

    def end_round(self, report: RoundReport) -> None:
        """A round finished (``report.round`` is 1-based)."""


@dataclass(frozen=True)
class Schedule:
    """How many rounds, and which clients take part in each (seeded): ``sampling="fixed"`` draws
    ``clients_per_round`` (or ``client_fraction`` of all, or all) clients without replacement; ``"poisson"`` takes
    each client independently with probability ``client_fraction`` (a round may have none)."""

    rounds: int
    num_clients: int
    seed: int = 0
    clients_per_round: int | None = None
    client_fraction: float | None = None
    sampling: str = "fixed"

    def clients(self, rnd: int) -> list[int]:
        return sample_clients(
            self.num_clients,
            rnd,
            self.seed,
            per_round=self.clients_per_round,
            fraction=self.client_fraction,
            sampling=self.sampling,
        )

    @property
    def per_round(self) -> int:
        """Fixed-size sampling: the clients of every round."""
        return sample_size(self.num_clients, per_round=self.clients_per_round, fraction=self.client_fraction)

    def most_participations(self, rounds: int) -> int:
        """The most rounds among the first ``rounds`` that any one client was sampled in (a function of the seed,
        so a resumed run computes the same)."""
        counts = [0] * self.num_clients
        for rnd in range(rounds):
            for c in self.clients(rnd):
                counts[c] += 1
        return max(counts, default=0)


class RunStalled(RuntimeError):
    """No client reply was accepted for too many rounds in a row (or in the whole run); the message gives the
    reasons the replies were rejected. The run directory keeps every checkpoint."""


def _checkpoint(method: FedMethod, runtime: Runtime, store: Store, server: ServerState) -> None:
    store.save_checkpoint(server, runtime.client_states(), runtime.base_weights() if method.changes_base else {})


def start_state(
    method: FedMethod, runtime: Runtime, store: Store, initial: AdapterState, *, resume: bool
) -> ServerState:
    """The state to run from: fresh (saved at once as the round-0 checkpoint, before any client trains), or the
    newest intact checkpoint's (restoring the runtime's client state and base weights). A run that has no intact
    checkpoint yet (killed while loading), or only the round-0 one, starts afresh: the result is the same, as
    everything is seeded."""
    if resume:
        found = store.load_latest()
        if found is not None and found[0].round > 0:
            server, clients, weights = found
            runtime.restore(server, clients, weights)
            store.truncate_metrics(server.round)
            log.info("resuming after round %d", server.round)
            return server
        if found is None:
            log.warning("no intact checkpoint to resume from: starting the run from its beginning")
        else:  # it holds only what init_server computes again, and its base weights predate a change of the base
            # made by init_server (FeDeRA's residual), which the runtime applies only when the first round starts
            log.info("only the round-0 checkpoint exists: starting the run from its beginning")
        store.truncate_metrics(0)
    server = method.init_server(initial)
    _checkpoint(method, runtime, store, server)
    return server


def privacy_metrics(privacy: UserLevelDP, schedule: Schedule, rounds: int) -> dict[str, float | None]:
    """ε (RDP, PLD), δ and σ after ``rounds`` rounds, computed from the round count alone (resume reports the
    same); with client noise, ε of the client that was sampled most often."""
    worst = schedule.most_participations(rounds) if privacy.noise_at == "client" else None
    return privacy.metrics(rounds, worst)


def budget_stop(privacy: UserLevelDP | None, schedule: Schedule, rounds_done: int) -> str | None:
    """Why the run must stop before round ``rounds_done + 1`` (it would raise ε above ``target_epsilon``), or None."""
    if privacy is None or privacy.target_epsilon is None or rounds_done >= schedule.rounds:
        return None
    worst = schedule.most_participations(rounds_done + 1) if privacy.noise_at == "client" else None
    eps = privacy.epsilon(rounds_done + 1, worst)
    if eps is not None and eps > privacy.target_epsilon:
        return (
            f"privacy budget spent: round {rounds_done + 1} would raise epsilon to {eps:.4g} > the target "
            f"{privacy.target_epsilon:g} (delta {privacy.delta:g}); stopped after {rounds_done} rounds"
        )
    return None


def _reasons(report: RoundReport) -> str:
    if not report.rejected:
        return "no client was sampled"
    return "; ".join(f"client {c}: {why}" for c, why in sorted(report.rejected.items())[:8])


def run_federation(
    method: FedMethod,
    runtime: Runtime,
    store: Store,
    schedule: Schedule,
    server: ServerState,
    hooks: LoopHooks | None = None,
    *,
    policy: RoundPolicy | None = None,
    max_failed_rounds: int | None = 3,
    privacy: UserLevelDP | None = None,
) -> ServerState:
    """Run rounds ``server.round + 1 .. schedule.rounds`` (1-based), checkpointing after each; returns the final
    state. Raises :class:`RunStalled` when ``max_failed_rounds`` rounds in a row accept no reply, or when the run
    ends without ever accepting one (rounds that sampled no client, as Poisson sampling may, count neither way).

    With ``privacy`` (user-level DP, :class:`fedlora.privacy.UserLevelDP`), each round's metrics carry ``dp_epsilon``
    (RDP), ``dp_epsilon_pld``, ``dp_delta`` and ``dp_noise``, and with a ``target_epsilon`` the run stops (returns
    early, logged; :func:`budget_stop` says why) before a round that would exceed it."""
    hooks = hooks or LoopHooks()
    history = store.read_metrics()
    failed = 0
    for record in reversed(history):  # a resumed run continues the count of failed rounds it was in
        if record.get("clients") == []:  # nobody was sampled: neither a failed nor a successful round
            continue
        if record.get("accepted"):
            break
        failed += 1
    for rnd in range(server.round, schedule.rounds):
        stop = budget_stop(privacy, schedule, rnd)
        if stop is not None:
            log.warning("%s", stop)
            break
        clients = schedule.clients(rnd)
        hooks.start_round(rnd + 1, clients)
        server, report = run_round(rnd, method, server, runtime, clients=clients, policy=policy, privacy=privacy)
        if privacy is not None:
            report = replace(report, metrics={**report.metrics, **privacy_metrics(privacy, schedule, rnd + 1)})
        store.append_metrics(report.record())
        _checkpoint(method, runtime, store, server)
        hooks.end_round(report)
        history.append(report.record())
        if not clients:
            log.info("round %d: no client was sampled", rnd + 1)
            continue
        failed = 0 if report.accepted else failed + 1
        if max_failed_rounds and failed >= max_failed_rounds:
            raise RunStalled(
                f"no client reply was accepted in {failed} rounds in a row (rounds {report.round - failed + 1}.."
                f"{report.round}); the last round's reasons: {_reasons(report)}"
            )
    tried = [r for r in history if r.get("clients") != []]
    if tried and not any(r.get("accepted") for r in tried):
        raise RunStalled(f"no client reply was accepted in any of the run's {len(tried)} rounds")
    return server
