"""One federated round, shared by every engine: sample → plan → client work → validate → aggregate → evaluate.

Engines supply a :class:`Runtime` that moves data (the local engine trains in-process on one shared model; a
Flower engine sends messages); everything else — which clients take part, what they receive (including the
changes of the base weights they have not seen yet), whether a reply is acceptable (against the plan: keys,
ranks, scales, shapes, dtypes, finite values, counts, after decoding its codec), the aggregation, and the bytes
that travelled (counted on encoded payloads) — is decided here, once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedlora.adapters.peft_io import dense_delta
from fedlora.adapters.state import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState
from fedlora.client.codecs import CodecError, decode_state, encode_state, parse_codec, payload_bytes
from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, FedMethod, ServerState, derive_seed

log = logging.getLogger("fedlora")


class Runtime(Protocol):
    """What an engine provides to :func:`run_round` and :func:`fedlora.federation.loop.run_federation`."""

    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        """Run each plan's client work (applying ``plan.base_update`` first); one reply or error per plan."""
        ...

    def accept(self, client_ids: Sequence[int]) -> None:
        """The replies of these clients passed validation: commit what they keep (per-client state)."""
        ...

    def evaluate(self, server: ServerState) -> dict[str, float]:
        """Metrics of the model after aggregation (global and/or personalised)."""
        ...

    def client_states(self) -> dict[int, AdapterState]:
        """Every client's kept state (checkpointed)."""
        ...

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The current frozen weights of the adapted modules, when the method changes them (checkpointed)."""
        ...

    def restore(
        self, server: ServerState, clients: Mapping[int, AdapterState], weights: Mapping[str, torch.Tensor]
    ) -> None:
        """Take back a checkpoint's per-client state and base weights (resume)."""
        ...


@dataclass(frozen=True)
class RoundReport:
    round: int
    sampled: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    bytes_up: int
    """Bytes of every reply received, accepted or rejected (they travelled either way), as encoded."""
    bytes_down: int
    """Bytes of every plan's encoded download plus the base-weight changes it carries."""
    train_loss: float
    seconds: float
    metrics: dict[str, float]

    def record(self) -> dict[str, Any]:
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


def base_update_for(server: ServerState, client_id: int) -> BaseUpdate | None:
    """The change of the base weights client ``client_id`` has not received (None when it is up to date)."""
    have = server.client_base.get(client_id, 0)
    if have == server.base_version:
        return None
    if have == server.base_version - 1 and server.last_base_update:
        return BaseUpdate(server.base_version, dict(server.last_base_update), cumulative=False)
    return BaseUpdate(server.base_version, dict(server.base_delta), cumulative=True)


def prepare_plan(plan: ClientPlan, server: ServerState) -> tuple[ClientPlan, int]:
    """Add the pending base change and apply the download codec; returns the plan as the client will see it
    (download decoded) and the bytes that travel down."""
    base = base_update_for(server, plan.client_id)
    codec = parse_codec(plan.download_codec)
    payload = encode_state(codec, plan.download)
    down = payload_bytes(payload) + (base.wire_bytes() if base is not None else 0)
    download = plan.download
    if codec.kind != "none":  # the client sees what it decodes from this very payload
        specs = {k: (tuple(v.shape), v.dtype) for k, v in plan.download.items()}
        download = decode_state(codec, payload, specs)
    return replace(plan, download=download, base_update=base), down


def _count(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name}={value!r} is not an integer"
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return f"{name}={value!r} is not a finite integer"
    if value <= 0:
        return f"{name}={value} must be positive"
    return None


def decode_reply(update: ClientUpdate | Exception, plan: ClientPlan) -> ClientUpdate | str:
    """The reply with its payload decoded and checked against ``plan``, or the reason to reject it."""
    if isinstance(update, Exception):
        return f"client failed: {type(update).__name__}: {update}"
    if not isinstance(update, ClientUpdate):
        return f"reply is a {type(update).__name__}, not a ClientUpdate"
    if update.client_id != plan.client_id:
        return f"reply from client {update.client_id} to the plan of client {plan.client_id}"
    for name in ("num_examples", "samples_seen"):
        why = _count(name, getattr(update, name))
        if why:
            return why
    if not isinstance(update.state, Mapping):
        return f"state is a {type(update.state).__name__}, not a mapping"
    # ranks and scales: what the plan expects from this client
    ranks = update.ranks if isinstance(update.ranks, Mapping) else {}
    if set(ranks) != set(plan.ranks):
        return f"reply ranks name modules {sorted(set(ranks) ^ set(plan.ranks))[:3]} unlike the plan"
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, spec in plan.upload.items():
        shapes[key] = (tuple(spec.shape), spec.dtype)
    for name, want in plan.ranks.items():
        got = ranks[name]
        r, s = getattr(got, "rank", None), getattr(got, "scale", None)
        if isinstance(r, bool) or not isinstance(r, int):
            return f"{name}: rank {r!r} is not an integer"
        if not (r == want.rank or (plan.rank_may_shrink and 1 <= r <= want.rank)):
            return f"{name}: rank {r}, plan expects {want.rank}" + (" or lower" if plan.rank_may_shrink else "")
        if s != want.scale:
            return f"{name}: scale {s!r}, plan expects {want.scale!r}"
        for suffix, dim in ((LORA_A_SUFFIX, 0), (LORA_B_SUFFIX, 1)):
            key = name + suffix
            if key in shapes and r != want.rank:
                shape = list(shapes[key][0])
                shape[dim] = r
                shapes[key] = (tuple(shape), shapes[key][1])
    try:
        codec = parse_codec(plan.upload_codec)
        state = decode_state(codec, update.state, shapes, plan.download)
    except CodecError as e:
        return f"payload: {e}"
    except Exception as e:  # a payload that even decoding chokes on is rejected, never raised
        return f"payload cannot be decoded: {type(e).__name__}: {e}"
    got, want_keys = set(state), set(plan.upload)
    if got != want_keys:
        missing, extra = sorted(want_keys - got), sorted(got - want_keys)
        return f"keys differ: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for key, (shape, dtype) in shapes.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if t.layout != torch.strided or t.device.type != "cpu":
            return f"{key} is a {t.layout}/{t.device.type} tensor, expected a dense CPU tensor"
        if tuple(t.shape) != shape:
            return f"{key} has shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dtype:
            return f"{key} has dtype {t.dtype}, expected {dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{key} has non-finite values"
    return replace(update, state=state, ranks=dict(ranks))


def validate_update(update: ClientUpdate | Exception, plan: ClientPlan) -> str | None:
    """Why a reply must be rejected, or None when it is acceptable."""
    out = decode_reply(update, plan)
    return out if isinstance(out, str) else None


def _reported_loss(update: ClientUpdate) -> float:
    """The client's reported training loss, or NaN when it reported none or nonsense (it is only displayed)."""
    try:
        value = float(update.metrics.get("train_loss", math.nan)) if isinstance(update.metrics, Mapping) else math.nan
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _finite(state: Mapping[str, torch.Tensor]) -> str | None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def run_round(
    rnd: int, method: FedMethod, server: ServerState, runtime: Runtime, *, clients: Sequence[int]
) -> tuple[ServerState, RoundReport]:
    """Run round ``rnd`` with the given sampled ``clients``; return the new server state and the report."""
    start = time.perf_counter()
    plans: list[ClientPlan] = []
    bytes_down = 0
    client_base = dict(server.client_base)
    for c in clients:
        plan, down = prepare_plan(method.plan(rnd, c, server), server)
        plans.append(plan)
        bytes_down += down
        client_base[c] = server.base_version
    server = replace(server, client_base=client_base)
    replies = runtime.train(plans)
    if len(replies) != len(plans):
        raise RuntimeError(f"runtime returned {len(replies)} replies for {len(plans)} plans")
    accepted: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    bytes_up = 0
    for plan, reply in zip(plans, replies, strict=True):
        if isinstance(reply, ClientUpdate) and isinstance(reply.state, Mapping):
            with contextlib.suppress(Exception):  # not tensors: counted as nothing, rejected below
                bytes_up += payload_bytes(reply.state)
        out = decode_reply(reply, plan)
        if isinstance(out, ClientUpdate):
            accepted.append(out)
        else:
            rejected[plan.client_id] = out
            log.warning("round %d: rejected the reply of client %d: %s", rnd, plan.client_id, out)
    agg_metrics: dict[str, float] = {}
    if accepted:
        result = method.aggregate(rnd, server, accepted)
        bad = _finite(result.adapter) or _finite(result.tensors or {})
        if bad is not None:
            log.warning("round %d: the aggregate has non-finite values in %s; the global state is unchanged", rnd, bad)
            accepted, rejected = [], {**rejected, **{u.client_id: f"aggregate non-finite ({bad})" for u in accepted}}
            server = replace(server, round=rnd + 1)
        else:
            changes: dict[str, Any] = {"adapter": result.adapter, "round": rnd + 1}
            if result.tensors is not None:
                changes["tensors"] = result.tensors
            if result.meta is not None:
                if json.loads(json.dumps(result.meta)) != result.meta:
                    raise TypeError(f"{method.id}: server meta must survive JSON unchanged (str keys, plain values)")
                changes["meta"] = result.meta
            if result.base_delta:
                base = dict(server.base_delta)
                for name, d in result.base_delta.items():
                    dense = dense_delta(d)
                    base[name] = base[name] + dense if name in base else dense.clone()
                changes.update(
                    base_delta=base, base_version=server.base_version + 1, last_base_update=dict(result.base_delta)
                )
            server = replace(server, **changes)
            agg_metrics = dict(result.metrics)
    else:
        log.warning("round %d: no acceptable reply; the global state is unchanged", rnd)
        server = replace(server, round=rnd + 1)
    runtime.accept([u.client_id for u in accepted])
    metrics = {**agg_metrics, **runtime.evaluate(server)}
    losses = [(_reported_loss(u), u.samples_seen) for u in accepted]
    losses = [(v, n) for v, n in losses if math.isfinite(v)]
    seen = sum(n for _, n in losses)
    train_loss = sum(v * n for v, n in losses) / seen if seen else float("nan")
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
