"""Wire protocol v1 of the stm-feedback daemon (specified in docs/protocol.md).

A message is a ZeroMQ multipart message ``[header, array_0, array_1, ...]``: ``header`` is a msgpack map,
each following frame is the raw bytes of one C-ordered array described in ``header["arrays"]`` (dtype with
explicit byte order, shape, frame index). This module is pure encoding/decoding and validation: no sockets.
Decoding is zero-copy (``numpy.frombuffer`` on the received frame); sizes are checked before decoding.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stm_feedback.errors import ProtocolError

PROTOCOL_VERSION = 1

ERROR_CODES: tuple[str, ...] = (
    "malformed_msgpack",  # header frame missing, not msgpack, or not a map
    "unsupported_version",  # header "v" missing or not 1
    "unknown_type",  # header "type" not one of REQUEST_TYPES
    "bad_header",  # a header field has the wrong type or an out-of-range value
    "missing_metadata",  # a required header field is absent (id, pixel_size_nm, instrument_id, ...)
    "bad_array",  # dtype/shape/byte-count mismatch, wrong frame count (truncated multipart)
    "non_finite",  # NaN or +-inf in an image or a numeric header field
    "frame_too_large",  # message, header or array above the configured limits
    "deadline_exceeded",  # the request's deadline expired before work on it started
    "overloaded",  # the bounded in-flight queue is full; retry later
    "unknown_instrument",  # query_sites for an instrument with no analysed frame yet
    "invalid_input",  # the analyzer rejected the (well-formed) frame, e.g. too small to analyse
    "internal",  # a bug or an unexpected failure on the server; the server keeps serving
)

REQUEST_TYPES: tuple[str, ...] = (
    "analyze",
    "analyze_lines",
    "query_sites",
    "health",
    "ready",
    "models",
    "stats",
)

# dtype strings on the wire: byte order ('<' little, '>' big, '|' single byte), kind, item size in bytes
_DTYPE_RE = re.compile(r"^(?:[<>][fiu][248]|\|[iub]1)$")
IMAGE_KINDS = frozenset("fiu")  # integer images are accepted (raw ADC counts) and converted to float32


class ArraySpec(BaseModel):
    """One array frame: name, wire dtype (e.g. ``"<f4"``, ``">f4"``), C-order shape and frame index
    (0 = the first frame after the header)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    dtype: str
    shape: list[int] = Field(min_length=1, max_length=4)
    frame: int = Field(ge=0)


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    v: int
    type: str
    id: str | int
    deadline_ms: float | None = Field(default=None, gt=0)


class HealthRequest(_Header):
    pass


class AnalyzeRequest(_Header):
    """``analyze``: one full frame; array ``image`` is (H, W) apparent height in nm (any float/int dtype)."""

    arrays: list[ArraySpec] = Field(min_length=1, max_length=1)
    pixel_size_nm: float = Field(gt=0, le=1000)
    scan_angle_deg: float = 0.0
    bias_v: float | None = None
    setpoint_pa: float | None = None
    instrument_id: str = Field(default="default", min_length=1, max_length=200)
    frame_id: str | None = Field(default=None, max_length=200)
    with_maps: bool = True  # False: reply without terrace_labels/safe_mask frames


class AnalyzeLinesRequest(AnalyzeRequest):
    """``analyze_lines``: the first n scan lines of a frame still being scanned; ``image`` is (n, W)."""

    total_lines: int | None = Field(default=None, gt=0)  # H of the full frame, if known


class QuerySitesRequest(_Header):
    """``query_sites``: safe write sites from the latest full analysis of ``instrument_id``."""

    instrument_id: str = Field(min_length=1, max_length=200)
    pattern: str = "3x1"
    region: list[float] | None = Field(default=None, min_length=4, max_length=4)  # [x0, y0, x1, y1] px
    terrace: int | None = None
    limit: int = Field(default=10, ge=1, le=10000)


REQUEST_MODELS: dict[str, type[_Header]] = {
    "analyze": AnalyzeRequest,
    "analyze_lines": AnalyzeLinesRequest,
    "query_sites": QuerySitesRequest,
    "health": HealthRequest,
    "ready": HealthRequest,
    "models": HealthRequest,
    "stats": HealthRequest,
}
QUEUED_TYPES = frozenset(
    {"analyze", "analyze_lines"}
)  # run by workers; the rest is answered by the I/O thread


class Limits(BaseModel):
    """Size limits checked before decoding: whole message bytes, header bytes, pixels per array."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_frame_px: int = 2048 * 2048


class Request:
    """A validated request: its pydantic header model and decoded arrays (read-only views on the frames)."""

    __slots__ = ("header", "arrays")

    def __init__(self, header: _Header, arrays: dict[str, np.ndarray]) -> None:
        self.header = header
        self.arrays = arrays


def _pack_default(obj: Any) -> Any:
    # analysis dicts may carry numpy scalars/arrays or Paths; msgpack knows none of them
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (numpy scalars become Python numbers)."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _buffer(frame: Any) -> Any:
    # zmq.Frame exposes .buffer (memoryview, no copy); bytes/memoryview pass through
    return getattr(frame, "buffer", frame)


def encode_arrays(arrays: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Array specs for the header and the frames (C-contiguous buffers, no copy when already contiguous)."""
    specs: list[dict[str, Any]] = []
    frames: list[Any] = []
    for i, (name, arr) in enumerate(arrays.items()):
        a = np.asarray(arr)
        if a.dtype == np.bool_:
            a = a.view(np.uint8)  # bool goes on the wire as "|u1" 0/1, portable to any language
        a = np.ascontiguousarray(a)
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "frame": i})
        frames.append(memoryview(a).cast("B") if a.size else b"")
    return specs, frames


def decode_array(spec: ArraySpec, frame: Any, max_px: int) -> np.ndarray:
    """Zero-copy view of one array frame after checking dtype, shape, pixel count and byte count."""
    if not _DTYPE_RE.match(spec.dtype):
        raise ProtocolError("bad_array", f"array {spec.name!r}: unsupported dtype {spec.dtype!r}")
    if any(n <= 0 for n in spec.shape):
        raise ProtocolError("bad_array", f"array {spec.name!r}: non-positive dimension in shape {spec.shape}")
    n_px = math.prod(spec.shape)
    if n_px > max_px:
        raise ProtocolError("frame_too_large", f"array {spec.name!r}: {n_px} elements > limit {max_px}")
    dtype = np.dtype(spec.dtype)
    buf = _buffer(frame)
    if n_px * dtype.itemsize != _nbytes(buf):
        raise ProtocolError(
            "bad_array",
            f"array {spec.name!r}: shape {spec.shape} x {dtype.itemsize} B = {n_px * dtype.itemsize} B "
            f"but the frame has {_nbytes(buf)} B",
        )
    return np.frombuffer(buf, dtype=dtype, count=n_px).reshape(spec.shape)


def _validation_code(err: ValidationError) -> str:
    types = {e["type"] for e in err.errors()}
    if "missing" in types:
        return "missing_metadata"
    if "finite_number" in types:
        return "non_finite"
    return "bad_header"


def _short(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'header'}: {e['msg']}" for e in err.errors()[:5]
    )


def decode_header(frame: Any, limits: Limits) -> dict[str, Any]:
    """The header map of a request, after the size check (raises ``ProtocolError``)."""
    buf = _buffer(frame)
    if _nbytes(buf) > limits.max_header_bytes:
        raise ProtocolError("frame_too_large", f"header {_nbytes(buf)} B > limit {limits.max_header_bytes} B")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed_msgpack", f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed_msgpack", f"header must be a msgpack map, got {type(header).__name__}")
    return header


def parse_request(frames: Sequence[Any], limits: Limits) -> Request:
    """Validate and decode the body ``[header, arrays...]`` of a request (envelope already removed).

    Raises ``ProtocolError`` with the protocol error code; ``request_id``/``request_type`` are filled in
    as soon as they are known so the error reply can carry them.
    """
    if not frames:
        raise ProtocolError("malformed_msgpack", "empty message: no header frame")
    total = sum(_nbytes(_buffer(f)) for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError("frame_too_large", f"message {total} B > limit {limits.max_message_bytes} B")
    header = decode_header(frames[0], limits)
    rid = header.get("id")
    rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    rtype = header.get("type") if isinstance(header.get("type"), str) else None
    try:
        v = header.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_version", f"protocol version {v!r} not supported; use {PROTOCOL_VERSION}"
            )
        if rtype not in REQUEST_MODELS:
            raise ProtocolError(
                "unknown_type", f"unknown request type {header.get('type')!r}; known: {REQUEST_TYPES}"
            )
        try:
            model = REQUEST_MODELS[rtype].model_validate(header)
        except ValidationError as err:
            raise ProtocolError(_validation_code(err), _short(err)) from None
        specs: list[ArraySpec] = list(getattr(model, "arrays", []))
        if len(frames) - 1 != len(specs):
            raise ProtocolError(
                "bad_array", f"header describes {len(specs)} array frame(s) but {len(frames) - 1} followed"
            )
        arrays: dict[str, np.ndarray] = {}
        for spec in specs:
            if spec.frame >= len(frames) - 1:
                raise ProtocolError(
                    "bad_array", f"array {spec.name!r}: frame index {spec.frame} out of range"
                )
            arrays[spec.name] = decode_array(spec, frames[1 + spec.frame], limits.max_frame_px)
        if rtype in QUEUED_TYPES:
            _check_image(arrays)
        return Request(model, arrays)
    except ProtocolError as err:
        err.request_id, err.request_type = rid, rtype
        raise


def _check_image(arrays: dict[str, np.ndarray]) -> None:
    image = arrays.get("image")
    if image is None:
        raise ProtocolError("bad_array", "analyze needs an array named 'image'")
    if image.ndim != 2:
        raise ProtocolError("bad_array", f"image must be 2-D (rows=y, cols=x), got shape {list(image.shape)}")
    if image.dtype.kind not in IMAGE_KINDS:
        raise ProtocolError("bad_array", f"image dtype {image.dtype.str!r} is not a number type")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ProtocolError("non_finite", f"image has {int((~np.isfinite(image)).sum())} NaN/inf pixel(s)")


def image_float32(image: np.ndarray) -> np.ndarray:
    """The image as native float32 (no copy when it already is, e.g. a little-endian "<f4" frame)."""
    return image.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------- building


def build_message(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[Any]:
    """Frames ``[msgpack header, array frames...]``; ``header["arrays"]`` is filled from ``arrays``."""
    frames: list[Any] = []
    if arrays:
        specs, frames = encode_arrays(arrays)
        header = {**header, "arrays": specs}
    return [packb(header), *frames]


def build_request(
    rtype: str, request_id: str | int, arrays: dict[str, np.ndarray] | None = None, **fields: Any
) -> list[Any]:
    """A client request (frames after the envelope)."""
    return build_message({"v": PROTOCOL_VERSION, "type": rtype, "id": request_id, **fields}, arrays)


def build_reply(
    request_id: Any,
    rtype: str | None,
    payload: dict[str, Any],
    timings_ms: dict[str, float],
    arrays: dict[str, np.ndarray] | None = None,
) -> list[Any]:
    """A success reply: ``{"v", "type", "id", "ok": True, "timings_ms", **payload}`` + array frames."""
    header = {"v": PROTOCOL_VERSION, "type": rtype, "id": request_id, "ok": True, "timings_ms": timings_ms}
    header.update(payload)
    return build_message(header, arrays)


def build_error(
    request_id: Any, rtype: str | None, code: str, message: str, timings_ms: dict[str, float] | None = None
) -> list[Any]:
    """An error reply: ``{"v", "type", "id", "ok": False, "error": {"code", "message"}, "timings_ms"}``."""
    if code not in ERROR_CODES:  # a server bug must still produce a well-formed reply
        code, message = "internal", f"unregistered error code {code!r}: {message}"
    header = {
        "v": PROTOCOL_VERSION,
        "type": rtype,
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
        "timings_ms": timings_ms or {},
    }
    return [packb(header)]


def parse_reply(frames: Sequence[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Client side: the reply header and its arrays (``safe_mask`` arrives as u1 0/1). The header equals
    ``msgpack.unpackb`` of the header frame; ``analysis.atoms`` / ``analysis.dimers`` may come back as
    ``Rows`` (a read-only sequence equal to the list of row maps, see ``unpack_reply_header``)."""
    if not frames:
        raise ProtocolError("malformed_msgpack", "empty reply")
    header = unpack_reply_header(_buffer(frames[0]))
    if not isinstance(header, dict):
        raise ProtocolError("malformed_msgpack", "reply header is not a map")
    arrays: dict[str, np.ndarray] = {}
    for raw in header.get("arrays", []) or []:
        spec = ArraySpec.model_validate(raw)
        if spec.frame + 1 >= len(frames):
            raise ProtocolError("bad_array", f"reply array {spec.name!r} frame missing")
        arrays[spec.name] = decode_array(spec, frames[1 + spec.frame], max_px=2**62)
    return header, arrays


# ------------------------------------------------------------------------------- rows of scalars, in bulk
# A reply carries ~4000 atoms and ~2000 dimers, each a msgpack map of 4 scalars. Packing and unpacking
# them one dict at a time was ~2-3 ms on each side of the socket (docs/performance.md, "Session 4 daemon
# overhead"). When every row has the same msgpack layout (the keys in the same order, floats as float64,
# integers in the one-byte fixint range -32..127) the rows are a fixed-size record, so numpy can write
# and read all of them at once. The bytes are exactly those ``packb`` writes for the list of dicts
# (msgpack uses the shortest encoding of each value, and Python floats are float64), so this is not a
# change of the wire format: any msgpack decoder reads them, and any other layout falls back to the
# one-by-one path.

ROW_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {  # key, kind ("f" float64, "i" fixint)
    "atoms": (("x_px", "f"), ("y_px", "f"), ("terrace", "i"), ("score", "f")),
    "dimers": (("x_px", "f"), ("y_px", "f"), ("terrace", "i"), ("row", "i")),
}
_FIXINT_MIN, _FIXINT_MAX = -32, 127  # msgpack's one-byte integers: negative and positive fixint


class Packed(bytes):
    """msgpack bytes of one value, to be inserted as they are by ``pack_map`` (not packed as binary)."""


def pack_map(d: dict[str, Any]) -> bytes:
    """``packb(d)`` for a map whose values may be ``Packed`` (already msgpack bytes, inserted as-is)."""
    parts = [msgpack.Packer().pack_map_header(len(d))]
    for k, v in d.items():
        parts.append(packb(k))
        parts.append(v if isinstance(v, Packed) else packb(v))
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _row_layout(fields: tuple[tuple[str, str], ...]) -> tuple[np.dtype, np.ndarray, tuple[str, ...]]:
    """The record dtype of one msgpack row map with ``fields``, a 0-d template holding its constant bytes
    (map header, keys, float type tags), and the names of those constant fields."""
    names, formats, consts = ["map"], ["u1"], {"map": 0x80 | len(fields)}
    for i, (key, kind) in enumerate(fields):
        kb = key.encode()
        if len(kb) > 31 or len(fields) > 15 or kind not in "fi":
            raise ValueError(f"no fixed row layout for {fields}")
        names.append(f"k{i}")
        formats.append(f"S{len(kb) + 1}")
        consts[f"k{i}"] = bytes([0xA0 | len(kb)]) + kb  # fixstr
        if kind == "f":
            names.append(f"t{i}")
            formats.append("u1")
            consts[f"t{i}"] = 0xCB  # float 64, big-endian
            names.append(f"v{i}")
            formats.append(">f8")
        else:
            names.append(f"v{i}")
            formats.append("i1")  # fixint: the byte is the value as int8
    dtype = np.dtype({"names": names, "formats": formats})  # no padding: itemsize = the map's bytes
    template = np.zeros((), dtype)
    for name, value in consts.items():
        template[name] = value
    return dtype, template, tuple(consts)


def pack_rows(fields: tuple[tuple[str, str], ...], columns: Sequence[Any]) -> Packed | None:
    """``packb([dict(zip(keys, row)) for row in zip(*columns)])``, byte for byte, written in one numpy
    pass, for columns given as lists or 1-D numpy arrays (then the rows are those of ``tolist()``); None
    unless every "f" column holds only Python floats (or is a float array) and every "i" column only
    Python ints (or is an integer array) in -32..127 (then the caller packs the rows one by one)."""
    if len(columns) != len(fields):
        return None
    n = len(columns[0]) if columns else 0
    if any(len(c) != n for c in columns):
        return None
    if n == 0:
        return Packed(packb([]))
    dtype, template, _ = _row_layout(tuple(fields))
    # n copies of the template row (constant bytes in place), then the values written column by column
    out = np.frombuffer(bytearray(template.tobytes() * n), dtype)
    for i, ((_key, kind), col) in enumerate(zip(fields, columns, strict=True)):
        if isinstance(col, np.ndarray):  # tolist() of these gives Python floats / ints: no type check
            if col.ndim != 1 or col.dtype.kind not in ("f" if kind == "f" else "iu"):
                return None
            if kind == "i" and (col.min() < _FIXINT_MIN or col.max() > _FIXINT_MAX):
                return None
            out[f"v{i}"] = col  # float16/32 -> float64 and the integers -> int8 are exact here
            continue
        if set(map(type, col)) != ({float} if kind == "f" else {int}):  # bool, numpy scalars: no
            return None
        if kind == "f":
            out[f"v{i}"] = np.array(col, np.float64)
        else:
            try:
                a = np.array(col, np.int64)
            except OverflowError:
                return None
            if a.min() < _FIXINT_MIN or a.max() > _FIXINT_MAX:
                return None
            out[f"v{i}"] = a
    return Packed(msgpack.Packer().pack_array_header(n) + out.tobytes())


def unpack_rows(buf: Any, offset: int, n: int, fields: tuple[tuple[str, str], ...]) -> list[list[Any]] | None:
    """The columns (lists of Python floats / ints, in ``fields`` order) of ``n`` row maps that start at
    byte ``offset`` of ``buf`` in the fixed layout ``pack_rows`` writes; None when the bytes are not in
    that layout (the caller then unpacks them one by one)."""
    dtype, template, consts = _row_layout(tuple(fields))
    if n < 0 or offset + n * dtype.itemsize > _nbytes(buf):
        return None
    a = np.frombuffer(buf, dtype, count=n, offset=offset)
    for name in consts:
        if not (a[name] == template[name]).all():
            return None
    cols: list[list[Any]] = []
    for i, (_key, kind) in enumerate(fields):
        v = a[f"v{i}"]
        if kind == "i":
            if n and v.min() < _FIXINT_MIN:  # bytes 0x80-0xdf are other msgpack types, not fixints
                return None
            cols.append(v.tolist())
        else:
            cols.append(v.astype(np.float64).tolist())
    return cols


class Rows(Sequence):
    """Row maps kept as columns: a read-only sequence equal to ``[dict(zip(keys, r)) for r in
    zip(*columns)]`` (the list ``msgpack.unpackb`` gives); the dicts are built on first use."""

    __slots__ = ("keys", "columns", "_list")

    def __init__(self, keys: tuple[str, ...], columns: list[list[Any]]) -> None:
        self.keys = keys
        self.columns = columns
        self._list: list[dict[str, Any]] | None = None

    def as_list(self) -> list[dict[str, Any]]:
        if self._list is None:
            self._list = [dict(zip(self.keys, r, strict=True)) for r in zip(*self.columns, strict=True)]
        return self._list

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def __getitem__(self, i: Any) -> Any:
        return self.as_list()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.as_list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Rows):
            return self.keys == other.keys and self.columns == other.columns
        if isinstance(other, list):
            return self.as_list() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Rows({len(self)} x {self.keys})"


class _Reader:
    """A msgpack stream over one buffer that can jump forward (``seek``) past bytes read another way."""

    def __init__(self, buf: Any) -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        self.seek(0)

    def seek(self, pos: int) -> None:
        self.base = pos
        self.up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(1, len(self.buf)))
        self.up.feed(self.buf[pos:])

    def pos(self) -> int:
        return self.base + self.up.tell()

    def peek(self) -> int:
        return self.buf[self.pos()]


def _is_array_header(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def _is_map_header(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


def unpack_reply_header(buf: Any) -> Any:
    """``msgpack.unpackb(buf, raw=False, strict_map_key=False)`` of a reply header, except that
    ``analysis.atoms`` / ``analysis.dimers`` in the fixed row layout of ``pack_rows`` come back as ``Rows``
    (equal to the lists of dicts) read in one numpy pass. Anything else is unpacked as usual."""
    try:
        r = _Reader(buf)
        if _nbytes(r.buf) == 0 or not _is_map_header(r.peek()):
            raise ValueError
        out: dict[Any, Any] = {}
        for _ in range(r.up.read_map_header()):
            key = r.up.unpack()
            if key == "analysis" and _is_map_header(r.peek()):
                analysis: dict[Any, Any] = {}
                for _ in range(r.up.read_map_header()):
                    k = r.up.unpack()
                    fields = ROW_FIELDS.get(k) if isinstance(k, str) else None
                    if fields is not None and _is_array_header(r.peek()):
                        n = r.up.read_array_header()
                        start = r.pos()
                        cols = unpack_rows(r.buf, start, n, fields)
                        if cols is not None:
                            analysis[k] = Rows(tuple(f for f, _ in fields), cols)
                            r.seek(start + n * _row_layout(fields)[0].itemsize)
                        else:
                            analysis[k] = [r.up.unpack() for _ in range(n)]
                    else:
                        analysis[k] = r.up.unpack()
                out[key] = analysis
            else:
                out[key] = r.up.unpack()
        if r.pos() != _nbytes(r.buf):
            raise ValueError("extra bytes")
        return out
    except Exception:  # not a map, truncated, extra data...: exactly what unpackb does (and raises)
        return msgpack.unpackb(buf, raw=False, strict_map_key=False)
