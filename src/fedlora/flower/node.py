"""A node's side of a Flower run: the fedlora client code behind a ClientApp, with no Flower import.

A :class:`NodeSession` is the local engine of one run on one node (``fedlora.api.build``: the same data
partitioning, model, adapter wrapping and method objects as ``fedlora run``), kept across messages by
:func:`session_for` for as long as the process lives (Flower's simulation actors live for the whole run; a node
worker started by ``fedlora node`` lives across runs). Everything a client keeps between rounds travels in its
:class:`ClientMemory`, which the ClientApp stores in the Flower ``Context``: the session itself holds no client's
state, so one session can serve several clients (simulation) and a new process loses nothing.

Messages (all bytes, :mod:`fedlora.flower.wire`):
- ``hello``: which client this node is and how many training examples it holds;
- ``train``: a plan → a reply (the tensors that travel up), the client's new memory;
- ``evaluate``: a plan that gives the client's own model → its accuracy and loss on its own test split.
Each plan carries ``commit_round``, the latest round whose reply from this client the server accepted: the state
the client computed in that round becomes its kept state, any other pending state is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.adapters.peft_io import base_weights
from fedlora.adapters.state import AdapterState
from fedlora.config import RunConfig
from fedlora.flower.wire import WireError, pack, unpack, unpack_plan

log = logging.getLogger("fedlora")


@dataclass
class ClientMemory:
    """What one client keeps between messages (it lives in the Flower ``Context``)."""

    kept: AdapterState | None = None
    pending: AdapterState | None = None
    pending_round: int = -1
    base_version: int = 0
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    """The client's current frozen weights of the adapted modules, once a method has changed them."""

    def commit(self, commit_round: int) -> None:
        """The server accepted this client's reply of ``commit_round``: keep what that round computed."""
        if self.pending is not None and self.pending_round == commit_round:
            self.kept = self.pending
        self.pending, self.pending_round = None, -1

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for part, state in (("kept", self.kept), ("pending", self.pending), ("base", self.base)):
            for k, v in (state or {}).items():
                tensors[f"{part}/{k}"] = v
        meta = {
            "kind": "memory",
            "has_kept": self.kept is not None,
            "has_pending": self.pending is not None,
            "pending_round": self.pending_round,
            "base_version": self.base_version,
        }
        return pack(meta, tensors)

    @classmethod
    def from_bytes(cls, blob: bytes | None) -> ClientMemory:
        if not blob:
            return cls()
        meta, tensors = unpack(blob)
        if meta.get("kind") != "memory":
            raise WireError("not a client memory blob")

        def part(name: str) -> dict[str, torch.Tensor]:
            prefix = name + "/"
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            kept=part("kept") if meta["has_kept"] else None,
            pending=part("pending") if meta["has_pending"] else None,
            pending_round=int(meta["pending_round"]),
            base_version=int(meta["base_version"]),
            base=part("base"),
        )


def config_key(cfg: RunConfig) -> str:
    """What identifies a run's node session: everything that shapes the model, data and method."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "out_dir", "run_name", "rounds")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


class NodeSession:
    """The client side of one run on one node: a local engine used one client at a time.

    With ``data_file``, the node is client ``client_id`` only and its data is that file (encoded by the run's
    ``labels``, which the server sends), not its partition of the run's dataset: the run's dataset is not loaded."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data_file: str | None = None,
        client_id: int | None = None,
        labels: tuple[str, ...] = (),
    ) -> None:
        from fedlora.api import build, resolve_config

        self.config = resolve_config(cfg.replace(progress=False))
        torch.set_num_threads(self.config.threads)
        self.own_data = client_id if data_file else None
        data = None
        if data_file:
            from fedlora.data import FederatedData, load_client_file
            from fedlora.tasks import get_task

            if client_id is None or not 0 <= client_id < self.config.clients:
                raise ValueError(f"partition-id {client_id} is outside 0..{self.config.clients - 1}")
            mine = load_client_file(
                data_file,
                client_id=client_id,
                label_names=labels,
                text_column=self.config.text_column,
                label_column=self.config.label_column,
                client_test_fraction=self.config.client_test_fraction,
                seed=self.config.seed,
                extra_columns=get_task(self.config.task, self.config).extra_columns,
            )
            # every slot holds this node's data: the session only ever serves client_id (checked per message)
            data = FederatedData(clients=[mine] * self.config.clients, test=mine.test, label_names=list(labels))
        self.setup = build(self.config, data=data)
        self.engine = self.setup.engine
        self.method = self.setup.method
        self.original_base = (
            {k: v.detach().clone() for k, v in base_weights(self.engine.model, self.engine.layout).items()}
            if self.method.changes_base
            else {}
        )
        self.lock = threading.Lock()

    # ---------------------------------------------------------------------------------------- memory
    def _enter(self, client_id: int, memory: ClientMemory) -> None:
        """Make the shared engine hold client ``client_id``'s kept state and frozen weights."""
        if not 0 <= client_id < len(self.engine.clients):
            raise ValueError(f"client {client_id} does not exist in a run of {len(self.engine.clients)} clients")
        self.engine.hold(client_id, memory.kept)
        if self.method.changes_base:
            live = base_weights(self.engine.model, self.engine.layout)
            source = memory.base if memory.base_version > 0 else self.original_base
            with torch.no_grad():
                for name, w in live.items():
                    w.copy_(source[name])
            self.engine.base_version = memory.base_version

    def _leave(self, memory: ClientMemory) -> None:
        if self.method.changes_base and self.engine.base_version > memory.base_version:
            memory.base_version = self.engine.base_version
            memory.base = {
                k: v.detach().clone() for k, v in base_weights(self.engine.model, self.engine.layout).items()
            }

    # -------------------------------------------------------------------------------------- messages
    def hello(self, client_id: int) -> dict[str, Any]:
        if not 0 <= client_id < len(self.engine.clients):
            raise ValueError(f"partition-id {client_id} is outside 0..{len(self.engine.clients) - 1}")
        if self.own_data is not None and client_id != self.own_data:
            raise ValueError(f"this node holds client {self.own_data}'s own data, not client {client_id}'s")
        return {
            "client_id": client_id,
            "num_examples": len(self.engine.clients[client_id].train),
            "own_data": self.own_data is not None,
        }

    def _plan(self, plan_blob: bytes, client_id: int) -> tuple[Any, dict[str, Any]]:
        plan, extra = unpack_plan(plan_blob)
        if plan.client_id != client_id:
            raise ValueError(f"a plan for client {plan.client_id} reached the node of client {client_id}")
        return plan, extra

    def train(self, plan_blob: bytes, memory: ClientMemory, client_id: int) -> tuple[Any, ClientMemory]:
        """A client's turn: its reply (a ClientUpdate, or the exception that stopped it) and its new memory."""
        plan, extra = self._plan(plan_blob, client_id)
        with self.lock:
            memory.commit(int(extra.get("commit_round", -1)))
            self._enter(plan.client_id, memory)
            (reply,) = self.engine.train([plan])
            keep = self.engine.take_pending(plan.client_id)
            self._leave(memory)
        if keep is not None and not isinstance(reply, BaseException):
            memory.pending, memory.pending_round = keep, plan.round
        return reply, memory

    def evaluate(self, plan_blob: bytes, memory: ClientMemory, client_id: int) -> tuple[dict[str, float], ClientMemory]:
        """The client's own model (the plan's download joined with what it keeps) on its own test split."""
        plan, extra = self._plan(plan_blob, client_id)
        with self.lock:
            memory.commit(int(extra.get("commit_round", -1)))
            self._enter(plan.client_id, memory)
            self.engine._apply_base(plan.base_update)
            result = self.engine.evaluate_client(plan.client_id, None, dataclasses.replace(plan, base_update=None))
            self._leave(memory)
        return result, memory


_SESSIONS: dict[str, NodeSession] = {}
_SESSIONS_LOCK = threading.Lock()


def session_for(
    cfg: RunConfig,
    keep: int = 1,
    *,
    data_file: str | None = None,
    client_id: int | None = None,
    labels: tuple[str, ...] = (),
) -> NodeSession:
    """The node session of this configuration (and own data file), built once per process (at most ``keep``)."""
    key = config_key(cfg)
    if data_file:
        key += json.dumps([data_file, client_id, list(labels)])
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            while len(_SESSIONS) >= keep:
                _SESSIONS.pop(next(iter(_SESSIONS)))
            log.info("building the node session (model, data, method) for this run")
            _SESSIONS[key] = NodeSession(cfg, data_file=data_file, client_id=client_id, labels=labels)
        return _SESSIONS[key]
