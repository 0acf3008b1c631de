"""Simulated adapter through the real daemon on loopback (classical baseline analyzer: no weights needed), the
Nanonis path end to end (simulated STM -> Nanonis TCP -> our adapter -> daemon), the write path and the demo.
The write-then-verify loop is tested in test_server_write_verify.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from instrument_adapters.base import WriteNotSupported, send_frame, stream
from instrument_adapters.nanonis import CHANNEL_Z, NanonisAdapter, ScanFrame
from instrument_adapters.simulated import SimulatedAdapter
from simulator.frame import SimConfig
from simulator.instrument import SimulatedSTM
from simulator.nanonis_server import NanonisSimServer
from stm_feedback.client import Client
from stm_feedback.config import ServerSettings
from stm_feedback.server import BaselineAnalyzer, Server

PIXELS = 64


@pytest.fixture
def daemon() -> Iterator[Server]:
    srv = Server(BaselineAnalyzer(), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_simulated_adapter_streams_partial_and_full_frames(daemon: Server) -> None:
    with Client(daemon.endpoint, timeout_ms=60_000, retries=0) as client:
        adapter = SimulatedAdapter(
            seed=5,
            preset="clean",
            pixels=PIXELS,
            size_nm=PIXELS * 0.1,
            client=client,
            lines_every=32,
            max_frames=2,
        )
        seen: list[tuple[str, int]] = []
        n = stream(adapter, client, on_result=lambda f, a: seen.append((f.meta["frame_id"], len(a.atoms))))
        assert n == 2 and [s[0] for s in seen] == ["sim-stm-00001", "sim-stm-00002"]
        assert all(
            atoms > 20 for _, atoms in seen
        )  # a 6.4 nm frame holds ~200 atoms; the baseline finds many
        stats = client.stats()
    by_type = stats["requests_by_type"]
    assert by_type.get("analyze") == 2
    assert by_type.get("analyze_lines") == 2  # one partial frame (32 of 64 lines) per frame


def test_simulated_adapter_write_bares_dimers() -> None:
    adapter = SimulatedAdapter(seed=2, preset="clean", pixels=PIXELS, size_nm=PIXELS * 0.1)
    frame = adapter.acquire()
    truth = frame.meta["truth"]
    target = truth.dimers_xy_px[np.flatnonzero(~truth.dimer_bare)[:1]]
    adapter.write(target)
    after = adapter.acquire().meta["truth"]
    assert after.dimer_bare.sum() >= truth.dimer_bare.sum() + 1
    with pytest.raises(ValueError):
        adapter.write(np.zeros((2, 3)))


def test_nanonis_path_to_daemon(daemon: Server) -> None:
    """Simulated STM behind the Nanonis TCP server -> NanonisAdapter -> daemon -> analysis."""
    stm = SimulatedSTM(seed=4, config=SimConfig.preset("clean"))
    with NanonisSimServer(stm).start() as nsrv:
        adapter = NanonisAdapter(nsrv.host, nsrv.port, max_frames=1)
        try:
            size_m = PIXELS * 0.1e-9
            adapter.client.frame_set(ScanFrame(0.0, 0.0, size_m, size_m, 0.0))
            adapter.client.buffer_set([CHANNEL_Z], PIXELS, PIXELS)
            with Client(daemon.endpoint, timeout_ms=60_000, retries=0) as client:
                (frame,) = list(adapter.frames())
                analysis = send_frame(client, frame, adapter.instrument_id)
        finally:
            adapter.close()
    assert analysis.image.height_px == PIXELS and analysis.image.pixel_size_nm == pytest.approx(0.1, rel=1e-5)
    assert len(analysis.atoms) > 20


def test_base_write_not_supported() -> None:
    from instrument_adapters.base import InstrumentAdapter

    class Empty(InstrumentAdapter):
        def frames(self) -> Iterator:
            return iter(())

    with pytest.raises(WriteNotSupported):
        Empty().write(np.zeros((1, 2)))


def test_demo_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stm_feedback.demo import run_demo

    # the demo machinery, whatever weights lie in models/ (the networks: test_server_write_verify.py)
    monkeypatch.setenv("STM_FEEDBACK_SERVER__ANALYZER", "stm_feedback.server:baseline_analyzer")
    summary = run_demo(tmp_path, n_frames=1, seed=3, pixels=64, preset="clean", write_verify=False)
    assert len(summary["frames"]) == 1 and summary["frames"][0]["atoms"] > 0
    for name in ("sim-stm-00001.png", "sim-stm-00001_overlay.png", "sim-stm-00001.json", "summary.txt"):
        assert (tmp_path / name).stat().st_size > 0
    assert "sim-stm-00001: 64x64 px" in (tmp_path / "summary.txt").read_text()
