"""The daemon over real ZeroMQ sockets on 127.0.0.1 (random ports), with the deterministic test analyzer.

Every error code is provoked through the socket and the daemon must still answer ``health`` afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from test_server_doubles import DeterministicTestAnalyzer

from stm_feedback.client import Client, CurveKeys
from stm_feedback.config import ServerSettings
from stm_feedback.errors import ServerError, ServerUnavailable
from stm_feedback.protocol import ERROR_CODES, build_request, parse_reply
from stm_feedback.server import Server, select_sites

BIND = "tcp://127.0.0.1:*"


@pytest.fixture
def make_server() -> Iterator[Any]:
    started: list[Server] = []

    def _make(delay_s: float = 0.0, **settings: Any) -> Server:
        settings.setdefault("warmup_px", 16)
        srv = Server(DeterministicTestAnalyzer(delay_s), ServerSettings(**settings), bind=BIND)
        started.append(srv)
        return srv.start()

    yield _make
    for srv in started:
        srv.stop(timeout_s=10)


class Raw:
    """A bare DEALER peer that can send anything (REQ-style empty delimiter first)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart([b"", *frames], copy=False)

    def recv(self, timeout_ms: int = 5000) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.sock.poll(timeout_ms), "no reply"
        msg = self.sock.recv_multipart()
        assert msg[0] == b""
        return parse_reply(msg[1:])

    def ask(self, frames: list[Any], timeout_ms: int = 5000) -> dict[str, Any]:
        self.send(frames)
        return self.recv(timeout_ms)[0]

    def close(self) -> None:
        self.sock.close(0)


def _img(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(h, w)).astype(np.float32)


def _analyze(rid: Any = 1, image: np.ndarray | None = None, **fields: Any) -> list[Any]:
    fields.setdefault("pixel_size_nm", 0.1)
    return build_request("analyze", rid, {"image": _img() if image is None else image}, **fields)


def test_round_trip_through_client(make_server: Any) -> None:
    srv = make_server()
    with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
        assert c.health()["status"] == "ok"
        assert c.ready() is True
        models = c.models()
        assert models["versions"] == {"test": "double-1"} and models["device"] == "cpu"
        img = _img()
        a = c.analyze(img, 0.1, instrument_id="stm1", frame_id="f1", bias_v=-2.0, setpoint_pa=20.0)
        expected = DeterministicTestAnalyzer().analyze(img, 0.1, bias_v=-2.0, frame_id="f1")
        assert a.to_json_dict() == expected.to_json_dict()
        np.testing.assert_array_equal(a.safe_mask, expected.safe_mask)
        assert a.terrace_labels.dtype == np.int32 and a.safe_mask.dtype == bool
        timings = c.last_reply["timings_ms"]
        assert {"decode", "queue", "analyze", "encode", "total"} <= set(timings)
        assert c.last_reply["id"].endswith("-4") and c.last_reply["request_meta"]["setpoint_pa"] == 20.0
        no_maps = c.analyze(img, 0.1, instrument_id="stm1", with_maps=False)
        assert no_maps.terrace_labels is None
        sites = c.query_sites("stm1", limit=3)
        assert len(sites) == 3 and sites[0].score >= sites[1].score >= sites[2].score
        region = c.query_sites("stm1", region=(0, 0, 20, 20), limit=50)
        assert [(s.center_x_px, s.center_y_px) for s in region] == [(8.0, 8.0)]
        assert c.query_sites("stm1", pattern="3x2") == []
        assert c.query_sites("stm1", terrace=5) == []


def test_every_error_code_and_server_survives(make_server: Any) -> None:
    srv = make_server(max_frame_px=128 * 128, max_header_bytes=2048, max_message_bytes=1 << 20)
    raw = Raw(srv.endpoint)
    seen: set[str] = set()
    calls: list[str] = []

    def expect(frames: list[Any], code: str) -> None:
        reply = raw.ask(frames)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert isinstance(reply["error"]["message"], str) and "timings_ms" in reply
        assert raw.ask(build_request("health", "h"))["status"] == "ok"  # still serving
        seen.add(code)
        calls.append(code)

    good = _analyze(1)
    expect([b"\xc1\xc1 definitely not msgpack"], "malformed_msgpack")
    expect([], "malformed_msgpack")  # only the delimiter: no header at all
    expect([msgpack.packb({"v": 9, "type": "health", "id": 1})], "unsupported_version")
    expect([msgpack.packb({"v": 1, "type": "launch", "id": 1})], "unknown_type")
    expect(_analyze(1, pixel_size_nm=-1.0), "bad_header")
    expect(build_request("analyze", 1, {"image": _img()}), "missing_metadata")
    expect(good[:1], "bad_array")  # truncated multipart
    expect(_analyze(1, image=_img().astype(np.complex64)), "bad_array")  # wrong dtype
    expect([good[0], bytes(good[1])[:100]], "bad_array")  # wrong size
    nan = _img()
    nan[5, 5] = np.nan
    expect(_analyze(1, image=nan), "non_finite")
    huge = msgpack.unpackb(good[0])
    huge["arrays"][0]["shape"] = [50_000, 50_000]
    expect([msgpack.packb(huge), b"\x00" * 64], "frame_too_large")  # huge declared frame
    expect([b"\x81\xa1x" + msgpack.packb("y" * 4096)], "frame_too_large")  # huge header frame
    expect(_analyze(1, image=_img(4, 4)), "invalid_input")  # the analyzer rejects it
    expect(_analyze(1, frame_id="boom"), "internal")  # the analyzer crashes
    expect(build_request("query_sites", 1, instrument_id="nobody"), "unknown_instrument")
    # deadline_exceeded and overloaded need timing: see the dedicated tests
    assert seen | {"deadline_exceeded", "overloaded"} == set(ERROR_CODES)
    stats = raw.ask(build_request("stats", "s"))
    assert stats["errors_by_code"]["bad_array"] == 3 and stats["errors_by_code"]["internal"] == 1
    assert stats["requests_by_type"]["health"] == len(calls) + 1  # + the "v": 9 health request
    raw.close()


def test_overload_answers_overloaded_and_keeps_serving(make_server: Any) -> None:
    srv = make_server(delay_s=0.4, max_inflight=1)
    raw = Raw(srv.endpoint)
    raw.send(_analyze("slow"))
    raw.send(_analyze("extra"))
    first = raw.recv()[0]  # the rejection comes back at once, while "slow" is still running
    assert first["id"] == "extra" and first["error"]["code"] == "overloaded"
    second = raw.recv()[0]
    assert second["id"] == "slow" and second["ok"] is True
    assert raw.ask(_analyze("again"))["ok"] is True  # capacity is back
    assert raw.ask(build_request("stats", "s"))["errors_by_code"] == {"overloaded": 1}
    raw.close()


def test_deadline_expired_in_queue(make_server: Any) -> None:
    srv = make_server(delay_s=0.4, max_inflight=4)
    raw = Raw(srv.endpoint)
    raw.send(_analyze("slow"))
    raw.send(_analyze("hurry", deadline_ms=50))  # waits ~400 ms behind "slow"
    raw.send(_analyze("patient", deadline_ms=60_000))
    replies = {h["id"]: h for h, _ in (raw.recv(), raw.recv(), raw.recv())}
    assert replies["slow"]["ok"] and replies["patient"]["ok"]
    assert replies["hurry"]["error"]["code"] == "deadline_exceeded"
    assert replies["hurry"]["timings_ms"]["queue"] > 50
    raw.close()


def test_analyze_lines_partial_frame_does_not_replace_latest(make_server: Any) -> None:
    srv = make_server()
    with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
        full = _img(64, 64)
        c.analyze(full, 0.1, instrument_id="stm1", frame_id="full")
        part = c.analyze_lines(full[:24], 0.1, total_lines=64, instrument_id="stm1", frame_id="part")
        assert part.image.height_px == 24 and part.safe_mask.shape == (24, 64)
        assert c.last_reply["partial"] == {"lines": 24, "total_lines": 64}
        c.query_sites("stm1")
        assert c.last_reply["frame_id"] == "full"
        with pytest.raises(ServerError) as info:
            c.analyze_lines(full[:3], 0.1, instrument_id="stm1")
        assert info.value.code == "invalid_input"


def test_drift_estimate_from_successive_frames(make_server: Any) -> None:
    srv = make_server()
    base = np.zeros((96, 96), np.float32)
    yy, xx = np.mgrid[0:96, 0:96]
    for x, y, amp in ((30, 30, 3.0), (60, 40, 2.5), (45, 70, 2.0), (20, 75, 1.5)):
        base += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
    moved = np.roll(base, (2, 5), axis=(0, 1))  # content moves 5 px right, 2 px down
    with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
        c.analyze(base, 0.05, instrument_id="drifty")
        c.analyze(moved, 0.05, instrument_id="drifty")
        drift = c.last_reply["drift"]
    assert drift["method"] == "image+defects" and drift["frames"] == 2
    assert drift["drift_px"] == pytest.approx([5.0, 2.0], abs=0.3)
    assert drift["drift_nm"] == pytest.approx([0.25, 0.1], abs=0.015)


def test_select_sites_filters_and_orders() -> None:
    a = DeterministicTestAnalyzer().analyze(_img(64, 64), 0.1)
    picked = select_sites(a.sites, "3x1", [10, 10, 60, 60], None, 100)
    assert all(10 <= s.center_x_px <= 60 and 10 <= s.center_y_px <= 60 for s in picked)
    assert [s.score for s in picked] == sorted((s.score for s in picked), reverse=True)
    assert select_sites(a.sites, "3x1", None, 0, 2) == sorted(a.sites, key=lambda s: -s.score)[:2]


def test_oversized_frame_is_dropped_before_decoding(make_server: Any) -> None:
    srv = make_server(max_message_bytes=256 * 1024)
    raw = Raw(srv.endpoint)
    raw.send(_analyze("big", image=_img(400, 400)))  # 640 kB frame > MAXMSGSIZE: the peer is disconnected
    assert raw.sock.poll(500) == 0
    raw.close()
    raw2 = Raw(srv.endpoint)
    # two frames under the per-frame limit but together over it: a typed error, checked before decoding
    frames = _analyze("two", image=_img(200, 200))
    frames[0] = msgpack.packb({**msgpack.unpackb(frames[0]), "pad": "x" * 10})
    reply = raw2.ask([frames[0], frames[1]])
    assert reply["ok"] is True  # 160 kB: fine
    header = msgpack.unpackb(frames[0])
    header["arrays"].append({"name": "extra", "dtype": "<f4", "shape": [200, 200], "frame": 1})
    reply = raw2.ask([msgpack.packb(header), frames[1], frames[1]])
    assert reply["error"]["code"] == "frame_too_large"
    assert raw2.ask(build_request("health", 1))["ok"] is True
    raw2.close()


def test_reply_to_vanished_client_is_counted_not_fatal(make_server: Any) -> None:
    srv = make_server(delay_s=0.3)
    raw = Raw(srv.endpoint)
    raw.send(_analyze("orphan"))
    time.sleep(0.05)  # let the server accept it
    raw.close()  # the client goes away before the reply (ROUTER_MANDATORY -> EHOSTUNREACH)
    with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
        for _ in range(50):
            if c.stats()["undeliverable"] == 1:
                break
            time.sleep(0.05)
        assert c.stats()["undeliverable"] == 1
        assert c.health()["status"] == "ok"


def test_stats_latency_percentiles(make_server: Any) -> None:
    srv = make_server()
    with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
        for i in range(5):
            c.analyze(_img(seed=i), 0.1)
        s = c.stats()
    assert s["requests_by_type"]["analyze"] == 5 and s["queue_depth"] == 0
    lat = s["latency_ms"]["analyze"]
    assert lat["n"] == 5 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert s["latency_ms"]["pipeline.fake"]["n"] == 5 and s["uptime_s"] > 0


def test_curve_allow_list(make_server: Any, tmp_path: Any) -> None:
    import zmq.auth

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(str(keys), "server")
    client_pub, client_sec = zmq.auth.create_certificates(str(keys), "client")
    _, intruder_sec = zmq.auth.create_certificates(str(keys), "intruder")
    (allowed / "client.key").write_bytes(open(client_pub, "rb").read())
    srv = make_server(curve_secret_key_file=server_sec, curve_allowed_clients_dir=allowed)
    with Client(
        srv.endpoint, timeout_ms=3000, retries=0, curve=CurveKeys.from_files(server_pub, client_sec)
    ) as c:
        assert c.health()["status"] == "ok"
        assert c.analyze(_img(), 0.1).image.width_px == 64
    intruder = CurveKeys.from_files(server_pub, intruder_sec)
    with Client(srv.endpoint, timeout_ms=400, retries=1, curve=intruder) as bad:
        with pytest.raises(ServerUnavailable):
            bad.health()
    with Client(srv.endpoint, timeout_ms=400, retries=0) as plain:  # no CURVE at all
        with pytest.raises(ServerUnavailable):
            plain.health()
    assert srv.stats.snapshot()["requests_by_type"] == {"health": 1, "analyze": 1}


def test_measure_drift_on_binned_large_frames() -> None:
    from simulator.frame import SimConfig, simulate_frame
    from stm_feedback.server import bin_mean, drift_bin_factor, measure_drift

    big = simulate_frame(
        1_000_321, size_px=640, pixel_size_nm=0.1, config=SimConfig.preset("realistic")
    ).image_nm
    prev_img, cur_img = big[20:620, 20:620], big[24:624, 13:613]  # surface appears to move +7 px x, -4 px y
    analyzer = DeterministicTestAnalyzer()
    factor = drift_bin_factor(prev_img.shape)
    assert factor == 3
    prev, cur = analyzer.analyze(prev_img, 0.1), analyzer.analyze(cur_img, 0.1)
    est = measure_drift(prev, bin_mean(prev_img, factor), cur, bin_mean(cur_img, factor), factor)
    assert est is not None and (est.dx_px, est.dy_px) == pytest.approx((7.0, -4.0), abs=0.5)
    assert est.response > 0.1
    cur_small = analyzer.analyze(cur_img[:-3], 0.1)
    assert (
        measure_drift(prev, bin_mean(prev_img, factor), cur_small, bin_mean(cur_img[:-3], factor), 3) is None
    )
