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

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, RunConfig
from fedlora.flower.secagg import (
    SECAGG_DEFAULTS,
    SECAGG_KEYS,
    SecAggSettings,
    fitins_plan,
    fitres_content,
    is_fitins,
    secure_mod,
)

log = logging.getLogger("fedlora")

FLOWER_KEYS = {
    "resume": "a run directory to resume (on the ServerApp's machine); empty: a new run",
    "reply-timeout": "seconds the server waits for a round's replies; a node that has not replied by then is rejected",
    "node-wait": "seconds the server waits at the start for one SuperNode per client to connect",
    **SECAGG_KEYS,
}
"""Run-config keys of the Flower app beyond ``fedlora run``'s options."""


@dataclass(frozen=True)
class FlowerOptions:
    resume: str | None = None
    reply_timeout: float = 600.0
    node_wait: float = 120.0
    secagg: SecAggSettings | None = None
    """Secure aggregation (SecAgg+) settings; None: off."""


FLOWER_DEFAULTS = {
    "resume": "",
    "reply-timeout": FlowerOptions.reply_timeout,
    "node-wait": FlowerOptions.node_wait,
    **SECAGG_DEFAULTS,
}


def config_from_flower(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """The run's :class:`RunConfig` and Flower options from a Flower run config (validated; ConfigError)."""
    values: dict[str, Any] = {}
    method_options: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    for key, value in run_config.items():
        if key == "progress":
            continue
        if key.startswith(("method-options.", "method_options.")):
            method_options[key.split(".", 1)[1]] = value
        elif key.replace("_", "-") in FLOWER_KEYS:
            flower[key.replace("_", "-")] = value
        else:
            values[key] = value
    if method_options:
        values["method_options"] = method_options
    nullable = {f.name for f in dataclasses.fields(RunConfig) if f.metadata["nullable"]}
    for key, value in list(values.items()):  # TOML has no null: the app's config says "null"
        if key.replace("-", "_") in nullable and isinstance(value, str) and value.strip().lower() == "null":
            values[key] = None
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
    secagg = SecAggSettings.from_run_config(flower)
    if secagg is not None:
        from fedlora.flower.secagg import refusal

        why = refusal(cfg, secagg)
        if why:
            raise ConfigError(why)
        opts = dataclasses.replace(opts, secagg=secagg)
    return cfg, opts


# ------------------------------------------------------------------------------------------------ server
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run (or resume) a fedlora run with the connected SuperNodes as its clients."""
    from fedlora.api import resume, run
    from fedlora.flower.server import FlowerRuntime, accepted_rounds, discover

    log.setLevel(logging.INFO)
    cfg, opts = config_from_flower(context.run_config)

    def make_runtime(setup: Any, run_dir: Any) -> FlowerRuntime:
        labels = list(setup.data_info["labels"])
        found = discover(grid, cfg.clients, wait=opts.node_wait, labels=labels)
        log.info("clients → nodes: %s", {c: found.nodes[c] for c in sorted(found.nodes)})
        if found.declared_examples:
            log.info("clients with their own data (declared training examples): %s", found.declared_examples)
        return FlowerRuntime(
            grid,
            found.nodes,
            setup.engine,
            reply_timeout=opts.reply_timeout,
            run_key=run_dir.run_id,  # the nodes keep their clients' state by it
            labels=labels,
            declared_examples=found.declared_examples,
            secagg=opts.secagg,
            accepted_round=accepted_rounds(run_dir.read_metrics()),  # a resumed run: what the nodes must commit
        )

    if opts.resume:
        result = resume(opts.resume, runtime=make_runtime, rounds=cfg.rounds)
    else:
        result = run(cfg, runtime=make_runtime)
    log.info("run finished: %s (%s)", result.run_dir, result.final)


# ------------------------------------------------------------------------------------------------ client
client_app = ClientApp()
MEMORY = "fedlora-memory"
RECORD = "fedlora"
"""The config record of every fedlora message: ``plan`` (down) or ``reply`` (up) bytes."""


def make_content(**fields: bytes) -> RecordDict:
    """A fedlora message's content: the given bytes in the ``fedlora`` config record."""
    return RecordDict({RECORD: ConfigRecord(dict(fields))})


def _client_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"this SuperNode has partition-id={value!r}: start it with --node-config 'partition-id=K "
            "num-partitions=N' (K = the client it is, 0-based)"
        )
    return value


WORKER_KEY = "fedlora-worker"
DATA_KEY = "fedlora-data"
"""Node config: a local data file that is this client's data (instead of its partition of the run's dataset)."""
MODEL_KEY = "fedlora-model"
"""Node config: the only model this node serves (a run configured with another model is refused)."""
STATE_KEY = "fedlora-state-dir"
"""Node config: where the node keeps its clients' memories on disk (survives a restart of the ServerApp)."""
NODE_KEYS = (DATA_KEY, MODEL_KEY, STATE_KEY)


def _handle(kind: str, message: Message, context: Context) -> Message:
    """Run a message through this node's fedlora session: in this process, or in the node worker that
    ``fedlora node`` started (``fedlora-worker`` in the node config), which keeps the model loaded across rounds.
    The client's memory goes in from the Context and comes back into it."""
    header = {
        "kind": kind,
        "client_id": _client_id(context),
        "run_config": dict(context.run_config),
        **{k: context.node_config[k] for k in NODE_KEYS if context.node_config.get(k)},
    }
    plan = message.content.config_records[RECORD]["plan"]
    record = context.state.config_records.get(MEMORY)
    memory = record["memory"] if record is not None and "memory" in record else b""
    worker = context.node_config.get(WORKER_KEY)
    if worker:
        from fedlora.flower.worker import forward

        timeout = reply_timeout_of(context.run_config)
        reply, memory = forward(str(worker), header, plan, memory, timeout=timeout)
    else:
        from fedlora.flower.worker import handle_request

        _, reply, memory = handle_request(header, plan, memory)
    if memory:
        context.state.config_records[MEMORY] = ConfigRecord({"memory": memory})
    return Message(make_content(reply=reply), reply_to=message)


def reply_timeout_of(run_config: Mapping[str, Any]) -> float:
    """The run's reply timeout alone (no model code imported: a forwarding ClientApp stays light)."""
    raw = next((v for k, v in run_config.items() if k.replace("_", "-") == "reply-timeout"), None)
    try:
        return float(raw) if raw is not None else FlowerOptions.reply_timeout
    except (TypeError, ValueError):
        return FlowerOptions.reply_timeout


@client_app.query()
def client_hello(message: Message, context: Context) -> Message:
    return _handle("hello", message, context)


@client_app.train(mods=[secure_mod])
def client_train(message: Message, context: Context) -> Message:
    if is_fitins(message):  # a SecAgg+ round: the plan comes in the legacy FitIns, the answer goes as a FitRes
        plan, settings = fitins_plan(message)
        message.content.config_records[RECORD] = ConfigRecord({"plan": plan})
        reply = _handle("train", message, context).content.config_records[RECORD]["reply"]
        return Message(fitres_content(reply, _client_id(context), settings), reply_to=message)
    return _handle("train", message, context)


@client_app.evaluate()
def client_evaluate(message: Message, context: Context) -> Message:
    return _handle("evaluate", message, context)


__all__ = ["server_app", "client_app", "config_from_flower", "FLOWER_KEYS", "RecordDict"]
