"""Secure aggregation on fedlora's Flower path, with Flower's own SecAgg+ (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020): ``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on each node.

With ``secure-aggregation=true`` one round's training is one SecAgg+ run over the sampled clients' nodes:

* **Down.** The workflow asks its strategy for each node's legacy ``FitIns``. :class:`PlanStrategy`, a shim and the
  only strategy it talks to, hands each node its packed fedlora plan (:func:`fedlora.flower.wire.pack_plan`) in the
  ``FitIns`` config, with the round's SecAgg+ settings the node checks its values against.
* **On the node.** The ClientApp's train function sees the ``FitIns`` (:func:`is_fitins`), runs fedlora's client
  code with the plan it carries (in process or in the node worker), and answers in the legacy ``FitRes`` format
  (:func:`fitres_content`): the tensors that travel, sorted by key, plus one scalar (the training loss, scaled into
  range), as numpy arrays; ``num_examples`` is the client's weight under the method's weighting (1, its
  training-set size or the samples it processed). ``secaggplus_mod`` multiplies the arrays by
  ``weight / max_weight``, quantises them to integers over ``[-c, c]`` (``c`` the clipping range; stochastic
  rounding), masks them and sends only the masked vector: the arrays themselves never leave the node.
* **Up.** The workflow unmasks the sum of the masked vectors of the clients that took part and hands the shim the
  weighted mean ``Σ w_k x_k / Σ w_k`` as the parameters of every result (one parameter set: the shim never sees an
  individual update, :meth:`PlanStrategy.aggregate_fit` checks it), with each participant's weight and counts, which
  Flower sends in the clear (``FitRes.num_examples`` and metrics).

The round logic (:func:`fedlora.federation.round.run_round`) turns that mean into the one update it hands to the
method's own ``aggregate``: only methods whose aggregate is an average of what travels can use secure aggregation
(:func:`fedlora.privacy.user_level.average_refusal`; :func:`refusal` says which and why).

**Precision.** Client ``k`` sends ``x_k·dq_k`` (``dq_k = round(w_k/W·Q)/Q``, ``W`` = ``max_weight``, the largest
weight a sampled client can rightly claim, so ``dq_k ≤ 1``) quantised to a step of ``2c/Q`` (``Q`` the quantisation
range) by stochastic rounding: an error below one step. The unmasked sum is divided by ``Σ dq_k`` (at least 1 when
the largest client takes part), so each coordinate of the mean is off by less than ``2·K·c/Q`` for ``K``
participants; rounding the weights to ``1/Q`` moves it by at most ``K·c/Q`` more. In all, below ``3·K·c/Q`` per
coordinate and round: ``5.7e-6·K`` at the defaults (``c = 8``, ``Q = 2**22``).

**Clipping.** Flower clips values beyond ``±c`` silently. A node here refuses instead: a travelling value with
``|x| > c`` makes its turn fail with a message naming ``secagg-clipping-range`` (the client then drops out of that
round's protocol; its update is not in the mean).

This module imports neither torch nor the model code at the top: the node's side of it runs in a forwarding
ClientApp process, which must stay light.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.config import ConfigError

SECAGG_KEYS = {
    "secure-aggregation": (
        "true: each round's training goes through Flower's SecAgg+ protocol and the server learns only the weighted "
        "mean of what travels (docs/flower.md, Secure aggregation)"
    ),
    "secagg-num-shares": (
        "SecAgg+: how many shares of each client's secrets are made, an integer >= 3 or a float in (0, 1] (a "
        "fraction of the round's clients)"
    ),
    "secagg-reconstruction-threshold": (
        "SecAgg+: shares needed to rebuild a secret, an integer >= 2 or a float in (0, 1] (a fraction of the shares); "
        "higher resists more colluding clients, lower tolerates more drop-outs"
    ),
    "secagg-clipping-range": (
        "SecAgg+: every travelling value must lie in [-c, c] (a node refuses to send a larger one instead of letting "
        "Flower clip it)"
    ),
    "secagg-quantization-range": (
        "SecAgg+: integer levels over [-c, c] (a value is rounded to a step of 2c/levels); times the clients per "
        "round it must stay below 2**32"
    ),
}
"""The Flower app's run-config keys of secure aggregation (:data:`fedlora.flower.app.FLOWER_KEYS` includes them)."""

MODULUS_RANGE = 1 << 32
"""Flower's default (and largest) modulus of the masked sums."""

DEFAULT_MAX_WEIGHT = 1000.0
"""Flower's ``max_weight``, used when the server does not know the largest weight a client can claim."""

SECAGG_DEFAULTS: dict[str, Any] = {
    "secure-aggregation": False,
    "secagg-num-shares": 3,  # the values of Flower's own SecAgg+ example (the workflow itself has no default)
    "secagg-reconstruction-threshold": 2,
    "secagg-clipping-range": 8.0,  # SecAggPlusWorkflow's defaults
    "secagg-quantization-range": 1 << 22,
}

LOSS_CAP = 64.0
"""A client's training loss travels inside the secure sum as ``c·min(loss, LOSS_CAP)/LOSS_CAP`` (within range)."""

FITINS_CONFIG = "fitins.config"
PLAN_KEY = "fedlora.plan"
WEIGHTING_KEY = "fedlora.weighting"
CLIP_KEY = "fedlora.clipping-range"
MAX_WEIGHT_KEY = "fedlora.max-weight"
ERROR_PREFIX = "fedlora client "
"""Each error a node raises during SecAgg+ starts with ``fedlora client K:`` (readable in the server's log)."""


# ------------------------------------------------------------------------------------------------ settings
def _count_or_fraction(name: str, value: Any, least: int) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: an integer >= {least} or a float in (0, 1]")
    if isinstance(value, int):
        if value < least:
            raise ConfigError(f"{name}={value}: an integer must be >= {least} (or give a float in (0, 1])")
        return value
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ConfigError(f"{name}={value!r}: a float must be in (0, 1] (or give an integer >= {least})")
    return float(value)


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run (validated; :class:`ConfigError` names the bad option)."""

    num_shares: int | float = SECAGG_DEFAULTS["secagg-num-shares"]
    reconstruction_threshold: int | float = SECAGG_DEFAULTS["secagg-reconstruction-threshold"]
    clipping_range: float = SECAGG_DEFAULTS["secagg-clipping-range"]
    quantization_range: int = SECAGG_DEFAULTS["secagg-quantization-range"]

    def __post_init__(self) -> None:
        shares = _count_or_fraction("secagg-num-shares", self.num_shares, 3)
        threshold = _count_or_fraction("secagg-reconstruction-threshold", self.reconstruction_threshold, 2)
        if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
            raise ConfigError(
                f"secagg-reconstruction-threshold={threshold} must be below secagg-num-shares={shares} (Flower's rule)"
            )
        c = self.clipping_range
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
            raise ConfigError(f"secagg-clipping-range={c!r} must be a finite number > 0")
        q = self.quantization_range
        if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q < MODULUS_RANGE:
            raise ConfigError(f"secagg-quantization-range={q!r} must be an integer in [2, 2**32)")
        object.__setattr__(self, "num_shares", shares)
        object.__setattr__(self, "reconstruction_threshold", threshold)
        object.__setattr__(self, "clipping_range", float(c))

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> SecAggSettings | None:
        """The settings from the Flower run config's keys (``-`` or ``_``); None when secure aggregation is off."""
        given = {k.replace("_", "-"): v for k, v in values.items() if k.replace("_", "-") in SECAGG_KEYS}
        on = given.get("secure-aggregation", False)
        if isinstance(on, str) and on.strip().lower() in ("true", "false"):
            on = on.strip().lower() == "true"
        if not isinstance(on, bool):
            raise ConfigError(f"secure-aggregation={on!r} must be true or false")
        if not on:
            return None
        d = SECAGG_DEFAULTS
        return cls(
            num_shares=given.get("secagg-num-shares", d["secagg-num-shares"]),
            reconstruction_threshold=given.get("secagg-reconstruction-threshold", d["secagg-reconstruction-threshold"]),
            clipping_range=given.get("secagg-clipping-range", d["secagg-clipping-range"]),
            quantization_range=given.get("secagg-quantization-range", d["secagg-quantization-range"]),
        )

    def neighbourhood(self, k: int) -> tuple[int, int]:
        """``(neighbours, threshold)`` as the workflow sets them for a round of ``k`` clients (its own rules, in its
        order): each client shares its secrets with ``neighbours`` clients (itself included), and the protocol goes
        on while each keeps at least ``threshold`` of them."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * k)
            if shares < k and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = k
        else:
            shares = self.num_shares
        if isinstance(self.reconstruction_threshold, float):
            threshold = max(round(self.reconstruction_threshold * shares), 2)
        else:
            threshold = self.reconstruction_threshold
        if k != shares and shares % 2 == 0:
            shares += 1
        return min(2 * (shares // 2) + 1, k), threshold

    def workflow(self, *, max_weight: float, timeout: float) -> Any:
        """Flower's ``SecAggPlusWorkflow`` with these settings."""
        from flwr.server.workflow import SecAggPlusWorkflow

        return SecAggPlusWorkflow(
            self.num_shares,
            self.reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )


def refusal(cfg: Any, settings: SecAggSettings) -> str | None:
    """Why the run ``cfg`` (a resolved :class:`fedlora.config.RunConfig`) cannot use secure aggregation (None when
    it can). Checked before anything loads."""
    from fedlora.methods.base import get_method_class
    from fedlora.privacy.user_level import average_refusal, averaging_methods

    cls = get_method_class(cfg.method)
    why = average_refusal(cls)
    if why is not None:
        return (
            f"{cls.id} cannot use secure-aggregation: {why}. With SecAgg+ the server learns only the weighted mean of "
            "what the clients send, and the method is handed that mean as one update, which gives the method's own "
            f"result only for methods that average what travels. Use one of: {', '.join(averaging_methods())}"
        )
    if cfg.aggregator != "mean":
        return (
            f"aggregator={cfg.aggregator!r} with secure-aggregation: the server sees only the weighted mean, so there "
            "is nothing left for a robust aggregator to do; use aggregator=mean"
        )
    if cfg.dp_clip is not None and cfg.dp_noise_at == "server":
        return (
            "dp-noise-at='server' with secure-aggregation: server-side DP clips each client's update before adding "
            "noise, and with SecAgg+ the server never has an individual update; use dp-noise-at='client' (each "
            "client clips and noises its own update, and SecAgg+ then hides even the noisy updates)"
        )
    if cfg.upload_codec != "none":
        return (
            f"upload-codec={cfg.upload_codec!r} with secure-aggregation: SecAgg+ sums dense quantised vectors, so a "
            "compressed upload cannot be summed; use upload-codec='none'"
        )
    if cfg.client_sampling == "fixed":
        from fedlora.federation.round import sample_size

        k = sample_size(cfg.clients, per_round=cfg.clients_per_round, fraction=cfg.client_fraction)
        if k < 2:
            return f"secure-aggregation needs at least 2 clients per round (SecAgg+ refuses fewer); a round has {k}"
        neighbours, threshold = settings.neighbourhood(k)
        if threshold > neighbours:
            return (
                f"secagg-reconstruction-threshold: each client shares its secrets with {neighbours} clients of a "
                f"round of {k}, fewer than the {threshold} needed to rebuild them, so every round would halt; lower "
                "secagg-reconstruction-threshold or raise secagg-num-shares"
            )
    else:
        k = cfg.clients  # a Poisson round may hold every client
    if k * settings.quantization_range >= MODULUS_RANGE:
        return (
            f"secagg-quantization-range={settings.quantization_range}: up to {k} clients per round times the range "
            "must stay below 2**32 (the sums are taken modulo 2**32); lower secagg-quantization-range"
        )
    return None


# ------------------------------------------------------------------------------------------------ server side
@dataclass
class SecAggOutcome:
    """What the shim strategy was handed: the unmasked weighted mean and, per participating node, its weight and the
    counts it sent in the clear."""

    mean: list[np.ndarray] | None = None
    shares: dict[int, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    """node id → (weight, metrics) as the node sent them (untrusted)."""


class WatchedGrid:
    """The grid the workflow talks to, noting which node failed or fell silent at which stage (the workflow keeps
    its failures without node ids)."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}
        """node id → why it dropped out (its first error, or its first silence)."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.errors.setdefault(node, str(reply.error.reason)[:400])
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?")
                wait = f" within {timeout:g} s" if timeout is not None else ""
                self.errors.setdefault(node, f"no reply{wait} at the SecAgg+ {stage} stage")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class PlanStrategy:
    """The shim strategy SecAgg+ talks to: hands each node its ``FitIns`` (its fedlora plan) and keeps the one
    aggregate the workflow gives (never an individual update: the workflow hands every result the same, unmasked
    mean; :meth:`aggregate_fit` refuses anything else). Subclasses Flower's ``Strategy`` when built
    (:func:`make_strategy`)."""

    def __init__(self, fitins: Mapping[int, Any]) -> None:
        self.fitins = dict(fitins)
        self.outcome: SecAggOutcome | None = None
        self.seen: list[Any] = []
        """Every parameter set handed to :meth:`aggregate_fit` (tests check it is only ever the mean)."""

    def initialize_parameters(self, client_manager: Any) -> Any:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        return [(_proxy(node), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: Sequence[Any], failures: Sequence[Any]) -> tuple[Any, dict]:
        from flwr.common import parameters_to_ndarrays

        params = {id(res.parameters) for _, res in results}
        if len(params) > 1:
            raise RuntimeError("SecAgg+ handed the strategy more than one parameter set: an individual update?")
        self.seen.extend(res.parameters for _, res in results[:1])
        self.outcome = SecAggOutcome(
            mean=parameters_to_ndarrays(results[0][1].parameters) if results else None,
            shares={proxy.node_id: (res.num_examples, dict(res.metrics)) for proxy, res in results},
        )
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


@functools.cache
def _strategy_class() -> type:
    from flwr.server.strategy import Strategy

    return type("FedloraPlanStrategy", (PlanStrategy, Strategy), {})


def make_strategy(fitins: Mapping[int, Any]) -> PlanStrategy:
    """A :class:`PlanStrategy` that is also a Flower ``Strategy`` (what ``LegacyContext`` expects)."""
    return _strategy_class()(fitins)


@functools.cache
def _proxy_class() -> type:
    from flwr.server.client_proxy import ClientProxy

    class NodeProxy(ClientProxy):
        """A node as the legacy workflow names it (it uses only ``node_id``)."""

        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *a: Any, **k: Any) -> Any:
            raise NotImplementedError("a SecAgg+ shim proxy only names its node")

        get_parameters = fit = evaluate = reconnect = get_properties

    return NodeProxy


def _proxy(node_id: int) -> Any:
    return _proxy_class()(node_id)


def fitins_for(plan_blob: bytes, *, weighting: str, settings: SecAggSettings, max_weight: float) -> Any:
    """A node's legacy ``FitIns``: no parameters (everything is in the plan), the plan and what the node checks."""
    from flwr.common import FitIns, Parameters

    config = {
        PLAN_KEY: plan_blob,
        WEIGHTING_KEY: weighting,
        CLIP_KEY: settings.clipping_range,
        MAX_WEIGHT_KEY: float(max_weight),
    }
    return FitIns(Parameters(tensors=[], tensor_type=""), config)


def run_secagg(
    grid: Any, fitins: Mapping[int, Any], settings: SecAggSettings, *, rnd: int, max_weight: float, timeout: float
) -> tuple[SecAggOutcome | None, dict[int, str], PlanStrategy]:
    """One SecAgg+ run over the nodes of ``fitins`` (node id → ``FitIns``): the outcome (None when the protocol
    halted: too few clients were left to rebuild the masks), why each failed node dropped out (node id → reason),
    and the shim strategy."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    strategy = make_strategy(fitins)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy)  # type: ignore[arg-type]
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    watched = WatchedGrid(grid)
    settings.workflow(max_weight=max_weight, timeout=timeout)(watched, context)
    return strategy.outcome, watched.errors, strategy


def mean_arrays(
    outcome: SecAggOutcome, shapes: Sequence[tuple[int, ...]], clipping_range: float
) -> tuple[list[np.ndarray], float]:
    """The travelling tensors' mean (in key order) and the mean training loss from the workflow's arrays (raises
    ValueError when their number or shapes are not those of the plan)."""
    arrays = list(outcome.mean or [])
    if len(arrays) != len(shapes) + 1:
        raise ValueError(f"the secure aggregate has {len(arrays)} arrays, the plan {len(shapes)} tensors and a loss")
    for arr, shape in zip(arrays, shapes, strict=False):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"the secure aggregate has an array of shape {tuple(arr.shape)}, the plan {tuple(shape)}")
    loss = float(np.asarray(arrays[-1]).reshape(-1)[0]) * LOSS_CAP / clipping_range
    return arrays[:-1], loss


# ------------------------------------------------------------------------------------------------ node side
def secure_mod(message: Any, context: Any, call_next: Any) -> Any:
    """The ClientApp's train mod: SecAgg+ messages go through Flower's ``secaggplus_mod``; any other message (a
    plain fedlora train message) passes unchanged."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in message.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_fitins(message: Any) -> bool:
    """Is ``message`` the legacy ``FitIns`` of a SecAgg+ round (carrying a fedlora plan)?"""
    config = message.content.config_records.get(FITINS_CONFIG)
    return config is not None and PLAN_KEY in config


def fitins_plan(message: Any) -> tuple[bytes, dict[str, Any]]:
    """The plan blob a ``FitIns`` carries, and the settings that come with it."""
    config = message.content.config_records[FITINS_CONFIG]
    plan = config[PLAN_KEY]
    if not isinstance(plan, bytes):
        raise TypeError(f"{PLAN_KEY} is a {type(plan).__name__}, not bytes")
    return plan, {k: config[k] for k in (WEIGHTING_KEY, CLIP_KEY, MAX_WEIGHT_KEY)}


def _read_reply(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A fedlora reply blob (:func:`fedlora.flower.wire.pack`: 8-byte length, JSON header, safetensors) read
    without torch."""
    from safetensors.numpy import load

    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n])
    body = blob[8 + n :]
    return meta, (load(body) if body else {})


def weight_of(weighting: str, num_examples: int, samples_seen: int) -> int:
    """A client's SecAgg+ weight under the method's weighting (what the method's ``weights`` starts from)."""
    if weighting == "uniform":
        return 1
    if weighting == "num_examples":
        return num_examples
    if weighting == "samples_seen":
        return samples_seen
    raise ValueError(f"weighting={weighting!r}; allowed: num_examples, samples_seen, uniform")


def fitres_content(reply_blob: bytes, client_id: int, settings: Mapping[str, Any]) -> Any:
    """The legacy ``FitRes`` record ``secaggplus_mod`` expects, from this client's fedlora reply: the travelling
    tensors sorted by key and the scaled loss as arrays, its weight as ``num_examples``, and its counts as metrics.

    Raises (the client then drops out of the round's protocol) when its turn failed, when its weight exceeds the
    round's ``max_weight``, or when a travelling value lies outside the clipping range (Flower would clip it
    silently); each message starts with ``fedlora client K:``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    me = f"{ERROR_PREFIX}{client_id}:"
    meta, tensors = _read_reply(reply_blob)
    if meta.get("kind") == "error":
        raise RuntimeError(f"{me} {meta.get('reason')}")
    if meta.get("kind") != "reply":
        raise RuntimeError(f"{me} expected a reply, got {str(meta.get('kind'))[:40]!r}")
    clip, max_weight = float(settings[CLIP_KEY]), float(settings[MAX_WEIGHT_KEY])
    n, seen = int(meta["num_examples"]), int(meta["samples_seen"])
    weight = weight_of(str(settings[WEIGHTING_KEY]), n, seen)
    if weight > max_weight:
        raise ValueError(f"{me} its weight {weight} exceeds the round's max_weight {max_weight:g}")
    arrays = []
    for key in sorted(tensors):
        arr = np.asarray(tensors[key], dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"{me} {key} has non-finite values")
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if peak > clip:
            raise ValueError(
                f"{me} {key} holds a value of magnitude {peak:.4g}, beyond secagg-clipping-range={clip:g}: SecAgg+ "
                "would clip it silently. Raise secagg-clipping-range"
            )
        arrays.append(arr)
    loss = float(meta.get("metrics", {}).get("train_loss", 0.0))
    loss = min(max(loss, 0.0), LOSS_CAP) if math.isfinite(loss) else 0.0
    arrays.append(np.array([clip * loss / LOSS_CAP]))
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=weight,
        metrics={"num_examples": n, "samples_seen": seen},
    )
    return fitres_to_recorddict(fitres, keep_input=False)
