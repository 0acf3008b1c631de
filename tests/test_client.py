"""Client reliability (Lazy Pirate): ServerUnavailable, retry across a restart, stale replies dropped."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq
from test_server_doubles import DeterministicTestAnalyzer

from stm_feedback.client import Client
from stm_feedback.config import ServerSettings
from stm_feedback.errors import ServerError, ServerUnavailable
from stm_feedback.protocol import Limits, build_reply, parse_request
from stm_feedback.server import Server


def _server(bind: str, delay_s: float = 0.0) -> Server:
    return Server(DeterministicTestAnalyzer(delay_s), ServerSettings(warmup_px=0), bind=bind).start()


def test_no_server_gives_server_unavailable() -> None:
    first = _server("tcp://127.0.0.1:*")
    endpoint = first.endpoint
    first.stop()
    with Client(endpoint, timeout_ms=150, retries=2) as c:
        sockets: list[zmq.Socket] = []
        connect = c._connect
        c._connect = lambda: sockets.append(connect()) or sockets[-1]  # type: ignore[method-assign]
        with pytest.raises(ServerUnavailable):
            c.health()
        assert len(sockets) == 3 and all(s.closed for s in sockets)  # 1 + 2 retries, each on a fresh socket


def test_lazy_pirate_retry_after_server_restart() -> None:
    first = _server("tcp://127.0.0.1:*")
    endpoint = first.endpoint
    with Client(endpoint, timeout_ms=300, retries=20) as c:
        assert c.health()["status"] == "ok"
        first.stop()  # the daemon goes away ...
        second: list[Server] = []
        restart = threading.Timer(0.5, lambda: second.append(_server(endpoint)))  # ... and comes back
        restart.start()
        try:
            a = c.analyze(np.ones((32, 32), np.float32) + np.eye(32, dtype=np.float32), 0.1)
            assert a.image.width_px == 32  # answered by the restarted daemon after some silent attempts
            assert c.health()["uptime_s"] < 5
        finally:
            restart.join()
            for s in second:
                s.stop()


def test_stale_reply_is_dropped() -> None:
    """A slow first attempt's late reply must not be taken for the answer to the next request."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:

        def fake_server() -> None:
            # reply to the first request with a wrong id (a stale reply), then with the right one
            msg = router.recv_multipart()
            ident, body = msg[0], msg[2:]
            rid = parse_request(body, Limits()).header.id
            router.send_multipart([ident, b"", *build_reply("old-id", "health", {"status": "stale"}, {})])
            router.send_multipart([ident, b"", *build_reply(rid, "health", {"status": "ok"}, {})])

        t = threading.Thread(target=fake_server)
        t.start()
        with Client(f"tcp://127.0.0.1:{port}", timeout_ms=2000, retries=0) as c:
            assert c.health()["status"] == "ok"
        t.join()
    finally:
        router.close(0)


def test_server_error_is_typed() -> None:
    srv = _server("tcp://127.0.0.1:*")
    try:
        with Client(srv.endpoint, timeout_ms=2000, retries=0) as c:
            with pytest.raises(ServerError) as info:
                c.query_sites("never-seen")
            assert info.value.code == "unknown_instrument" and "never-seen" in info.value.message
            with pytest.raises(ServerError) as info:
                c.analyze(np.full((16, 16), np.inf, np.float32), 0.1)
            assert info.value.code == "non_finite"
            assert c.health()["status"] == "ok"
    finally:
        srv.stop()
