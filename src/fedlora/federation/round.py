"""One federated round, shared by every engine: sample → plan → client work → validate → aggregate → evaluate.

Engines supply a :class:`Runtime` that moves data (the local engine trains in-process on one shared model; a
Flower engine sends messages); everything else — which clients take part, what they receive, whether a reply
is acceptable, the aggregation, and the bytes that travelled — is decided here, once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from fedlora.adapters.state import AdapterState, state_bytes
from fedlora.methods.base import ClientPlan, ClientUpdate, FedMethod, ServerState, derive_seed

log = logging.getLogger("fedlora")


class Runtime(Protocol):
    """What an engine provides to :func:`run_round`."""

    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        """Run each plan's client work; return one reply (or the error it raised) per plan, in order."""
        ...

    def accept(self, client_ids: Sequence[int]) -> None:
        """The replies of these clients passed validation: commit what they keep (personal state)."""
        ...

    def apply_base_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Make a change of the frozen base weights (nn.Linear layout per module) take effect."""
        ...

    def evaluate(self, server: ServerState) -> dict[str, float]:
        """Metrics of the model after aggregation (global and/or personalised)."""
        ...


@dataclass
class Ledger:
    """Book-keeping the round logic carries between rounds (checkpointed with the server state)."""

    base_updates: list[tuple[int, int]] = field(default_factory=list)
    """``(round, wire bytes)`` of each change of the base weights."""
    last_sync: dict[int, int] = field(default_factory=dict)
    """Per client, the number of rounds completed when it last received the model."""

    def pending_base_bytes(self, client_id: int, dense_bytes: int) -> int:
        since = self.last_sync.get(client_id, 0)
        pending = sum(b for r, b in self.base_updates if r >= since)
        return min(pending, dense_bytes) if pending else 0

    def to_json(self) -> dict:
        return {"base_updates": self.base_updates, "last_sync": {str(k): v for k, v in self.last_sync.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> Ledger:
        return cls(
            base_updates=[(int(r), int(b)) for r, b in data.get("base_updates", [])],
            last_sync={int(k): int(v) for k, v in data.get("last_sync", {}).items()},
        )


@dataclass(frozen=True)
class RoundReport:
    round: int
    sampled: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    bytes_up: int
    """Bytes of every reply received, accepted or rejected (they travelled either way)."""
    bytes_down: int
    train_loss: float
    seconds: float
    metrics: dict[str, float]

    def record(self) -> dict:
        """One line of ``metrics.jsonl``."""
        return {
            "round": self.round,
            "clients": self.sampled,
            "accepted": len(self.accepted),
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "train_loss": self.train_loss,
            **self.metrics,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "seconds": round(self.seconds, 3),
        }


def sample_clients(
    num_clients: int, rnd: int, seed: int, *, per_round: int | None = None, fraction: float | None = None
) -> list[int]:
    """The clients of round ``rnd`` (seeded by run seed and round; sorted)."""
    if per_round is not None:
        k = per_round
    elif fraction is not None:
        k = max(1, round(fraction * num_clients))
    else:
        k = num_clients
    k = min(k, num_clients)
    rng = random.Random(derive_seed(seed, "sample", rnd))
    return sorted(rng.sample(range(num_clients), k))


def validate_update(update: ClientUpdate | Exception, plan: ClientPlan, reference: AdapterState) -> str | None:
    """Why a reply must be rejected, or None when it is acceptable."""
    if isinstance(update, Exception):
        return f"client failed: {type(update).__name__}: {update}"
    if update.client_id != plan.client_id:
        return f"reply from client {update.client_id} to the plan of client {plan.client_id}"
    got, want = set(update.state), set(plan.upload_keys)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        return f"keys differ: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for key in plan.upload_keys:
        t, ref = update.state[key], reference[key]
        if not isinstance(t, torch.Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if t.shape != ref.shape:
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{key} has dtype {t.dtype}, expected {ref.dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{key} has non-finite values"
    if update.num_examples <= 0:
        return f"num_examples={update.num_examples} must be positive"
    if update.samples_seen <= 0:
        return f"samples_seen={update.samples_seen} must be positive"
    return None


def run_round(
    rnd: int,
    method: FedMethod,
    server: ServerState,
    ledger: Ledger,
    runtime: Runtime,
    *,
    clients: Sequence[int],
    dense_base_bytes: int,
) -> tuple[ServerState, RoundReport]:
    """Run round ``rnd`` with the given sampled ``clients``; return the new server state and the report."""
    start = time.perf_counter()
    plans = [method.plan(rnd, c, server) for c in clients]
    bytes_down = 0
    for p in plans:
        bytes_down += state_bytes(p.download) + ledger.pending_base_bytes(p.client_id, dense_base_bytes)
        ledger.last_sync[p.client_id] = server.round
    replies = runtime.train(plans)
    if len(replies) != len(plans):
        raise RuntimeError(f"runtime returned {len(replies)} replies for {len(plans)} plans")
    accepted: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    bytes_up = 0
    for plan, reply in zip(plans, replies, strict=True):
        if isinstance(reply, ClientUpdate):
            bytes_up += state_bytes(reply.state)
        reason = validate_update(reply, plan, server.adapter)
        if reason is None:
            accepted.append(reply)  # type: ignore[arg-type]
        else:
            rejected[plan.client_id] = reason
            log.warning("round %d: rejected the reply of client %d: %s", rnd, plan.client_id, reason)
    runtime.accept([u.client_id for u in accepted])
    agg_metrics: dict[str, float] = {}
    if accepted:
        result = method.aggregate(rnd, server, accepted)
        base = dict(server.base_delta)
        if result.base_delta:
            for name, d in result.base_delta.items():
                base[name] = base[name] + d if name in base else d.clone()
            runtime.apply_base_delta(result.base_delta)
            ledger.base_updates.append((rnd, result.base_delta_wire_bytes))
        server = replace(server, adapter=result.adapter, base_delta=base, round=rnd + 1)
        agg_metrics = dict(result.metrics)
    else:
        log.warning("round %d: no acceptable reply; the global state is unchanged", rnd)
        server = replace(server, round=rnd + 1)
    metrics = {**agg_metrics, **runtime.evaluate(server)}
    seen = sum(u.samples_seen for u in accepted)
    train_loss = (
        sum(float(u.metrics.get("train_loss", 0.0)) * u.samples_seen for u in accepted) / seen if seen else float("nan")
    )
    report = RoundReport(
        round=rnd,
        sampled=list(clients),
        accepted=[u.client_id for u in accepted],
        rejected=rejected,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        train_loss=train_loss,
        seconds=time.perf_counter() - start,
        metrics=metrics,
    )
    return server, report
