"""Protocol v1 codec (no sockets): round trips, zero-copy decode, the error code of each bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stm_feedback.errors import ProtocolError
from stm_feedback.protocol import (
    ERROR_CODES,
    Limits,
    build_error,
    build_reply,
    build_request,
    parse_reply,
    parse_request,
)

LIMITS = Limits(max_message_bytes=1 << 20, max_header_bytes=4096, max_frame_px=128 * 128)


def _image(h: int = 16, w: int = 20, dtype: str = "<f4") -> np.ndarray:
    return np.random.default_rng(0).normal(size=(h, w)).astype(dtype)


def _code(frames: list, limits: Limits = LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_request(frames, limits)
    assert info.value.code in ERROR_CODES
    return info.value.code


def test_analyze_round_trip_is_zero_copy() -> None:
    img = _image()
    frames = build_request(
        "analyze", "r1", {"image": img}, pixel_size_nm=0.1, instrument_id="stm1", bias_v=-2.0
    )
    payload = bytes(frames[1])
    req = parse_request([frames[0], payload], LIMITS)
    assert req.header.type == "analyze" and req.header.id == "r1" and req.header.instrument_id == "stm1"
    assert req.header.bias_v == -2.0 and req.header.pixel_size_nm == 0.1
    np.testing.assert_array_equal(req.arrays["image"], img)
    # the decoded array is a view on the received buffer, not a copy
    assert np.shares_memory(req.arrays["image"], np.frombuffer(payload, np.uint8))


def test_big_endian_float32_is_accepted() -> None:
    img = _image(dtype=">f4")  # Nanonis sends big-endian float32
    frames = build_request("analyze", 7, {"image": img}, pixel_size_nm=0.1)
    req = parse_request(frames, LIMITS)
    assert req.arrays["image"].dtype.str == ">f4"
    np.testing.assert_array_equal(req.arrays["image"].astype(np.float32), img.astype(np.float32))


def test_reply_round_trip_with_bool_map() -> None:
    mask = np.eye(4, dtype=bool)
    frames = build_reply(
        "x", "analyze", {"analysis": {"a": np.float32(1.5)}}, {"total": 1.0}, {"safe_mask": mask}
    )
    header, arrays = parse_reply(frames)
    assert header["ok"] is True and header["id"] == "x" and header["analysis"] == {"a": 1.5}
    assert arrays["safe_mask"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["safe_mask"].astype(bool), mask)


def test_error_reply_shape() -> None:
    header, _ = parse_reply(build_error(3, "analyze", "overloaded", "busy", {"total": 0.1}))
    assert header == {
        "v": 1,
        "type": "analyze",
        "id": 3,
        "ok": False,
        "error": {"code": "overloaded", "message": "busy"},
        "timings_ms": {"total": 0.1},
    }


def test_error_codes_for_bad_headers() -> None:
    assert _code([]) == "malformed_msgpack"
    assert _code([b"\xc1\xff\x00garbage"]) == "malformed_msgpack"
    assert _code([msgpack.packb([1, 2, 3])]) == "malformed_msgpack"
    assert _code([msgpack.packb({"type": "health", "id": 1})]) == "unsupported_version"
    assert _code([msgpack.packb({"v": 2, "type": "health", "id": 1})]) == "unsupported_version"
    assert _code([msgpack.packb({"v": True, "type": "health", "id": 1})]) == "unsupported_version"
    assert _code([msgpack.packb({"v": 1, "type": "explode", "id": 1})]) == "unknown_type"
    assert _code([msgpack.packb({"v": 1, "type": "health"})]) == "missing_metadata"
    assert _code([msgpack.packb({"v": 1, "type": "query_sites", "id": 1})]) == "missing_metadata"
    assert _code([msgpack.packb({"v": 1, "type": "health", "id": 1, "deadline_ms": -5})]) == "bad_header"
    assert _code([b"\x80" + b"x" * (LIMITS.max_header_bytes + 1)]) == "frame_too_large"


def test_error_codes_for_analyze() -> None:
    img = _image()
    good = build_request("analyze", 1, {"image": img}, pixel_size_nm=0.1)
    assert parse_request(good, LIMITS).header.id == 1
    no_px = build_request("analyze", 1, {"image": img})
    assert _code(no_px) == "missing_metadata"
    assert _code(build_request("analyze", 1, {"image": img}, pixel_size_nm=-0.1)) == "bad_header"
    assert _code(build_request("analyze", 1, {"image": img}, pixel_size_nm="big")) == "bad_header"
    assert _code(build_request("analyze", 1, {"image": img}, pixel_size_nm=float("nan"))) == "non_finite"
    assert _code(good[:1]) == "bad_array"  # truncated multipart: header promises one frame
    assert _code([*good, b"extra"]) == "bad_array"
    assert _code([good[0], bytes(good[1])[:-4]]) == "bad_array"  # byte count != shape x itemsize
    nan = img.copy()
    nan[3, 4] = np.nan
    assert _code(build_request("analyze", 1, {"image": nan}, pixel_size_nm=0.1)) == "non_finite"
    inf = img.copy()
    inf[0, 0] = -np.inf
    assert _code(build_request("analyze", 1, {"image": inf}, pixel_size_nm=0.1)) == "non_finite"
    assert (
        _code(build_request("analyze", 1, {"image": img.astype(np.complex64)}, pixel_size_nm=0.1))
        == "bad_array"
    )
    as_bool = msgpack.unpackb(good[0])
    as_bool["arrays"][0].update(dtype="|b1")
    assert _code([msgpack.packb(as_bool), np.zeros(img.shape, bool).tobytes()]) == "bad_array"
    as_str = msgpack.unpackb(good[0])
    as_str["arrays"][0].update(dtype="<U1")
    assert _code([msgpack.packb(as_str), bytes(4 * img.size)]) == "bad_array"
    assert _code(build_request("analyze", 1, {"image": img.ravel()}, pixel_size_nm=0.1)) == "bad_array"  # 1-D
    assert _code(build_request("analyze", 1, {"other": img}, pixel_size_nm=0.1)) == "bad_array"


def test_huge_declared_shape_is_rejected_before_reading_bytes() -> None:
    header = {
        "v": 1,
        "type": "analyze",
        "id": 1,
        "pixel_size_nm": 0.1,
        "arrays": [{"name": "image", "dtype": "<f4", "shape": [100_000, 100_000], "frame": 0}],
    }
    assert _code([msgpack.packb(header), b"\x00" * 16]) == "frame_too_large"
    small = Limits(max_message_bytes=1000, max_header_bytes=4096, max_frame_px=10**6)
    assert _code(build_request("analyze", 1, {"image": _image(32, 32)}, pixel_size_nm=0.1), small) == (
        "frame_too_large"
    )


def test_error_carries_request_id_and_type() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(build_request("analyze", "abc", {"image": _image()}), LIMITS)
    assert info.value.request_id == "abc" and info.value.request_type == "analyze"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_garbage_only_ever_raises_protocol_error(frames: list[bytes]) -> None:
    try:
        parse_request(frames, LIMITS)
    except ProtocolError as err:
        assert err.code in ERROR_CODES


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "type", "id", "pixel_size_nm", "arrays", "deadline_ms", "instrument_id", "limit"]
        ),
        st.one_of(
            st.none(),
            st.integers(-3, 3),
            st.floats(),
            st.text(max_size=8),
            st.lists(st.integers(-(2**40), 2**40), max_size=3),
        ),
    )
)
def test_random_headers_only_ever_raise_protocol_error(header: dict) -> None:
    try:
        parse_request([msgpack.packb(header)], LIMITS)
    except ProtocolError as err:
        assert err.code in ERROR_CODES
