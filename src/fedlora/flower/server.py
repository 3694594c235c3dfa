"""The ServerApp side: a :class:`fedlora.federation.round.Runtime` whose clients are Flower SuperNodes.

The ServerApp runs fedlora's own run loop (:func:`fedlora.api.run_with_runtime`: sampling, plans, validation,
bounded influence, aggregation, checkpoints, resume), with this runtime moving plans and replies as Flower
messages. Client ids are the nodes' ``partition-id`` (each node says which client it is in a ``query``
message at the start). A node that does not reply in time, replies with an error or replies with anything
malformed gives a rejected reply, never a dead run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.engines.local import LocalEngine, weighted_personal
from fedlora.federation.round import prepare_plan
from fedlora.flower.wire import WireError, pack, pack_plan, unpack, unpack_reply
from fedlora.methods.base import ClientPlan, ClientUpdate, ServerState

log = logging.getLogger("fedlora")

RECORD = "fedlora"


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


def make_content(**fields: bytes) -> Any:
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({RECORD: ConfigRecord(dict(fields))})


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
    ) -> None:
        self.grid = grid
        self.nodes = dict(nodes)
        """client id → Flower node id"""
        self.local = local
        self.method = local.method
        self.reply_timeout = reply_timeout
        self.run_key = run_key
        self.accepted_round: dict[int, int] = {}
        """Per client, the latest round whose reply was accepted (sent with every plan: the node commits it)."""
        self._planned: dict[int, int] = {}

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
            msg = self.grid.create_message(make_content(plan=blob), kind, node, group, ttl=self.reply_timeout + 60)
            messages.append(msg)
            owner[id(msg)] = cid
        if not messages:
            return out
        start = time.monotonic()
        ids = list(self.grid.push_messages(messages))
        by_id = {mid: owner[id(m)] for mid, m in zip(ids, messages, strict=True)}
        waiting = set(ids)
        while waiting and time.monotonic() - start < self.reply_timeout:
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
        return {"commit_round": self.accepted_round.get(cid, -1), "run_key": self.run_key}

    # ------------------------------------------------------------------------------------------ Runtime
    def train(self, plans: Sequence[ClientPlan]) -> list[ClientUpdate | Exception]:
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
                results.append({k: float(meta[k]) for k in ("accuracy", "loss", "examples")})
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


def discover(grid: Any, num_clients: int, *, wait: float) -> dict[int, int]:
    """Client id → node id, from each node's answer to a ``query`` hello (waits up to ``wait`` seconds for
    ``num_clients`` nodes to connect)."""
    deadline = time.monotonic() + wait
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(0.5)
    if len(nodes) < num_clients:
        raise NodeError(f"{len(nodes)} nodes connected within {wait:g} s; the run needs one per client ({num_clients})")
    hello = pack({"kind": "hello"}, {})
    messages = [grid.create_message(make_content(plan=hello), "query", n, "hello") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=wait))
    found: dict[int, int] = {}
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
    return found
