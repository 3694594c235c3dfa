"""Codecs for what travels: ``none``, ``fp16``, ``int8`` (per-tensor scale) and ``topk:<density>`` (values + indices).

A codec turns a state (``{key: tensor}``) into a payload of plain tensors, and back. Bytes up and down are counted
on the payload. Decoding is exact in the sense that both sides compute the same tensor: the receiver gets
precisely ``decode(encode(x))``, and :func:`roundtrip` gives the sender that same value.

*Delta encoding.* For a key the receiver already holds (the client downloaded it, same shape), the codec encodes
the change ``x − reference`` and the receiver adds it back, in float32: quantising or sparsifying a small change
loses far less than doing so to the weights. ``topk`` keeps the ``⌊density·N⌋`` entries of largest magnitude over
all tensors of the payload jointly (FLASC's global top-k, METHODS.md §25), with int32 indices per tensor.

Every payload is checked while decoding (keys, dtypes, sizes, index range and uniqueness, finite values); a bad
one raises :class:`CodecError`, which the round logic turns into a rejected reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SCALE = "#scale"
VALUES = "#values"
INDICES = "#indices"


class CodecError(ValueError):
    """A payload cannot be decoded; the message names the key and what is wrong."""


@dataclass(frozen=True)
class Codec:
    """One of ``none``, ``fp16``, ``int8``, ``topk`` (with its density)."""

    kind: str = "none"
    density: float = 1.0

    @property
    def name(self) -> str:
        return f"topk:{self.density:g}" if self.kind == "topk" else self.kind

    # ------------------------------------------------------------------ encoding
    def encode(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind == "none":
            return dict(state)
        if self.kind == "fp16":
            return {k: v.detach().to(torch.float16) for k, v in state.items()}
        if self.kind == "int8":
            out: dict[str, torch.Tensor] = {}
            for k, v in state.items():
                x = v.detach().float()
                scale = x.abs().max() / 127.0 if x.numel() else torch.tensor(0.0)
                q = torch.zeros_like(x, dtype=torch.int8) if scale == 0 else torch.round(x / scale).clamp(-127, 127)
                out[k] = q.to(torch.int8)
                out[k + SCALE] = scale.reshape(()).float()
            return out
        return self._encode_topk(state)

    def _encode_topk(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = list(state)
        flats = [state[k].detach().float().reshape(-1) for k in keys]
        total = sum(f.numel() for f in flats)
        k_keep = min(total, max(1, math.floor(self.density * total))) if total else 0
        out: dict[str, torch.Tensor] = {}
        if k_keep == 0:
            for k in keys:
                out[k + VALUES] = torch.zeros(0)
                out[k + INDICES] = torch.zeros(0, dtype=torch.int32)
            return out
        joint = torch.cat(flats)
        chosen = torch.topk(joint.abs(), k_keep, sorted=False).indices.sort().values
        start = 0
        for k, f in zip(keys, flats, strict=True):
            end = start + f.numel()
            lo, hi = torch.searchsorted(chosen, start), torch.searchsorted(chosen, end)
            local = chosen[lo:hi] - start
            out[k + VALUES] = f[local].clone()
            out[k + INDICES] = local.to(torch.int32)
            start = end
        return out

    # ------------------------------------------------------------------ decoding
    def decode(
        self, payload: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, torch.Tensor]:
        """The float32 (``none``: as sent) state for keys ``shapes``; raises :class:`CodecError` on a bad payload."""
        expected = set(self.payload_keys(shapes))
        got = set(payload)
        if got != expected:
            missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
            raise CodecError(f"{self.name} payload keys differ: missing {missing}, unexpected {extra}")
        for k, t in payload.items():
            if not isinstance(t, torch.Tensor):
                raise CodecError(f"{k} is a {type(t).__name__}, not a tensor")
        if self.kind == "none":
            return dict(payload)
        out: dict[str, torch.Tensor] = {}
        for key, shape in shapes.items():
            if self.kind == "fp16":
                t = _check(payload[key], key, torch.float16, shape)
                out[key] = t.float()
            elif self.kind == "int8":
                q = _check(payload[key], key, torch.int8, shape)
                s = _check(payload[key + SCALE], key + SCALE, torch.float32, ())
                if not (math.isfinite(float(s)) and float(s) >= 0):
                    raise CodecError(f"{key}{SCALE} must be finite and >= 0, got {float(s)}")
                out[key] = q.float() * s
            else:
                out[key] = self._decode_topk(payload, key, shape)
        return out

    def _decode_topk(self, payload: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
        values, index = payload[key + VALUES], payload[key + INDICES]
        if values.dtype != torch.float32 or index.dtype != torch.int32 or values.dim() != 1 or index.dim() != 1:
            raise CodecError(f"{key}: top-k payload must be 1-d float32 values and int32 indices")
        numel = math.prod(shape)
        if values.numel() != index.numel() or values.numel() > numel:
            raise CodecError(f"{key}: {values.numel()} values for {index.numel()} indices (tensor of {numel})")
        if index.numel():
            if int(index.min()) < 0 or int(index.max()) >= numel:
                raise CodecError(f"{key}: index out of range 0..{numel - 1}")
            if torch.unique(index).numel() != index.numel():
                raise CodecError(f"{key}: repeated indices")
            if not bool(torch.isfinite(values).all()):
                raise CodecError(f"{key}: non-finite values")
        dense = torch.zeros(numel)
        dense[index.long()] = values
        return dense.reshape(shape)

    def payload_keys(self, keys: Mapping[str, object] | list[str]) -> list[str]:
        out = []
        for k in keys:
            if self.kind == "int8":
                out += [k, k + SCALE]
            elif self.kind == "topk":
                out += [k + VALUES, k + INDICES]
            else:
                out.append(k)
        return out


def _check(t: torch.Tensor, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if t.dtype != dtype:
        raise CodecError(f"{key} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CodecError(f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def parse_codec(text: str) -> Codec:
    """``none`` | ``fp16`` | ``int8`` | ``topk:<density in (0, 1]>``; a bad name raises ValueError naming what is
    allowed."""
    t = (text or "none").strip().lower()
    if t in ("none", "fp16", "int8"):
        return Codec(t)
    if t.startswith("topk:"):
        try:
            d = float(t.split(":", 1)[1])
        except ValueError:
            d = float("nan")
        if not (math.isfinite(d) and 0 < d <= 1):
            raise ValueError(f"codec {text!r}: the top-k density must be a number in (0, 1]")
        return Codec("topk", d)
    raise ValueError(f"unknown codec {text!r}; allowed: none, fp16, int8, topk:<density in (0, 1]>")


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a payload as it travels (numel × element size)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def _delta_keys(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None) -> set[str]:
    if not reference:
        return set()
    return {k for k, v in state.items() if k in reference and tuple(reference[k].shape) == tuple(v.shape)}


def encode_state(
    codec: Codec, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The payload of ``state`` (changes from ``reference`` for the keys the receiver holds)."""
    if codec.kind == "none":
        return dict(state)
    ref = reference or {}
    delta = _delta_keys(state, ref)
    return codec.encode({k: (v.float() - ref[k].float()) if k in delta else v for k, v in state.items()})


def decode_state(
    codec: Codec,
    payload: Mapping[str, torch.Tensor],
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The state the sender encoded, in the dtypes of ``specs`` (``key: (shape, dtype)``)."""
    if codec.kind == "none":
        return dict(payload)
    decoded = codec.decode(payload, {k: s for k, (s, _) in specs.items()})
    out = {}
    for k, (shape, dtype) in specs.items():
        v = decoded[k]
        if reference is not None and k in reference and tuple(reference[k].shape) == tuple(shape):
            v = reference[k].float() + v
        out[k] = v.to(dtype)
    return out


def roundtrip(
    codec: Codec, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """What the receiver of ``state`` gets: ``decode(encode(state))`` (the sender's view of its own message)."""
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return decode_state(codec, encode_state(codec, state, reference), specs, reference)
