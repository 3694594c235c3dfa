"""Run the Flower app in this process: a :class:`flwr.serverapp.Grid` that delivers each message by calling the
ClientApp directly, one ``Context`` per node (tests, and debugging the app without a SuperLink).

It goes through the same ServerApp and ClientApp functions, messages and records as a deployment; only the
transport is missing. ``fail`` lets a test make a node fail or fall silent.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


def _transported(message: Message) -> Message:
    """``message`` as the other side receives it: serialised and parsed (Flower's protobuf), so no object is
    shared between server and node (a SecAgg+ workflow sends one content object to several nodes)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """Nodes ``1..N`` with ``node_configs[i]``; a message is answered when pushed."""

    def __init__(
        self,
        client_app: Any,
        node_configs: list[dict[str, Any]],
        run_config: Mapping[str, Any],
        *,
        fail: Callable[[int, Message], str | None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config=dict(c), state=RecordDict(), run_config=dict(run_config)
            )
            for i, c in enumerate(node_configs)
        }
        self.fail = fail
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        """Every reply, as the server received it."""

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in process
        pass

    @property
    def run(self) -> Any:  # pragma: no cover
        return None

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            why = self.fail(node, msg) if self.fail is not None else None
            if why == "silent":
                ids.append(mid)
                continue
            if why is not None:
                reply = Message(Error(code=0, reason=why), reply_to=msg)
            else:
                try:
                    reply = _transported(self.client_app(_transported(msg), self.contexts[node]))
                except Exception as e:  # as a SuperNode does: an error reply
                    reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.received.append(reply)
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    run_config: Mapping[str, Any],
    num_nodes: int,
    *,
    fail: Callable[[int, Message], str | None] | None = None,
    node_extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> InProcessGrid:
    """Run the ServerApp against ``num_nodes`` in-process nodes (partition-id 0..N-1; ``node_extra[k]``: more node
    config of node k, e.g. its own data file); returns the grid."""
    from flwr.supercore.task_identity import TaskIdentity  # what a ServerApp process sets from its SuperLink

    from fedlora.flower.app import client_app, server_main

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    extra = node_extra or {}
    configs = [{"partition-id": i, "num-partitions": num_nodes, **extra.get(i, {})} for i in range(num_nodes)]
    grid = InProcessGrid(client_app, configs, run_config, fail=fail)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_main(grid, context)
    return grid
