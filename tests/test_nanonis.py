"""The Nanonis-compatible TCP server of the simulated STM, driven by the official ``nanonis_spm`` client (the
independent peer) for every command it implements, and by our own client/adapter."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from instrument_adapters.nanonis import (
    CHANNEL_Z,
    NanonisAdapter,
    NanonisClient,
    NanonisError,
    ScanFrame,
    frame_px_to_nanonis_m,
)
from simulator.nanonis_server import NanonisSimServer

nanonis_spm = pytest.importorskip("nanonis_spm")

PIXELS = 64
PIXEL_NM = 0.1


@pytest.fixture
def stm():
    from simulator.frame import SimConfig
    from simulator.instrument import SimulatedSTM

    return SimulatedSTM(seed=3, config=SimConfig.preset("clean"))


@pytest.fixture
def server(stm) -> Iterator[NanonisSimServer]:
    srv = NanonisSimServer(stm).start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def official(server: NanonisSimServer) -> Iterator[object]:
    conn = socket.create_connection((server.host, server.port), timeout=30)
    nn = nanonis_spm.Nanonis(conn)
    try:
        yield nn
    finally:
        conn.close()


def _values(result: tuple) -> list:
    """nanonis_spm returns (error string, raw body, values); fail loudly on an error string."""
    err, _raw, values = result
    assert err == "", err
    return values


def _configure_small_frame(nn: object) -> None:
    size_m = PIXELS * PIXEL_NM * 1e-9
    _values(nn.Scan_FrameSet(2e-9, -1e-9, size_m, size_m, 0.0))
    _values(nn.Scan_BufferSet([CHANNEL_Z, 0], PIXELS, PIXELS))


def test_official_client_bias_setpoint_frame_buffer(official: object) -> None:
    nn = official
    _values(nn.Bias_Set(-1.7))
    assert _values(nn.Bias_Get())[0] == pytest.approx(-1.7)
    assert _values(nn.ZCtrl_SetpntGet())[0] > 0
    _configure_small_frame(nn)
    cx, cy, w, h, angle = _values(nn.Scan_FrameGet())
    assert (cx, cy) == (pytest.approx(2e-9), pytest.approx(-1e-9))
    assert w == pytest.approx(PIXELS * PIXEL_NM * 1e-9) and h == pytest.approx(w) and angle == 0
    n, channels, pixels, lines = _values(nn.Scan_BufferGet())
    assert n == 2 and [c[0] for c in channels] == [CHANNEL_Z, 0] and (pixels, lines) == (PIXELS, PIXELS)


def test_official_client_scan_and_grab(official: object, stm) -> None:
    nn = official
    _configure_small_frame(nn)
    _values(nn.Scan_Action(0, 0))
    timed_out, _size, path = _values(nn.Scan_WaitEndOfScan(60_000))
    assert timed_out == 0 and path == ""
    assert _values(nn.Scan_StatusGet())[0] == 0
    name_size, name, rows, cols, data, up = _values(nn.Scan_FrameDataGrab(CHANNEL_Z, 1))
    assert name == "Z" and name_size == 1 and (rows, cols) == (PIXELS, PIXELS) and up == 0
    z_nm = np.asarray(data, np.float64) * 1e9
    assert np.isfinite(z_nm).all()
    # the same frame the simulator rendered, through big-endian float32 metres
    np.testing.assert_allclose(z_nm, stm.last_frame.image_nm, rtol=1e-5, atol=1e-6)
    assert z_nm.std() > 0.005  # an image with structure, not a constant


def test_official_client_tip_pulse_depassivates(official: object, server: NanonisSimServer, stm) -> None:
    nn = official
    _configure_small_frame(nn)
    _values(nn.Scan_Action(0, 0))
    _values(nn.Scan_WaitEndOfScan(60_000))
    truth = stm.last_frame.truth
    intact = np.flatnonzero(~truth.dimer_bare)
    target = truth.dimers_xy_px[intact[len(intact) // 2]]
    frame = ScanFrame(2e-9, -1e-9, PIXELS * PIXEL_NM * 1e-9, PIXELS * PIXEL_NM * 1e-9, 0.0)
    x_m, y_m = frame_px_to_nanonis_m(target[None], frame, PIXELS, PIXELS)[0]
    _values(nn.FolMe_XYPosSet(x_m, y_m, 1))
    got = _values(nn.FolMe_XYPosGet(0))
    assert got[0] == pytest.approx(x_m) and got[1] == pytest.approx(y_m)
    _values(nn.Bias_Pulse(1, 0.01, 3.8, 1, 2))
    assert server.pulses[-1]["depassivated"] == 1.0
    _values(nn.Scan_Action(0, 0))
    _values(nn.Scan_WaitEndOfScan(60_000))
    after = stm.last_frame.truth
    bare = after.dimers_xy_px[after.dimer_bare]
    assert len(bare) >= 1
    # the bared dimer is the one under the tip (within one dimer pitch: drift between scans is allowed)
    assert np.min(np.hypot(*(bare - target).T)) * PIXEL_NM < 0.384 + 0.05


def test_official_client_error_reply(official: object) -> None:
    err, _raw, _values_ = official.Scan_BufferSet([99], 64, 64)
    assert "channels" in err
    err, _raw, _values_ = official.Bias_Set(50.0)
    assert "out of range" in err


def test_unknown_command_and_garbage_do_not_kill_server(server: NanonisSimServer) -> None:
    with NanonisClient(server.host, server.port) as c:
        with pytest.raises(NanonisError, match="not implemented"):
            c.call("Piezo.Explode")
        assert c.bias_get() == pytest.approx(server.bias_v)
    # a header announcing an absurd body closes that connection only
    with socket.create_connection((server.host, server.port), timeout=5) as raw:
        raw.sendall(b"Bias.Get".ljust(32, b"\0") + struct.pack(">iHH", 1 << 30, 1, 0))
        assert raw.recv(64) == b""
    with NanonisClient(server.host, server.port) as c:
        assert c.bias_get() == pytest.approx(server.bias_v)


def test_our_client_and_adapter(server: NanonisSimServer, stm) -> None:
    with NanonisClient(server.host, server.port) as c:
        size_m = PIXELS * PIXEL_NM * 1e-9
        c.frame_set(ScanFrame(0.0, 0.0, size_m, size_m, 0.0))
        c.buffer_set([CHANNEL_Z, 0], PIXELS, PIXELS)
        assert c.buffer_get() == ([CHANNEL_Z, 0], PIXELS, PIXELS)
        c.bias_set(-2.2)
    adapter = NanonisAdapter(server.host, server.port, max_frames=2)
    try:
        frames = list(adapter.frames())
    finally:
        adapter.close()
    assert len(frames) == 2
    f = frames[-1]
    assert f.image.shape == (PIXELS, PIXELS) and f.image.dtype == np.float32
    assert f.pixel_size_nm == pytest.approx(PIXEL_NM, rel=1e-5)
    assert f.bias_v == pytest.approx(-2.2) and f.setpoint_pa > 0
    np.testing.assert_allclose(f.image, stm.last_frame.image_nm, rtol=1e-5, atol=1e-6)


def test_partial_frame_while_scanning(stm) -> None:
    with NanonisSimServer(stm, line_period_s=0.01).start() as srv:
        adapter = NanonisAdapter(srv.host, srv.port)
        try:
            c = adapter.client
            size_m = PIXELS * PIXEL_NM * 1e-9
            c.frame_set(ScanFrame(0.0, 0.0, size_m, size_m, 0.0))
            c.buffer_set([CHANNEL_Z], PIXELS, PIXELS)
            c.scan_action(0)
            assert c.scan_running()
            timed_out, _ = c.wait_end_of_scan(100)
            assert timed_out
            part = adapter.partial()
            assert part is not None and 0 < part.image.shape[0] < PIXELS
            assert np.isfinite(part.image).all() and part.meta["total_lines"] == PIXELS
            c.scan_action(1)  # stop
            assert not c.scan_running()
        finally:
            adapter.close()


def test_px_to_nanonis_mapping_rotation() -> None:
    frame = ScanFrame(1e-8, 2e-8, 4e-9, 4e-9, 90.0)
    # the top-left pixel centre of a 4x4 frame: 1.5 px left and 1.5 px up of the centre on screen;
    # rotated 90 deg clockwise, screen-left points +Y and screen-up points +X
    xy = frame_px_to_nanonis_m(np.array([[0.0, 0.0]]), frame, 4, 4)[0]
    np.testing.assert_allclose(xy, [1e-8 + 1.5e-9, 2e-8 + 1.5e-9], atol=1e-15)


def test_autosave_returns_readable_sxm(stm, tmp_path) -> None:
    from stm_feedback.readers import read_frame

    with NanonisSimServer(stm, autosave_dir=tmp_path).start() as srv:
        conn = socket.create_connection((srv.host, srv.port), timeout=30)
        try:
            nn = nanonis_spm.Nanonis(conn)
            _configure_small_frame(nn)
            _values(nn.Scan_Action(0, 0))
            timed_out, size, path = _values(nn.Scan_WaitEndOfScan(60_000))
        finally:
            conn.close()
    assert timed_out == 0 and size == len(path.encode()) and path.endswith(".sxm")
    frame = read_frame(path)
    np.testing.assert_allclose(frame.image, stm.last_frame.image_nm, rtol=1e-5, atol=1e-6)
    assert frame.pixel_size_nm == pytest.approx(PIXEL_NM, rel=1e-5)
