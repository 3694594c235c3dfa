"""Codecs: exact decoding, delta encoding, payload checks, and bytes counted on what travels."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.client.codecs import (
    INDICES,
    SCALE,
    VALUES,
    Codec,
    CodecError,
    decode_state,
    encode_state,
    parse_codec,
    payload_bytes,
    roundtrip,
)


def _state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, 2, generator=gen),
        "h": torch.randn(4, generator=gen),
    }


def _specs(state):
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def test_parse_codec_names_and_rejects() -> None:
    assert parse_codec("none") == Codec("none") and parse_codec("FP16").kind == "fp16"
    assert parse_codec("topk:0.25") == Codec("topk", 0.25)
    for bad in ("topk:0", "topk:1.5", "topk:nan", "topk:x", "gzip"):
        with pytest.raises(ValueError, match="codec|density"):
            parse_codec(bad)


def test_fp16_and_int8_decode_exactly_what_was_quantised(gen) -> None:
    st = _state(gen)
    fp16 = roundtrip(parse_codec("fp16"), st)
    for k, v in st.items():
        assert torch.equal(fp16[k], v.half().float())
    payload = encode_state(parse_codec("int8"), st)
    assert payload_bytes(payload) == sum(v.numel() + 4 for v in st.values())  # 1 byte per value + a float32 scale
    dec = decode_state(parse_codec("int8"), payload, _specs(st))
    for k, v in st.items():
        scale = v.abs().max() / 127
        assert torch.equal(dec[k], torch.round(v / scale).clamp(-127, 127) * scale)
        assert (dec[k] - v).abs().max() <= scale / 2 + 1e-7


def test_topk_keeps_the_largest_entries_jointly(gen) -> None:
    st = _state(gen)
    total = sum(v.numel() for v in st.values())
    codec = parse_codec("topk:0.25")
    payload = encode_state(codec, st)
    kept = math.floor(0.25 * total)
    assert sum(payload[k + VALUES].numel() for k in st) == kept
    assert payload_bytes(payload) == 8 * kept  # float32 values + int32 indices
    dec = decode_state(codec, payload, _specs(st))
    flat = torch.cat([v.reshape(-1) for v in st.values()])
    threshold = flat.abs().sort(descending=True).values[kept - 1]
    for k, v in st.items():
        mask = v.abs() >= threshold
        assert torch.equal(dec[k], torch.where(mask, v, torch.zeros_like(v)))
    # per-tensor counts differ: the selection is joint over the payload, not per tensor
    counts = {k: payload[k + VALUES].numel() for k in st}
    assert len(set(counts.values())) > 1


def test_delta_encoding_against_the_reference(gen) -> None:
    ref = _state(gen)
    new = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}
    new["h"] = torch.randn(9, generator=gen)  # shape differs from the reference: encoded raw
    for name in ("fp16", "int8", "topk:0.5"):
        codec = parse_codec(name)
        dec = decode_state(codec, encode_state(codec, new, ref), _specs(new), ref)
        assert torch.equal(dec["a"], roundtrip(codec, new, ref)["a"])
        err_delta = (dec["a"] - new["a"]).abs().max()
        err_raw = (roundtrip(codec, {"a": new["a"]})["a"] - new["a"]).abs().max()
        assert err_delta < err_raw, name  # quantising the change loses less than quantising the weights
    dense = decode_state(parse_codec("topk:1"), encode_state(parse_codec("topk:1"), new, ref), _specs(new), ref)
    for k in new:
        torch.testing.assert_close(dense[k], new[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "codec,mutate,message",
    [
        ("fp16", lambda p: p.update(a=p["a"].float()), "dtype"),
        ("fp16", lambda p: p.pop("b"), "missing"),
        ("int8", lambda p: p.update({"a" + SCALE: torch.tensor(float("nan"))}), "finite"),
        ("int8", lambda p: p.update(a=p["a"][:2]), "shape"),
        ("topk:0.5", lambda p: p.update({"a" + INDICES: p["a" + INDICES] + 1000}), "out of range"),
        ("topk:0.5", lambda p: p.update({"a" + INDICES: torch.zeros_like(p["a" + INDICES])}), "repeated"),
        ("topk:0.5", lambda p: p.update({"a" + VALUES: p["a" + VALUES][:1]}), "values for"),
        ("topk:0.5", lambda p: p.update({"a" + INDICES: p["a" + INDICES].long()}), "int32"),
        ("topk:0.5", lambda p: p.update({"x": torch.zeros(1)}), "unexpected"),
    ],
)
def test_bad_payloads_raise_codec_errors(codec: str, mutate, message: str, gen) -> None:
    st = _state(gen)
    c = parse_codec(codec)
    payload = encode_state(c, st)
    mutate(payload)
    with pytest.raises(CodecError, match=message):
        decode_state(c, payload, _specs(st))
