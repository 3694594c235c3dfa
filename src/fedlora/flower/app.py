"""fedlora as a Flower app: ``server_app`` runs fedlora's run loop, ``client_app`` runs fedlora's client code.

The app's ``pyproject.toml`` (``flower/pyproject.toml`` in the repository) names these two objects. Its run
config takes the same keys as ``fedlora run`` (``-`` or ``_``; method options as ``method-options.KEY``; lists as
comma-separated strings; ``"null"`` for none), validated by the same :class:`fedlora.config.RunConfig`, plus the
Flower-only keys of :data:`FLOWER_KEYS`.

A SuperNode says which client it is with ``--node-config "partition-id=K num-partitions=N"`` (Flower's
simulation sets both). Per-client state lives in the Flower ``Context`` (``context.state``); the node keeps the
model, data and method objects loaded between messages for as long as its process lives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, RunConfig

log = logging.getLogger("fedlora")

FLOWER_KEYS = {
    "resume": "a run directory to resume (on the ServerApp's machine); empty: a new run",
    "reply-timeout": "seconds the server waits for a round's replies; a node that has not replied by then is rejected",
    "node-wait": "seconds the server waits at the start for one SuperNode per client to connect",
}
"""Run-config keys of the Flower app beyond ``fedlora run``'s options."""


@dataclass(frozen=True)
class FlowerOptions:
    resume: str | None = None
    reply_timeout: float = 600.0
    node_wait: float = 120.0


def config_from_flower(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """The run's :class:`RunConfig` and Flower options from a Flower run config (validated; ConfigError)."""
    values: dict[str, Any] = {}
    method_options: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    for key, value in run_config.items():
        if key.startswith(("method-options.", "method_options.")):
            method_options[key.split(".", 1)[1]] = value
        elif key.replace("_", "-") in FLOWER_KEYS:
            flower[key.replace("_", "-")] = value
        else:
            values[key] = value
    if method_options:
        values["method_options"] = method_options
    from fedlora.api import resolve_config  # method options are typed and checked here, as for `fedlora run`

    cfg = resolve_config(RunConfig.from_dict(values).replace(progress=False))
    opts = FlowerOptions()
    try:
        resume = str(flower.get("resume", "") or "").strip()
        opts = FlowerOptions(
            resume=resume or None,
            reply_timeout=float(flower.get("reply-timeout", opts.reply_timeout)),
            node_wait=float(flower.get("node-wait", opts.node_wait)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Flower run config: {e}") from None
    for name in ("reply_timeout", "node_wait"):
        if not getattr(opts, name) > 0:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive number of seconds")
    return cfg, opts


# ------------------------------------------------------------------------------------------------ server
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run (or resume) a fedlora run with the connected SuperNodes as its clients."""
    from fedlora.api import resume, run
    from fedlora.flower.server import FlowerRuntime, discover

    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedlora: %(message)s")
    cfg, opts = config_from_flower(context.run_config)

    def make_runtime(setup: Any, run_dir: Any) -> FlowerRuntime:
        nodes = discover(grid, cfg.clients, wait=opts.node_wait)
        log.info("clients → nodes: %s", {c: nodes[c] for c in sorted(nodes)})
        return FlowerRuntime(grid, nodes, setup.engine, reply_timeout=opts.reply_timeout, run_key=run_dir.path.name)

    if opts.resume:
        result = resume(opts.resume, runtime=make_runtime, rounds=cfg.rounds)
    else:
        result = run(cfg, runtime=make_runtime)
    log.info("run finished: %s (%s)", result.run_dir, result.final)


# ------------------------------------------------------------------------------------------------ client
client_app = ClientApp()
MEMORY = "fedlora-memory"


def _client_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"this SuperNode has partition-id={value!r}: start it with --node-config 'partition-id=K "
            "num-partitions=N' (K = the client it is, 0-based)"
        )
    return value


def _memory(context: Context) -> Any:
    from fedlora.flower.node import ClientMemory

    record = context.state.config_records.get(MEMORY)
    return ClientMemory.from_bytes(record["memory"] if record is not None and "memory" in record else None)


def _remember(context: Context, memory: Any) -> None:
    context.state.config_records[MEMORY] = ConfigRecord({"memory": memory.to_bytes()})


def _plan_blob(message: Message) -> bytes:
    from fedlora.flower.server import RECORD

    return message.content.config_records[RECORD]["plan"]


def _reply(message: Message, blob: bytes) -> Message:
    from fedlora.flower.server import make_content

    return Message(make_content(reply=blob), reply_to=message)


@client_app.query()
def client_hello(message: Message, context: Context) -> Message:
    from fedlora.flower.node import session_for
    from fedlora.flower.wire import pack

    cfg, _ = config_from_flower(context.run_config)
    return _reply(message, pack(session_for(cfg).hello(_client_id(context)), {}))


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    from fedlora.flower.node import session_for
    from fedlora.flower.wire import pack_error, pack_reply

    cfg, _ = config_from_flower(context.run_config)
    session = session_for(cfg)
    reply, memory = session.train(_plan_blob(message), _memory(context), _client_id(context))
    _remember(context, memory)
    blob = pack_error(reply) if isinstance(reply, BaseException) else pack_reply(reply)
    return _reply(message, blob)


@client_app.evaluate()
def client_evaluate(message: Message, context: Context) -> Message:
    from fedlora.flower.node import session_for
    from fedlora.flower.wire import pack

    cfg, _ = config_from_flower(context.run_config)
    result, memory = session_for(cfg).evaluate(_plan_blob(message), _memory(context), _client_id(context))
    _remember(context, memory)
    return _reply(message, pack(result, {}))


__all__ = ["server_app", "client_app", "config_from_flower", "FLOWER_KEYS", "RecordDict"]
