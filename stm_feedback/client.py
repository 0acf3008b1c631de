"""Python client of the stm-feedback daemon (protocol v1, docs/protocol.md).

Reliability follows the zguide "Lazy Pirate": send, poll for the reply up to ``timeout_ms``; on silence
close the socket (linger 0), open a fresh one and resend, at most ``retries`` times, then raise
``ServerUnavailable``. A DEALER socket (with the REQ-style empty delimiter) is used instead of REQ so
that a late reply to an abandoned attempt is recognised by its id and dropped instead of wedging the socket.
Not thread-safe: one Client per thread. A retried ``analyze`` may be analysed twice (at-least-once).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np
import zmq

from stm_feedback.errors import ServerError, ServerUnavailable
from stm_feedback.protocol import Rows, build_request, parse_reply
from stm_feedback.schema import Analysis, Site

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (Z85 bytes): the server's public key and this client's key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(
        cls, server_public_file: str | os.PathLike, client_secret_file: str | os.PathLike
    ) -> CurveKeys:
        """Keys from ``zmq.auth.create_certificates`` files (``server.key``, ``client.key_secret``)."""
        from zmq.auth import load_certificate

        server_public, _ = load_certificate(str(server_public_file))
        client_public, client_secret = load_certificate(str(client_secret_file))
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public, client_public, client_secret)


class Client:
    """Blocking client: numpy in, ``stm_feedback.schema`` objects out, ``ServerError`` for error replies."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_ms: int = 10_000,
        retries: int = 2,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{id(self):x}"
        self._socket: zmq.Socket | None = None
        self.last_reply: dict[str, Any] = {}  # header of the last reply (timings_ms, drift, partial, ...)

    # ------------------------------------------------------------------------------------------- transport

    def _connect(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            s.curve_serverkey = self.curve.server_public
            s.curve_publickey = self.curve.client_public
            s.curve_secretkey = self.curve.client_secret
        s.connect(self.endpoint)
        return s

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def close(self) -> None:
        """Close the socket (the shared zmq context stays)."""
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, rtype: str, arrays: dict[str, np.ndarray] | None = None, **fields: Any
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one request with Lazy Pirate retries; returns (reply header, reply arrays).

        Raises ``ServerError`` for an error reply and ``ServerUnavailable`` after ``retries`` silent resends.
        """
        rid = f"{self._prefix}-{next(self._ids)}"
        frames = build_request(rtype, rid, arrays, **{k: v for k, v in fields.items() if v is not None})
        for _attempt in range(self.retries + 1):
            if self._socket is None:
                self._socket = self._connect()
            self._socket.send_multipart([b"", *frames], copy=False)
            reply = self._wait_for(rid)
            if reply is not None:
                header, out = reply
                self.last_reply = header
                if not header.get("ok", False):
                    err = header.get("error") or {}
                    raise ServerError(str(err.get("code", "internal")), str(err.get("message", "")), rid)
                return header, out
            self._reset()  # the socket may hold a half-sent request or a dead connection: start over
        raise ServerUnavailable(
            f"no reply from {self.endpoint} to {rtype!r} after {self.retries + 1} attempt(s)"
            f" of {self.timeout_ms} ms"
        )

    def _wait_for(self, rid: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        assert self._socket is not None
        deadline = time.monotonic() + self.timeout_ms / 1e3
        while (left_ms := (deadline - time.monotonic()) * 1e3) > 0:
            if not self._socket.poll(max(1, int(left_ms)), zmq.POLLIN):
                return None
            msg = self._socket.recv_multipart()
            body = msg[1:] if msg and msg[0] == b"" else msg
            header, arrays = parse_reply(body)
            if header.get("id") == rid:
                return header, arrays
            # a late reply to an earlier, abandoned request: drop it and keep waiting
        return None

    # ---------------------------------------------------------------------------------------------- calls

    def health(self) -> dict[str, Any]:
        """``{"status": "ok"|"stopping", "uptime_s", "inflight", ...}``."""
        return _payload(self.request("health")[0])

    def ready(self) -> bool:
        """True once the analyzer is loaded and warmed up (and the server is not stopping)."""
        return bool(self.request("ready")[0].get("ready"))

    def models(self) -> dict[str, Any]:
        """``{"versions": {...}, "backend", "device", "analyzer"}``."""
        return _payload(self.request("models")[0])

    def stats(self) -> dict[str, Any]:
        """Counts by type, errors by code, per-stage latency percentiles (ms), queue depth, uptime."""
        return _payload(self.request("stats")[0])

    def analyze(
        self,
        image: np.ndarray,
        pixel_size_nm: float,
        *,
        scan_angle_deg: float | None = None,
        bias_v: float | None = None,
        setpoint_pa: float | None = None,
        instrument_id: str | None = None,
        frame_id: str | None = None,
        deadline_ms: float | None = None,
        with_maps: bool = True,
    ) -> Analysis:
        """Analyse one full (H, W) frame of apparent height in nm; maps unless ``with_maps=False``."""
        header, arrays = self.request(
            "analyze",
            {"image": np.asarray(image)},
            pixel_size_nm=float(pixel_size_nm),
            scan_angle_deg=scan_angle_deg,
            bias_v=bias_v,
            setpoint_pa=setpoint_pa,
            instrument_id=instrument_id,
            frame_id=frame_id,
            deadline_ms=deadline_ms,
            with_maps=with_maps,
        )
        return _analysis(header, arrays)

    def analyze_lines(
        self,
        lines: np.ndarray,
        pixel_size_nm: float,
        *,
        total_lines: int | None = None,
        scan_angle_deg: float | None = None,
        bias_v: float | None = None,
        setpoint_pa: float | None = None,
        instrument_id: str | None = None,
        frame_id: str | None = None,
        deadline_ms: float | None = None,
        with_maps: bool = True,
    ) -> Analysis:
        """Analyse the first n lines (n, W) of a frame still being scanned (does not update query_sites)."""
        header, arrays = self.request(
            "analyze_lines",
            {"image": np.asarray(lines)},
            pixel_size_nm=float(pixel_size_nm),
            total_lines=total_lines,
            scan_angle_deg=scan_angle_deg,
            bias_v=bias_v,
            setpoint_pa=setpoint_pa,
            instrument_id=instrument_id,
            frame_id=frame_id,
            deadline_ms=deadline_ms,
            with_maps=with_maps,
        )
        return _analysis(header, arrays)

    def query_sites(
        self,
        instrument_id: str,
        pattern: str = "3x1",
        region: tuple[float, float, float, float] | None = None,
        terrace: int | None = None,
        limit: int = 10,
    ) -> list[Site]:
        """Safe write sites from the latest full analysis of ``instrument_id``, best first; ``region`` is
        (x0, y0, x1, y1) in that frame's pixels. ``last_reply["drift"]`` has the drift estimate."""
        header, _ = self.request(
            "query_sites",
            instrument_id=instrument_id,
            pattern=pattern,
            region=list(region) if region is not None else None,
            terrace=terrace,
            limit=limit,
        )
        return [Site(**s) for s in header.get("sites", [])]


_ENVELOPE_KEYS = frozenset({"v", "type", "id", "ok", "arrays"})


def _payload(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in _ENVELOPE_KEYS}


def _analysis(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Analysis:
    """The ``Analysis`` of a reply. When ``parse_reply`` read the atoms and dimers as columns (``Rows``),
    their ``Atom`` / ``Dimer`` objects are built on first access (``Analysis.with_lazy_rows``, as the
    in-process pipeline's): equal to ``Analysis.from_json_dict`` in every respect."""
    maps: dict[str, np.ndarray] = {}
    if "terrace_labels" in arrays:
        maps["terrace_labels"] = arrays["terrace_labels"].astype(np.int32, copy=False)
    if "safe_mask" in arrays:
        maps["safe_mask"] = arrays["safe_mask"].astype(bool)
    d = header["analysis"]
    atoms, dimers = d.get("atoms"), d.get("dimers")
    if not (isinstance(atoms, Rows) and isinstance(dimers, Rows)):
        d = {k: (v.as_list() if isinstance(v, Rows) else v) for k, v in d.items()}
        return Analysis.from_json_dict(d, maps)
    eager = Analysis.from_json_dict({**d, "atoms": [], "dimers": []}, maps)
    rest = {
        f.name: getattr(eager, f.name)
        for f in dataclass_fields(Analysis)
        if f.name not in ("atoms", "dimers")
    }
    return Analysis.with_lazy_rows(atoms=tuple(atoms.columns), dimers=tuple(dimers.columns), **rest)
