"""Daemon counters and latency percentiles (bounded ring buffers), safe to update from several threads."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np


class Stats:
    """Request counts by type, replies/errors by code, per-stage latency percentiles in ms, uptime.

    Latencies are kept in one ring buffer of ``window`` samples per stage, so memory is bounded for a
    daemon that runs for days and the percentiles describe the recent past.
    """

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._started_s = time.monotonic()
        self.requests_by_type: Counter[str] = Counter()
        self.errors_by_code: Counter[str] = Counter()
        self.replies = 0
        self.undeliverable = 0  # replies whose client was gone (ROUTER_MANDATORY: EHOSTUNREACH) or blocked
        self._latency_ms: dict[str, deque[float]] = {}

    def count_request(self, rtype: str | None) -> None:
        with self._lock:
            self.requests_by_type[rtype or "<unparsed>"] += 1

    def count_reply(self, error_code: str | None) -> None:
        with self._lock:
            self.replies += 1
            if error_code:
                self.errors_by_code[error_code] += 1

    def count_undeliverable(self) -> None:
        with self._lock:
            self.undeliverable += 1

    def record_ms(self, timings_ms: dict[str, float], prefix: str = "") -> None:
        """Add one sample per stage (e.g. ``{"queue": 0.2, "analyze": 80.1}``)."""
        with self._lock:
            for stage, ms in timings_ms.items():
                if isinstance(ms, (int, float)):
                    buf = self._latency_ms.setdefault(prefix + stage, deque(maxlen=self._window))
                    buf.append(float(ms))

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_s

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """``stats`` reply dict: counts, errors, ``latency_ms[stage] = {n, p50, p95, p99, max}``."""
        with self._lock:
            latency = {
                stage: _percentiles(np.fromiter(buf, float, len(buf)))
                for stage, buf in self._latency_ms.items()
            }
            return {
                "uptime_s": round(self.uptime_s(), 3),
                "requests_by_type": dict(self.requests_by_type),
                "errors_by_code": dict(self.errors_by_code),
                "replies": self.replies,
                "undeliverable": self.undeliverable,
                "latency_ms": latency,
                "latency_window": self._window,
                **extra,
            }


def _percentiles(samples_ms: np.ndarray) -> dict[str, float]:
    if samples_ms.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(samples_ms, [50, 95, 99])
    return {
        "n": int(samples_ms.size),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(samples_ms.max()), 3),
    }
