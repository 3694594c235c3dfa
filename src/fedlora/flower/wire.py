"""What travels between a Flower ServerApp and its ClientApps: plans down, replies up, as plain bytes.

A blob is ``8-byte length | JSON header | safetensors payload``: no pickle, nothing executable, so a ClientApp's
reply can be parsed without trusting it. :func:`unpack_reply` only rebuilds a :class:`ClientUpdate` from what it
finds; every check of it (types, counts, ranks, keys, shapes, dtypes, finite values) is done by the round logic
(:func:`fedlora.federation.round.decode_reply`), as for any engine. This module imports no Flower code: the same
bytes go into a Flower record or over a node's local socket.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, ModuleRank, Stage, TensorSpec

MAX_HEADER_BYTES = 4 << 20
_DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.int16,
    )
}


class WireError(ValueError):
    """A blob that is not a well-formed fedlora message."""


class ClientFailed(RuntimeError):
    """The client reported that its turn failed (a simulated drop-out, an error in its training)."""


def pack(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    """``meta`` (JSON) and ``tensors`` (safetensors) as one blob."""
    header = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode()
    body = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}) if tensors else b""
    return struct.pack("<Q", len(header)) + header + body


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``(meta, tensors)`` of a blob; :class:`WireError` when it is not one."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got a {type(blob).__name__}")
    blob = bytes(blob)
    if not blob:
        raise WireError("blob shorter than its length prefix")
    meta = peek_meta(blob)
    body = blob[8 + struct.unpack("<Q", blob[:8])[0] :]
    try:
        tensors = st_load(body) if body else {}
    except Exception as e:  # safetensors' own errors: malformed payload
        raise WireError(f"payload is not safetensors: {type(e).__name__}: {str(e)[:200]}") from None
    return meta, tensors


def peek_meta(blob: bytes) -> dict[str, Any]:
    """The JSON header of a blob without decoding its tensors (``{}`` for an empty blob)."""
    if not blob:
        return {}
    if len(blob) < 8:
        raise WireError("blob shorter than its length prefix")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise WireError(f"header length {n} is out of range for a blob of {len(blob)} bytes")
    try:
        meta = json.loads(bytes(blob[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise WireError("header is not a JSON object")
    return meta


def _dtype(name: Any) -> torch.dtype:
    if name not in _DTYPES:
        raise WireError(f"unknown dtype {name!r}")
    return _DTYPES[name]


# ------------------------------------------------------------------------------------------------- plans
def pack_plan(plan: ClientPlan, extra: Mapping[str, Any] | None = None) -> bytes:
    """A plan as the client sees it (download decoded, the pending base change included), plus ``extra``
    (engine bookkeeping: which earlier reply of this client was accepted, the run's key...)."""
    tensors = {f"download/{k}": v for k, v in plan.download.items()}
    base = None
    if plan.base_update is not None:
        kinds = {}
        for name, d in plan.base_update.deltas.items():
            if isinstance(d, tuple):
                tensors[f"base/{name}/b"], tensors[f"base/{name}/a"] = d
                kinds[name] = "factored"
            else:
                tensors[f"base/{name}"] = d
                kinds[name] = "dense"
        base = {"version": plan.base_update.version, "cumulative": plan.base_update.cumulative, "kinds": kinds}
    meta = {
        "kind": "plan",
        "round": plan.round,
        "client_id": plan.client_id,
        "download_keys": list(plan.download),
        "upload": {k: [list(s.shape), str(s.dtype)] for k, s in plan.upload.items()},
        "ranks": {k: [r.rank, r.scale] for k, r in plan.ranks.items()},
        "stages": [
            {"train_keys": sorted(s.train_keys), "adapter_weights": dict(s.adapter_weights)} for s in plan.stages
        ],
        "reinit_seed": plan.reinit_seed,
        "rank_may_shrink": plan.rank_may_shrink,
        "base_update": base,
        "upload_codec": plan.upload_codec,
        "download_codec": plan.download_codec,
        "work": plan.work,
        "fail_after": plan.fail_after,
        "extra": dict(extra or {}),
    }
    return pack(meta, tensors)


def unpack_plan(blob: bytes) -> tuple[ClientPlan, dict[str, Any]]:
    """The plan and the engine's extra fields (a client trusts its server; malformed input still fails clearly)."""
    meta, tensors = unpack(blob)
    if meta.get("kind") != "plan":
        raise WireError(f"expected a plan, got {meta.get('kind')!r}")
    try:
        base = None
        if meta["base_update"] is not None:
            b = meta["base_update"]
            deltas: dict[str, Any] = {}
            for name, kind in b["kinds"].items():
                deltas[name] = (
                    (tensors[f"base/{name}/b"], tensors[f"base/{name}/a"])
                    if kind == "factored"
                    else tensors[f"base/{name}"]
                )
            base = BaseUpdate(int(b["version"]), deltas, cumulative=bool(b["cumulative"]))
        plan = ClientPlan(
            round=int(meta["round"]),
            client_id=int(meta["client_id"]),
            download={k: tensors[f"download/{k}"] for k in meta["download_keys"]},
            upload={
                k: TensorSpec(tuple(int(x) for x in shape), _dtype(dt)) for k, (shape, dt) in meta["upload"].items()
            },
            ranks={k: ModuleRank(int(r), float(s)) for k, (r, s) in meta["ranks"].items()},
            stages=tuple(
                Stage(frozenset(s["train_keys"]), {str(k): float(v) for k, v in s["adapter_weights"].items()})
                for s in meta["stages"]
            ),
            reinit_seed=meta["reinit_seed"],
            rank_may_shrink=bool(meta["rank_may_shrink"]),
            base_update=base,
            upload_codec=str(meta["upload_codec"]),
            download_codec=str(meta["download_codec"]),
            work=float(meta["work"]),
            fail_after=None if meta["fail_after"] is None else float(meta["fail_after"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed plan: {type(e).__name__}: {e}") from None
    return plan, dict(meta.get("extra") or {})


# ----------------------------------------------------------------------------------------------- replies
def pack_reply(update: ClientUpdate, extra: Mapping[str, Any] | None = None) -> bytes:
    meta = {
        "kind": "reply",
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "samples_seen": update.samples_seen,
        "metrics": {k: float(v) for k, v in update.metrics.items()},
        "ranks": {k: [r.rank, r.scale] for k, r in update.ranks.items()},
        "extra": dict(extra or {}),
    }
    return pack(meta, update.state)


def pack_error(error: BaseException) -> bytes:
    """A reply saying the client's turn failed."""
    return pack({"kind": "error", "reason": f"{type(error).__name__}: {str(error)[:400]}"}, {})


class _Rank:
    """A reply's rank entry exactly as received (checked by the round logic, not here)."""

    __slots__ = ("rank", "scale")

    def __init__(self, rank: Any, scale: Any) -> None:
        self.rank, self.scale = rank, scale


def unpack_reply(blob: Any) -> tuple[ClientUpdate | Exception, dict[str, Any]]:
    """A client's reply rebuilt as a :class:`ClientUpdate` with its values as received (untrusted: the round
    logic checks them), or the error that makes it unreadable; plus its extra fields. Never raises."""
    try:
        meta, tensors = unpack(blob)
        if meta.get("kind") == "error":
            return ClientFailed(str(meta.get("reason"))[:500]), {}
        if meta.get("kind") != "reply":
            return WireError(f"expected a reply, got {str(meta.get('kind'))[:40]!r}"), {}
        ranks = meta.get("ranks")
        if isinstance(ranks, dict):
            ranks = {
                k: _Rank(*v) if isinstance(v, list) and len(v) == 2 else _Rank(None, None) for k, v in ranks.items()
            }
        extra = meta.get("extra")
        update = ClientUpdate(
            client_id=meta.get("client_id"),
            state=tensors,
            num_examples=meta.get("num_examples"),
            samples_seen=meta.get("samples_seen"),
            metrics=meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {},
            ranks=ranks,
        )
        return update, extra if isinstance(extra, dict) else {}
    except WireError as e:
        return e, {}
    except Exception as e:  # anything else odd about a reply makes it unreadable, never a crash
        return WireError(f"unreadable reply: {type(e).__name__}: {str(e)[:200]}"), {}
