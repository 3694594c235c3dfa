"""The ServerApp side: a :class:`fedlora.federation.round.Runtime` whose clients are Flower SuperNodes.

The ServerApp runs fedlora's own run loop (:func:`fedlora.api.run_with_runtime`: sampling, plans, validation,
bounded influence, aggregation, checkpoints, resume), with this runtime moving plans and replies as Flower
messages. Client ids are the nodes' ``partition-id`` (each node says which client it is in a ``query``
message at the start). A node that does not reply in time, replies with an error or replies with anything
malformed gives a rejected reply, never a dead run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message

from fedlora.adapters.state import AdapterState
from fedlora.client.codecs import parse_codec
from fedlora.config import ConfigError
from fedlora.engines.local import LocalEngine, weighted_personal
from fedlora.federation.round import SecureAggregate, SecureShare, prepare_plan
from fedlora.flower.app import RECORD, make_content
from fedlora.flower.secagg import SecAggSettings
from fedlora.flower.wire import WireError, pack, pack_plan, unpack, unpack_reply
from fedlora.methods.base import ClientPlan, ClientUpdate, ServerState

log = logging.getLogger("fedlora")


class NodeError(RuntimeError):
    """A node failed, timed out or sent something unreadable (its reply is rejected)."""


def _blob_of(message: Any, field: str) -> bytes:
    """The fedlora bytes of a Flower message (raises NodeError naming what is wrong)."""
    if message.has_error():
        raise NodeError(f"node {message.metadata.src_node_id} replied with an error: {message.error.reason[:300]}")
    try:
        value = message.content.config_records[RECORD][field]
    except Exception:
        raise NodeError(f"node {message.metadata.src_node_id}: the reply has no {RECORD}.{field} record") from None
    if not isinstance(value, bytes):
        raise NodeError(f"node {message.metadata.src_node_id}: {RECORD}.{field} is not bytes")
    return value


class FlowerRuntime:
    """Plans go to the node that holds each client; replies come back as :class:`ClientUpdate` (or errors)."""

    def __init__(
        self,
        grid: Any,
        nodes: Mapping[int, int],
        local: LocalEngine,
        *,
        reply_timeout: float,
        run_key: str,
        labels: Sequence[str] = (),
        declared_examples: Mapping[int, int] | None = None,
        secagg: SecAggSettings | None = None,
        accepted_round: Mapping[int, int] | None = None,
    ) -> None:
        self.grid = grid
        self.nodes = dict(nodes)
        """client id → Flower node id"""
        self.local = local
        self.method = local.method
        self.reply_timeout = reply_timeout
        self.run_key = run_key
        self.labels = list(labels)
        """The run's label names, sent with every plan (a node that holds its own data encodes its labels by them)."""
        self.declared_examples = dict(declared_examples or {})
        """Training-set sizes declared by the nodes that hold their own data (the server has no other source)."""
        self.accepted_round: dict[int, int] = dict(accepted_round or {})
        """Per client, the latest round whose reply was accepted (sent with every plan: the node commits it)."""
        self._planned: dict[int, int] = {}
        self.secagg = secagg
        """With settings, each round's training is one SecAgg+ run (:meth:`train_secure`; :mod:`.secagg`)."""
        if secagg is not None:
            codec = getattr(self.method, "upload_codec", None) or self.method.ctx.upload_codec
            if parse_codec(codec).kind != "none":
                raise ConfigError(
                    f"{self.method.id} uploads with codec {codec!r}: with secure-aggregation the upload must be dense "
                    "(SecAgg+ sums quantised values; e.g. flasc needs upload_density=1)"
                )

    # ------------------------------------------------------------------------------------------ messaging
    def _exchange(self, kind: str, blobs: Mapping[int, bytes], group: str) -> dict[int, bytes | Exception]:
        """Send each client's blob to its node as a ``kind`` message; its reply blob or the error, per client."""
        out: dict[int, bytes | Exception] = {}
        messages, owner = [], {}
        for cid, blob in blobs.items():
            node = self.nodes.get(cid)
            if node is None:
                out[cid] = NodeError(f"no node holds client {cid}")
                continue
            msg = Message(
                content=make_content(plan=blob),
                dst_node_id=node,
                message_type=kind,
                group_id=group,
                ttl=self.reply_timeout + 60,
            )
            messages.append(msg)
            owner[id(msg)] = cid
        if not messages:
            return out
        ids = list(self.grid.push_messages(messages))
        start = time.monotonic()
        by_id = {mid: owner[id(m)] for mid, m in zip(ids, messages, strict=True)}
        waiting = set(ids)
        first = True
        while waiting and (first or time.monotonic() - start < self.reply_timeout):  # replies already in count
            first = False
            for reply in self.grid.pull_messages(list(waiting)):
                mid = reply.metadata.reply_to_message_id
                if mid not in waiting:
                    continue
                waiting.discard(mid)
                cid = by_id[mid]
                try:
                    out[cid] = _blob_of(reply, "reply")
                except NodeError as e:
                    out[cid] = e
            if waiting:
                time.sleep(0.1)
        for mid in waiting:
            out[by_id[mid]] = NodeError(f"no reply from client {by_id[mid]}'s node within {self.reply_timeout:g} s")
        return out

    def _extra(self, cid: int) -> dict[str, Any]:
        return {"commit_round": self.accepted_round.get(cid, -1), "run_key": self.run_key, "labels": self.labels}

    # ------------------------------------------------------------------------------------------ Runtime
    @property
    def secure_aggregation(self) -> bool:
        """Does each round go through SecAgg+ (the round logic then calls :meth:`train_secure`)?"""
        return self.secagg is not None

    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
        if self.secagg is not None:
            raise RuntimeError("this runtime aggregates securely: a round's training goes through train_secure")
        blobs = {p.client_id: pack_plan(p, self._extra(p.client_id)) for p in plans}
        self._planned = {p.client_id: p.round for p in plans}
        group = str(plans[0].round + 1) if plans else "0"
        got = self._exchange("train", blobs, group)
        replies: list[ClientUpdate | Exception] = []
        for p in plans:
            blob = got[p.client_id]
            if isinstance(blob, Exception):
                log.warning("round %d: client %d: %s", p.round + 1, p.client_id, blob)
                replies.append(blob)
                continue
            update, _ = unpack_reply(blob)
            replies.append(update)
        return replies

    def train_secure(self, plans: Sequence[ClientPlan], *, max_weight: float | None) -> SecureAggregate:
        """One SecAgg+ run over the nodes of the plans' clients (:mod:`fedlora.flower.secagg`): the weighted mean of
        what they uploaded, who took part (with the weight and counts each sent in the clear) and who dropped out.
        Nothing here ever holds an individual upload."""
        from fedlora.flower.secagg import DEFAULT_MAX_WEIGHT, fitins_for, mean_arrays, run_secagg

        settings = self.secagg
        if settings is None:
            raise RuntimeError("train_secure: this runtime runs without secure aggregation")
        self._planned = {p.client_id: p.round for p in plans}
        weight_cap = float(max_weight) if max_weight else DEFAULT_MAX_WEIGHT
        dropped: dict[int, str] = {}
        fitins, owner = {}, {}
        for p in plans:
            node = self.nodes.get(p.client_id)
            if node is None:
                dropped[p.client_id] = f"no node holds client {p.client_id}"
                continue
            blob = pack_plan(p, self._extra(p.client_id))
            fitins[node] = fitins_for(blob, weighting=self.method.weighting, settings=settings, max_weight=weight_cap)
            owner[node] = p.client_id
        if len(fitins) < 2:
            for cid in owner.values():
                dropped[cid] = f"SecAgg+ needs at least 2 clients in a round, this one has {len(fitins)}"
            return SecureAggregate(None, {}, dropped)
        rnd = plans[0].round
        outcome, errors, _ = run_secagg(
            self.grid, fitins, settings, rnd=rnd, max_weight=weight_cap, timeout=self.reply_timeout
        )
        for node, why in errors.items():
            if node in owner:
                log.warning("round %d: client %d dropped out of SecAgg+: %s", rnd + 1, owner[node], why)
        if outcome is None:
            halted = "SecAgg+ halted: too few clients were left to rebuild the masks"
            for node, cid in owner.items():
                dropped[cid] = f"{halted} ({errors[node]})" if node in errors else halted
            return SecureAggregate(None, {}, dropped)
        shares = {
            owner[node]: SecureShare(weight, metrics.get("num_examples"), metrics.get("samples_seen"))
            for node, (weight, metrics) in outcome.shares.items()
            if node in owner
        }
        for node, cid in owner.items():
            if cid not in shares:
                dropped[cid] = errors.get(node, "dropped out of the SecAgg+ protocol")
        specs = plans[0].upload
        keys = sorted(specs)
        bytes_up = 8 * (sum(math.prod(specs[k].shape) for k in keys) + 2) * len(shares)  # int64 masked vectors
        try:
            arrays, loss = mean_arrays(outcome, [tuple(specs[k].shape) for k in keys], settings.clipping_range)
        except ValueError as e:
            return SecureAggregate(None, shares, dropped, bytes_up=bytes_up, error=str(e))
        mean = {k: torch.from_numpy(a.astype("float64")).to(specs[k].dtype) for k, a in zip(keys, arrays, strict=True)}
        return SecureAggregate(mean, shares, dropped, train_loss=loss, bytes_up=bytes_up)

    def accept(self, client_ids: Sequence[int]) -> None:
        for cid in client_ids:
            if cid in self._planned:
                self.accepted_round[cid] = self._planned[cid]
        self._planned = {}

    def evaluate(self, server: ServerState) -> dict[str, float]:
        metrics = self.local.evaluate_global(server)
        if self.method.has_personal_state:
            metrics.update(self.evaluate_personal(server))
        return metrics

    def evaluate_personal(self, server: ServerState) -> dict[str, float]:
        """Each node evaluates its client's own model on its own test split; weighted by split size."""
        blobs = {}
        for cid in sorted(self.nodes):
            plan, _ = prepare_plan(self.local.model_plan(cid, server), server)
            blobs[cid] = pack_plan(plan, self._extra(cid))
        got = self._exchange("evaluate", blobs, f"{server.round}-evaluate")
        results = []
        for cid in sorted(got):
            blob = got[cid]
            try:
                if isinstance(blob, Exception):
                    raise blob
                meta, _ = unpack(blob)
                int(meta["examples"])  # every result carries its test-split size (KeyError/TypeError: rejected)
                results.append({k: float(v) for k, v in meta.items() if isinstance(v, int | float)})
            except (NodeError, WireError, KeyError, TypeError, ValueError) as e:
                log.warning("round %d: client %d could not evaluate its own model: %s", server.round, cid, e)
        return weighted_personal(results)

    def client_states(self) -> dict[int, AdapterState]:
        return {}  # kept on the nodes (in their Flower Context)

    def base_weights(self) -> dict[str, torch.Tensor]:
        return self.local.base_weights()

    def restore(
        self, server: ServerState, clients: Mapping[int, AdapterState], weights: Mapping[str, torch.Tensor]
    ) -> None:
        self.local.restore(server, {}, weights)


def accepted_rounds(history: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Per client, the latest round (0-based) whose reply was accepted, from a run's ``metrics.jsonl`` records: what
    a restarted ServerApp tells the nodes to commit."""
    out: dict[int, int] = {}
    for record in history:
        rejected = {str(k) for k in record.get("rejected", {})}
        for cid in record.get("clients", []):
            if str(cid) not in rejected:
                out[int(cid)] = int(record["round"]) - 1
    return out


@dataclass(frozen=True)
class Discovery:
    nodes: dict[int, int]
    """client id → node id"""
    declared_examples: dict[int, int]
    """client id → training-set size, for the clients whose node holds its own data file"""


def discover(grid: Any, num_clients: int, *, wait: float, labels: Sequence[str] = ()) -> Discovery:
    """Which node holds which client, from each node's answer to a ``query`` hello that carries the run's label
    names (waits up to ``wait`` seconds for ``num_clients`` nodes to connect). A node with its own data file also
    declares its training-set size."""
    deadline = time.monotonic() + wait
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(0.5)
    if len(nodes) < num_clients:
        raise NodeError(f"{len(nodes)} nodes connected within {wait:g} s; the run needs one per client ({num_clients})")
    hello = pack({"kind": "hello", "extra": {"labels": list(labels)}}, {})
    messages = [
        Message(content=make_content(plan=hello), dst_node_id=n, message_type="query", group_id="hello") for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=wait))
    found: dict[int, int] = {}
    declared: dict[int, int] = {}
    problems = []
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            meta, _ = unpack(_blob_of(reply, "reply"))
            cid = meta["client_id"]
            if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid < num_clients:
                raise NodeError(f"node {node} says it is client {cid!r}, outside 0..{num_clients - 1}")
            if cid in found:
                raise NodeError(f"nodes {found[cid]} and {node} both say they are client {cid}")
            if meta.get("own_data"):
                n = meta.get("num_examples")
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise NodeError(f"node {node} (client {cid}) declares {n!r} training examples")
                declared[cid] = n
            found[cid] = node
        except (NodeError, WireError, KeyError) as e:
            problems.append(str(e))
    missing = sorted(set(range(num_clients)) - set(found))
    if missing:
        raise NodeError(
            f"no node answered as client(s) {missing[:8]} (start each SuperNode with --node-config "
            f"'partition-id=K num-partitions={num_clients}')"
            + (f"; problems: {'; '.join(problems[:4])}" if problems else "")
        )
    return Discovery(found, declared)
