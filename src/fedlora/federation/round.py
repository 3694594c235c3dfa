"""One federated round, shared by every engine: sample → plan → client work → validate → aggregate → evaluate.

Engines supply a :class:`Runtime` that moves data (the local engine trains in-process on one shared model; a
Flower engine sends messages); everything else — which clients take part, what they receive (including the
changes of the base weights they have not seen yet), whether a reply is acceptable (against the plan: keys,
ranks, scales, shapes, dtypes, finite values, counts, after decoding its codec), the aggregation, and the bytes
that travelled (counted on encoded payloads) — is decided here, once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import numbers
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedlora.adapters.peft_io import dense_delta
from fedlora.adapters.state import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterState
from fedlora.client.codecs import CodecError, decode_state, encode_state, parse_codec, payload_bytes
from fedlora.methods.base import (
    BaseUpdate,
    ClientPlan,
    ClientUpdate,
    FedMethod,
    ModuleRank,
    ServerState,
    derive_seed,
)
from fedlora.privacy.user_level import UserLevelDP, noisy_mean, reference_for, update_delta, update_norm

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
    """1-based: the k-th round of the run (the checkpoint written after it is ``round-000k``)."""
    sampled: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    clipped: dict[int, str]
    """Replies accepted after their update was scaled back onto the norm bound."""
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
            **({"clipped": {str(k): v for k, v in self.clipped.items()}} if self.clipped else {}),
            "train_loss": self.train_loss,
            **self.metrics,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "seconds": round(self.seconds, 3),
        }


def sample_size(num_clients: int, *, per_round: int | None = None, fraction: float | None = None) -> int:
    """Clients per round under fixed-size sampling: ``per_round``, else ``round(fraction·N)`` (at least 1), else
    all."""
    if per_round is not None:
        k = per_round
    elif fraction is not None:
        k = max(1, round(fraction * num_clients))
    else:
        k = num_clients
    return min(k, num_clients)


def sample_clients(
    num_clients: int,
    rnd: int,
    seed: int,
    *,
    per_round: int | None = None,
    fraction: float | None = None,
    sampling: str = "fixed",
) -> list[int]:
    """The clients of round ``rnd`` (seeded by run seed and round; sorted). ``sampling="fixed"``: :func:`sample_size`
    clients drawn without replacement; ``"poisson"``: each client independently with probability ``fraction`` (a
    round may have none)."""
    if sampling == "poisson":
        if fraction is None or not 0 <= fraction <= 1:
            raise ValueError(f"Poisson sampling needs a fraction in [0, 1], got {fraction!r}")
        rng = random.Random(derive_seed(seed, "poisson", rnd))
        return [c for c in range(num_clients) if rng.random() < fraction]
    if sampling != "fixed":
        raise ValueError(f"sampling={sampling!r}; allowed: 'fixed', 'poisson'")
    k = sample_size(num_clients, per_round=per_round, fraction=fraction)
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


def _count(name: str, value: Any) -> tuple[int | None, str | None]:
    """``(count, None)`` for a positive finite integer (an int, an integral float or a NumPy integer), else
    ``(None, reason)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"{name}={value!r:.60} is a {type(value).__name__}, not an integer"
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        return None, f"{name}={value!r:.60} is not a number"
    if not math.isfinite(as_float) or as_float != int(as_float):
        return None, f"{name}={value!r:.60} is not a finite integer"
    if as_float <= 0:
        return None, f"{name}={value!r:.60} must be positive"
    return int(as_float), None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def decode_reply(update: ClientUpdate | Exception, plan: ClientPlan) -> ClientUpdate | str:
    """The reply with its payload decoded and checked against ``plan``, or the reason to reject it.

    Nothing about the reply is trusted before it is checked here, and checking never raises: any failure of a
    check is itself a reason to reject. What is returned holds only plain values the server made (ints, the
    plan's ranks and scales, detached dense CPU tensors).
    """
    try:
        return _decode_reply(update, plan)
    except Exception as e:  # a reply so odd that a check itself failed is rejected, never raised
        return f"reply cannot be checked: {type(e).__name__}: {str(e)[:200]}"


def _decode_reply(update: ClientUpdate | Exception, plan: ClientPlan) -> ClientUpdate | str:
    if isinstance(update, BaseException):
        return f"client failed: {type(update).__name__}: {str(update)[:300]}"
    if type(update) is not ClientUpdate:
        return f"reply is a {type(update).__name__}, not a ClientUpdate"
    cid = update.client_id
    if isinstance(cid, bool) or not isinstance(cid, int) or cid != plan.client_id:
        return f"client_id: reply from client {cid!r:.40} to the plan of client {plan.client_id}"
    counts = {}
    for name in ("num_examples", "samples_seen"):
        counts[name], why = _count(name, getattr(update, name))
        if why:
            return why
    if not isinstance(update.state, Mapping):
        return f"state is a {type(update.state).__name__}, not a mapping"
    if not all(isinstance(k, str) for k in update.state):
        return "state: keys must be strings"
    # ranks and scales: what the plan expects from this client
    if not isinstance(update.ranks, Mapping):
        return f"ranks is a {type(update.ranks).__name__}, not a mapping"
    ranks = update.ranks
    if set(ranks) != set(plan.ranks):
        return f"ranks: modules {sorted(map(str, set(ranks) ^ set(plan.ranks)))[:3]} unlike the plan"
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, spec in plan.upload.items():
        shapes[key] = (tuple(spec.shape), spec.dtype)
    clean_ranks: dict[str, ModuleRank] = {}
    for name, want in plan.ranks.items():
        got = ranks[name]
        r, s = getattr(got, "rank", None), getattr(got, "scale", None)
        if isinstance(r, bool) or not isinstance(r, int):
            return f"ranks[{name}]: rank {r!r:.40} is not an integer"
        if not (r == want.rank or (plan.rank_may_shrink and 1 <= r <= want.rank)):
            return f"ranks[{name}]: rank {r}, plan expects {want.rank}" + (" or lower" if plan.rank_may_shrink else "")
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or float(s) != want.scale:
            return f"ranks[{name}]: scale {s!r:.40}, plan expects {want.scale!r}"
        clean_ranks[name] = ModuleRank(int(r), want.scale)
        for suffix, dim in ((LORA_A_SUFFIX, 0), (LORA_B_SUFFIX, 1)):
            key = name + suffix
            if key in shapes and r != want.rank:
                shape = list(shapes[key][0])
                shape[dim] = r
                shapes[key] = (tuple(shape), shapes[key][1])
    for key, t in update.state.items():  # before any arithmetic touches a payload tensor
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return f"payload {key}: a {type(t).__name__}, not a torch tensor"
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            return f"payload {key}: a {t.layout}/{t.device.type} tensor, expected a dense CPU tensor"
    try:
        codec = parse_codec(plan.upload_codec)
        payload = {k: v.detach() for k, v in update.state.items()}
        state = decode_state(codec, payload, shapes, plan.download)
    except CodecError as e:
        return f"payload: {e}"
    except Exception as e:  # a payload that even decoding chokes on is rejected, never raised
        return f"payload cannot be decoded: {type(e).__name__}: {str(e)[:200]}"
    got, want_keys = set(state), set(plan.upload)
    if got != want_keys:
        missing, extra = sorted(want_keys - got), sorted(got - want_keys)
        return f"keys differ: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for key, (shape, dtype) in shapes.items():
        t = state[key]
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return f"{key} is a {type(t).__name__}, not a tensor"
        if t.layout != torch.strided or t.device.type != "cpu":
            return f"{key} is a {t.layout}/{t.device.type} tensor, expected a dense CPU tensor"
        if tuple(t.shape) != shape:
            return f"{key} has shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dtype:
            return f"{key} has dtype {t.dtype}, expected {dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{key} has non-finite values"
    state = {k: v.detach() for k, v in state.items()}
    return replace(
        update,
        state=state,
        ranks=clean_ranks,
        num_examples=counts["num_examples"],
        samples_seen=counts["samples_seen"],
        metrics=_display_metrics(update.metrics),
    )


def _display_metrics(metrics: Any) -> dict[str, float]:
    """The client's reported metrics that are finite numbers under string keys (they are only displayed)."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for k, v in itertools.islice(metrics.items(), 32):
        if isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def validate_update(update: ClientUpdate | Exception, plan: ClientPlan) -> str | None:
    """Why a reply must be rejected, or None when it is acceptable."""
    out = decode_reply(update, plan)
    return out if isinstance(out, str) else None


@dataclass(frozen=True)
class RoundPolicy:
    """How much the server trusts clients, and simulated client failures (all seeded, all deterministic).

    *Counts.* ``client_examples`` (when the server knows each client's training-set size, as the local engine
    does) must equal a reply's ``num_examples``; ``max_samples_per_stage`` bounds ``samples_seen`` (times the
    plan's stages). A reply claiming other counts is rejected. Methods also cap each client's share of a round
    (``max_weight_ratio``, applied in :meth:`fedlora.methods.base.FedMethod.weights`).

    *Update norm.* A reply's update is what it uploaded minus what it started from (what it was sent, and the
    factors a re-initialising plan draws: :meth:`fedlora.methods.base.FedMethod.reference`; zero for other keys).
    With ``norm_bound=c``, an update whose norm exceeds ``c`` times the round's median update norm (lower median,
    over the valid replies) is rejected (``norm_action="reject"``, the default) or scaled back onto that bound
    (``"clip"``). Clipping still lets a client push with ``c`` times a typical step in its own direction: on the
    default task a ×100 update clipped to 3× the median cost 11 points after 3 rounds, so rejecting is the default
    (honest updates there stay within 1.6× the median).

    *Direction.* With ``min_cosine=t``, an update whose cosine similarity with the round's coordinate-wise median
    update is below ``t`` is rejected (a sign-flipped update points away from what the others agree on; honest
    non-IID updates measured 0.1–0.6 on the default task). Computed over the keys every reply has at one shape.

    Norm bound and direction need at least 3 valid replies to mean anything; with fewer they are skipped.

    *Failures.* Each sampled client fails mid-round with probability ``dropout`` (after a random part of its
    local steps; its reply is an error and is rejected), otherwise it is a straggler with probability
    ``stragglers`` and does only ``straggler_work`` of its local steps.
    """

    client_examples: Mapping[int, int] | None = None
    max_samples_per_stage: Mapping[int, int] | None = None
    norm_bound: float | None = 3.0
    norm_action: str = "reject"
    min_cosine: float | None = 0.0
    dropout: float = 0.0
    stragglers: float = 0.0
    straggler_work: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.norm_action not in ("clip", "reject"):
            raise ValueError(f"norm_action={self.norm_action!r}; allowed: 'clip', 'reject'")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError(f"min_cosine={self.min_cosine!r} must be in [-1, 1] (or None)")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound >= 1):
            raise ValueError(f"norm_bound={self.norm_bound!r} must be a finite number >= 1 (or None)")
        for name in ("dropout", "stragglers"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1)")
        if not 0 < self.straggler_work <= 1:
            raise ValueError(f"straggler_work={self.straggler_work!r} must be in (0, 1]")

    def failure(self, rnd: int, client_id: int) -> tuple[float, float | None]:
        """``(work, fail_after)`` of a client in round ``rnd``: the share of its local steps it does, and the share
        after which it fails (None: it does not fail)."""
        if not (self.dropout or self.stragglers):
            return 1.0, None
        rng = random.Random(derive_seed(self.seed, "failure", rnd, client_id))
        fails, slow, where = rng.random(), rng.random(), rng.random()
        if fails < self.dropout:
            return 1.0, 0.1 + 0.8 * where
        return (self.straggler_work, None) if slow < self.stragglers else (1.0, None)

    def check_counts(self, update: ClientUpdate, plan: ClientPlan) -> str | None:
        """Why the reply's counts contradict what the server knows (None when they do not)."""
        cid = plan.client_id
        if self.client_examples is not None and cid in self.client_examples:
            known = self.client_examples[cid]
            if update.num_examples != known:
                return f"num_examples={update.num_examples}, but client {cid} holds {known} training examples"
        if self.max_samples_per_stage is not None and cid in self.max_samples_per_stage:
            most = self.max_samples_per_stage[cid] * len(plan.stages)
            if update.samples_seen > most:
                return f"samples_seen={update.samples_seen} exceeds the {most} its local budget allows"
        return None


_reference = reference_for
"""What the client was sent for ``key`` (cut to ``like``'s shape for a lower rank), or zeros."""


def _deltas(update: ClientUpdate, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reply's update: what it uploaded minus what it started from (zeros for keys the server cannot know),
    float32 (:func:`fedlora.privacy.user_level.update_delta`, which the clients' own DP noise uses too)."""
    return update_delta(update.state, reference)


def _cosines(deltas: Sequence[Mapping[str, torch.Tensor]]) -> list[float] | None:
    """Cosine of each update with the coordinate-wise median update, over the keys every reply has (a LoRA factor
    of a lower rank is zero-padded to the largest: its first rows/columns are the same rank slots). None when the
    replies share no key."""
    keys = sorted(k for k in deltas[0] if all(k in d and d[k].dim() == deltas[0][k].dim() for d in deltas))
    if not keys:
        return None
    parts = []
    for k in keys:
        shape = [max(d[k].shape[i] for d in deltas) for i in range(deltas[0][k].dim())]
        padded = []
        for d in deltas:
            t = d[k]
            if list(t.shape) != shape:
                full = torch.zeros(shape, dtype=t.dtype)
                full[tuple(slice(0, n) for n in t.shape)] = t
                t = full
            padded.append(t.reshape(-1))
        parts.append(torch.stack(padded))
    vecs = torch.cat(parts, dim=1)
    center = vecs.median(dim=0).values
    den = vecs.norm(dim=1) * center.norm()
    return [float(x) for x in torch.where(den > 0, (vecs @ center) / den.clamp_min(1e-30), 0.0)]


def bound_influence(
    accepted: list[ClientUpdate], references: Mapping[int, Mapping[str, torch.Tensor]], policy: RoundPolicy
) -> tuple[list[ClientUpdate], dict[int, str], dict[int, str]]:
    """Apply ``policy``'s direction check and norm bound to the round's valid replies (each measured from its
    client's ``references``: :meth:`FedMethod.reference`): returns the replies kept (clipped ones scaled back onto
    the bound), the rejected ones and the clipped ones (client → reason)."""
    if len(accepted) < 3 or (policy.norm_bound is None and policy.min_cosine is None):
        return accepted, {}, {}
    deltas = [_deltas(u, references[u.client_id]) for u in accepted]
    rejected: dict[int, str] = {}
    if policy.min_cosine is not None:
        cosines = _cosines(deltas)
        log.debug("update cosines with the median update: %s", cosines)
        for u, cos in zip(accepted, cosines or [], strict=False):
            if cos < policy.min_cosine:
                rejected[u.client_id] = f"update points away from the round's median update (cosine {cos:.3f})"
    norms = [math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in d.values())) for d in deltas]
    valid = sorted(n for u, n in zip(accepted, norms, strict=True) if u.client_id not in rejected) or [0.0]
    median = valid[(len(valid) - 1) // 2]
    bound = policy.norm_bound * median if policy.norm_bound is not None and median > 0 else math.inf
    kept, clipped = [], {}
    for u, d, norm in zip(accepted, deltas, norms, strict=True):
        if u.client_id in rejected:
            continue
        if norm <= bound:
            kept.append(u)
            continue
        why = f"update norm {norm:.4g} > {policy.norm_bound:g} x median {median:.4g}"
        if policy.norm_action == "reject":
            rejected[u.client_id] = why
            continue
        factor = bound / norm
        ref = references[u.client_id]
        state = {k: (_reference(ref, k, v) + d[k] * factor).to(v.dtype) for k, v in u.state.items()}
        kept.append(replace(u, state=state))
        clipped[u.client_id] = why + " (clipped)"
    return kept, rejected, clipped


def _reported_loss(update: ClientUpdate) -> float:
    """The client's reported training loss (sanitised by :func:`decode_reply`; only displayed)."""
    return float(update.metrics.get("train_loss", math.nan))


def _finite(state: Mapping[str, torch.Tensor]) -> str | None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def _private_policy(policy: RoundPolicy, privacy: UserLevelDP | None) -> RoundPolicy:
    """The policy under user-level DP. The direction check is off: it compares each update with the others (so one
    client's data would decide whether another's update is used, which the noise does not cover), and noisy client
    uploads have near-zero cosines. With server noise the relative norm bound is off as well, for the same reason:
    the fixed clip ``dp_clip`` bounds every update instead. With client noise it stays (the norms of noisy updates
    concentrate, so it only catches outsized replies; what the server does with noisy uploads costs no privacy).
    Reply validation and the known-count checks concern one reply each and always run."""
    if privacy is None:
        return policy
    if privacy.noise_at == "server":
        return replace(policy, min_cosine=None, norm_bound=None)
    return replace(policy, min_cosine=None)


def _noisy_release(
    rnd: int,
    method: FedMethod,
    server: ServerState,
    plans: Sequence[ClientPlan],
    accepted: list[ClientUpdate],
    refs: Mapping[int, Mapping[str, torch.Tensor]],
    dp: UserLevelDP,
) -> tuple[list[ClientUpdate], dict[str, float]]:
    """Server-side DP (DP-FedAvg): the replies the method aggregates, each accepted one replaced by ``reference +
    D``, where ``D`` is the sum of the clipped updates plus Gaussian noise, divided by the fixed denominator
    (:func:`fedlora.privacy.user_level.noisy_mean`). With no accepted reply the round still releases ``reference +
    noise/denominator``, through one stand-in reply built from a plan (the noise must not depend on whether anyone
    took part). Also returns ``dp_clipped`` (updates longer than the clip) and ``dp_median_norm`` (their median norm
    before clipping): the operator's tuning aids, not part of the private release."""
    if accepted:
        first = accepted[0]
        ref, like, ranks, owner = refs[first.client_id], dict(first.state), first.ranks, first.client_id
        for u in accepted[1:]:
            same = set(u.state) == set(like) and all(u.state[k].shape == like[k].shape for k in like)
            other = refs[u.client_id]
            if not same or any(
                not torch.equal(reference_for(other, k, v), reference_for(ref, k, v)) for k, v in like.items()
            ):
                raise RuntimeError(
                    f"{method.id}: server-side DP needs every client to start from the same reference and upload "
                    f"the same tensors; client {u.client_id} differs from client {first.client_id}"
                )
    else:
        plan = plans[0] if plans else prepare_plan(method.plan(rnd, 0, server), server)[0]
        ref, ranks, owner = method.reference(plan), plan.ranks, plan.client_id
        like = {k: torch.zeros(spec.shape, dtype=spec.dtype) for k, spec in plan.upload.items()}
    deltas = [_deltas(u, refs[u.client_id]) for u in accepted]
    mean = noisy_mean(
        deltas, like, clip=dp.clip, noise=dp.noise, denominator=dp.denominator, generator=dp.generator("server", rnd)
    )
    state = {k: (reference_for(ref, k, v) + mean[k]).to(v.dtype) for k, v in like.items()}
    norms = sorted(update_norm(d) for d in deltas)
    metrics = {"dp_clipped": float(sum(n > dp.clip for n in norms))}
    if norms:
        metrics["dp_median_norm"] = norms[(len(norms) - 1) // 2]
    else:
        log.info("round %d: no accepted reply; the server releases noise alone", rnd + 1)
        stand_in = ClientUpdate(client_id=owner, state=state, num_examples=1, samples_seen=1, ranks=dict(ranks))
        return [stand_in], metrics
    return [replace(u, state=dict(state)) for u in accepted], metrics


# ------------------------------------------------------------------------------------------------ secure rounds
@dataclass(frozen=True)
class SecureShare:
    """One participant of a securely aggregated round as the protocol reveals it: the weight its upload was given
    in the mean, and its counts (both sent in the clear; untrusted until checked)."""

    weight: Any
    num_examples: Any
    samples_seen: Any


@dataclass(frozen=True)
class SecureAggregate:
    """What a securely aggregated round gives the server: never an individual upload, only their weighted mean."""

    mean: dict[str, torch.Tensor] | None
    """``Σ w_k x_k / Σ w_k`` over the participants, per uploaded key (None when the protocol failed)."""
    shares: dict[int, SecureShare]
    """Who took part (client id → weight and counts): exactly the clients whose upload is in the mean."""
    dropped: dict[int, str]
    """Sampled clients that dropped out (client id → why)."""
    train_loss: float = math.nan
    """The participants' training loss, averaged with the same weights."""
    bytes_up: int = 0
    error: str | None = None
    """Why the mean is unusable, beyond drop-outs (e.g. its arrays do not match the plan)."""


class SecureRuntime(Protocol):
    """A runtime that aggregates securely: one protocol run per round instead of :meth:`Runtime.train`."""

    def train_secure(self, plans: Sequence[ClientPlan], *, max_weight: float | None) -> SecureAggregate:
        """Run the plans' client work and securely aggregate what they upload; ``max_weight`` is the largest weight
        a client can rightly claim (None: unknown)."""
        ...


def secure_runtime(runtime: Any) -> SecureRuntime | None:
    """``runtime`` (or the runtime it wraps as ``.runtime``, as the DP-SGD accountant does) when it aggregates
    securely (``secure_aggregation`` true), else None."""
    for _ in range(8):
        if runtime is None:
            return None
        if getattr(runtime, "secure_aggregation", False) is True and callable(getattr(runtime, "train_secure", None)):
            return runtime
        runtime = getattr(runtime, "runtime", None)
    return None


def _weight_bound(method: FedMethod, plans: Sequence[ClientPlan], policy: RoundPolicy) -> float | None:
    """The largest weight a sampled client can rightly claim under the method's weighting (None when the server
    does not know it)."""
    if method.weighting == "uniform":
        return 1.0
    stages = method.weighting == "samples_seen"
    known = policy.max_samples_per_stage if stages else policy.client_examples
    if known is None or any(p.client_id not in known for p in plans):
        return None
    return float(max(known[p.client_id] * (len(p.stages) if stages else 1) for p in plans))


def _secure_replies(
    rnd: int, method: FedMethod, plans: Sequence[ClientPlan], runtime: SecureRuntime, policy: RoundPolicy
) -> tuple[list[ClientUpdate], list[ClientUpdate], dict[int, str], int, dict[str, float]]:
    """A securely aggregated round: the participants (count-only stand-ins with no tensors: the server has no
    individual upload), the one update the method aggregates (the weighted mean of what travelled: for a method
    whose aggregate is a weighted mean of what travels, aggregating it alone gives the method's own result), the
    rejected clients, the bytes up and metrics.

    Checks that need individual uploads cannot run and are skipped: the norm bound and the direction check. What
    can run does: each participant's counts (sent in the clear) against what the server knows, its weight against
    the method's weighting, and the mean against the plan (keys, shapes, dtypes, finite values). A failed check
    discards the round: no client's part can be taken out of the mean."""
    if not plans:
        return [], [], {}, 0, {}
    first = plans[0]
    for p in plans[1:]:
        if p.upload != first.upload or p.ranks != first.ranks or p.upload_codec != first.upload_codec:
            raise RuntimeError(
                f"{method.id}: secure aggregation needs every client of a round to upload the same tensors; the plan "
                f"of client {p.client_id} differs from client {first.client_id}'s"
            )
    if parse_codec(first.upload_codec).kind != "none":
        raise RuntimeError(
            f"{method.id}: its plans set upload codec {first.upload_codec!r}; secure aggregation sums dense values"
        )
    log.info(
        "round %d: securely aggregated: the server gets only the weighted mean of the uploads (the norm bound and "
        "the direction check need individual updates and are skipped)",
        rnd + 1,
    )
    out = runtime.train_secure(plans, max_weight=_weight_bound(method, plans, policy))
    by_id = {p.client_id: p for p in plans}
    rejected = {cid: f"secure aggregation: {why}" for cid, why in out.dropped.items() if cid in by_id}
    stubs: list[ClientUpdate] = []
    problems: dict[int, str] = {}
    for cid, share in sorted(out.shares.items()):
        plan = by_id.get(cid)
        if plan is None:
            problems[cid] = f"client {cid} took part without being sampled"
            continue
        counts: dict[str, int] = {}
        for name in ("num_examples", "samples_seen"):
            value, why = _count(name, getattr(share, name))
            if why:
                problems[cid] = why
                break
            counts[name] = value
        if cid in problems:
            continue
        stub = ClientUpdate(
            cid, {}, counts["num_examples"], counts["samples_seen"], {"train_loss": out.train_loss}, dict(plan.ranks)
        )
        want = {"uniform": 1, "num_examples": stub.num_examples, "samples_seen": stub.samples_seen}[method.weighting]
        why = policy.check_counts(stub, plan)
        if why is None and (isinstance(share.weight, bool) or share.weight != want):
            why = f"its weight in the secure mean is {share.weight!r:.40}, but its {method.weighting} weight is {want}"
        if why is not None:
            problems[cid] = why
        else:
            stubs.append(stub)
    for cid in by_id:
        if cid not in out.shares and cid not in rejected:
            rejected[cid] = "secure aggregation: no part in the aggregate"
    if not out.shares:
        return [], [], rejected, out.bytes_up, {}
    why_not = "; ".join(f"client {c}: {w}" for c, w in sorted(problems.items())) or out.error
    aggregate: ClientUpdate | str = why_not or "no aggregate"
    if why_not is None and out.mean is not None:
        owner = by_id[stubs[0].client_id]
        mean = ClientUpdate(
            owner.client_id,
            dict(out.mean),
            sum(u.num_examples for u in stubs),
            sum(u.samples_seen for u in stubs),
            {"train_loss": out.train_loss},
            dict(owner.ranks),
        )
        aggregate = decode_reply(mean, owner)
    if isinstance(aggregate, str):
        for cid in out.shares:
            rejected[cid] = problems.get(cid) or f"secure round discarded: {aggregate}"
        return [], [], rejected, out.bytes_up, {}
    metrics: dict[str, float] = {}
    raw = [u.num_examples if method.weighting == "num_examples" else u.samples_seen for u in stubs]
    if method.weighting != "uniform":
        capped = method.weights(stubs)
        over = [u.client_id for u, p, w in zip(stubs, capped, raw, strict=True) if p < w / sum(raw) - 1e-9]
        if over:  # the mean was weighted by the raw counts: SecAgg+ cannot reweigh one client afterwards
            log.warning(
                "round %d: max_weight_ratio would cap the weight of client(s) %s; the secure mean weighs them by "
                "their counts",
                rnd + 1,
                over,
            )
            metrics["secagg_uncapped"] = float(len(over))
    return stubs, [aggregate], rejected, out.bytes_up, metrics


def run_round(
    rnd: int,
    method: FedMethod,
    server: ServerState,
    runtime: Runtime,
    *,
    clients: Sequence[int],
    policy: RoundPolicy | None = None,
    privacy: UserLevelDP | None = None,
) -> tuple[ServerState, RoundReport]:
    """Run round ``rnd`` (0-based; reported as ``rnd + 1``) with the given sampled ``clients``; return the new
    server state and the report. With ``privacy`` (user-level DP), the policy's direction check is off and, with
    server noise, the accepted replies reach the method as one noisy mean update (:func:`_noisy_release`). A runtime
    that aggregates securely (:func:`secure_runtime`) gives only the weighted mean of the uploads, which reaches the
    method as one update (:func:`_secure_replies`)."""
    policy = _private_policy(policy or RoundPolicy(), privacy)
    start = time.perf_counter()
    plans: list[ClientPlan] = []
    bytes_down = 0
    client_base = dict(server.client_base)
    for c in clients:
        work, fail_after = policy.failure(rnd, c)
        plan, down = prepare_plan(replace(method.plan(rnd, c, server), work=work, fail_after=fail_after), server)
        plans.append(plan)
        bytes_down += down
        client_base[c] = server.base_version
    server = replace(server, client_base=client_base)
    secure = secure_runtime(runtime)
    agg_metrics: dict[str, float] = {}
    release_metrics: dict[str, float] = {}
    clipped: dict[int, str] = {}
    if secure is not None:  # the server gets only the weighted mean of the uploads: per-reply checks cannot run
        if privacy is not None and privacy.noise_at == "server":
            raise RuntimeError("server-side DP clips each client's update: it cannot run with secure aggregation")
        accepted, released, rejected, bytes_up, release_metrics = _secure_replies(rnd, method, plans, secure, policy)
    else:
        replies = runtime.train(plans)
        if len(replies) != len(plans):
            raise RuntimeError(f"runtime returned {len(replies)} replies for {len(plans)} plans")
        accepted = []
        rejected = {}
        bytes_up = 0
        for plan, reply in zip(plans, replies, strict=True):
            if isinstance(reply, ClientUpdate) and isinstance(reply.state, Mapping):
                with contextlib.suppress(Exception):  # not tensors: counted as nothing, rejected below
                    bytes_up += int(payload_bytes(reply.state))
            out = decode_reply(reply, plan)
            if isinstance(out, ClientUpdate):
                out = policy.check_counts(out, plan) or out
            if isinstance(out, ClientUpdate):
                accepted.append(out)
            else:
                rejected[plan.client_id] = out
        refs = {p.client_id: method.reference(p) for p in plans if p.client_id in {u.client_id for u in accepted}}
        accepted, too_large, clipped = bound_influence(accepted, refs, policy)
        rejected.update(too_large)
        released = accepted
        if privacy is not None and privacy.noise_at == "server":
            released, release_metrics = _noisy_release(rnd, method, server, plans, accepted, refs, privacy)
    for cid, why in sorted(rejected.items()):
        log.warning("round %d: rejected the reply of client %d: %s", rnd + 1, cid, why)
    for cid, why in sorted(clipped.items()):
        log.warning("round %d: client %d: %s", rnd + 1, cid, why)
    if released:
        result = method.aggregate(rnd, server, released)
        bad = _finite(result.adapter) or _finite(result.tensors or {})
        if bad is not None:
            log.warning(
                "round %d: the aggregate has non-finite values in %s; the global state is unchanged", rnd + 1, bad
            )
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
            agg_metrics = {**result.metrics, **release_metrics}
    else:
        log.warning("round %d: no acceptable reply; the global state is unchanged", rnd + 1)
        server = replace(server, round=rnd + 1)
    runtime.accept([u.client_id for u in accepted])
    metrics = {**agg_metrics, **runtime.evaluate(server)}
    losses = [(_reported_loss(u), u.samples_seen) for u in accepted]
    losses = [(v, n) for v, n in losses if math.isfinite(v)]
    seen = sum(n for _, n in losses)
    train_loss = sum(v * n for v, n in losses) / seen if seen else float("nan")
    report = RoundReport(
        round=rnd + 1,
        sampled=list(clients),
        accepted=[u.client_id for u in accepted],
        rejected=rejected,
        clipped=clipped,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        train_loss=train_loss,
        seconds=time.perf_counter() - start,
        metrics=metrics,
    )
    return server, report
