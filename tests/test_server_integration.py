"""The daemon with real components, nothing doubled: simulated STM frames analysed by the classical baseline
analyzer inside a real ``stm-feedback serve`` process on 127.0.0.1; drift checked against known shifts.
(Switch to the network Pipeline once it is on main: see ``ServerSettings.analyzer``.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from simulator.frame import SimConfig, simulate_frame
from stm_feedback.client import Client
from stm_feedback.config import ServerSettings
from stm_feedback.errors import ServerError
from stm_feedback.server import Server, baseline_analyzer

PIXEL_NM = 0.1


@pytest.fixture(scope="module")
def big_frame() -> np.ndarray:
    return simulate_frame(
        1_000_123, size_px=200, pixel_size_nm=PIXEL_NM, config=SimConfig.preset("realistic")
    ).image_nm


def test_real_serve_process_round_trip_and_sigterm(big_frame: np.ndarray) -> None:
    env = {**os.environ, "STM_FEEDBACK_SERVER__ANALYZER": "stm_feedback.server:baseline_analyzer"}
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        endpoint = re.search(r"serving on (\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        with Client(endpoint, timeout_ms=20_000, retries=0) as c:
            assert c.ready() and c.models()["versions"] == {"baseline": "classical-1"}
            frame = big_frame[:128, :128]
            a = c.analyze(frame.astype(">f4"), PIXEL_NM, instrument_id="sim", frame_id="s0", bias_v=-2.0)
            assert a.image.frame_id == "s0" and (a.image.height_px, a.image.width_px) == (128, 128)
            assert len(a.atoms) > 100 and a.terrace_labels.shape == (128, 128)
            assert c.query_sites("sim") == []  # the baseline plans no sites; the query itself works
            with pytest.raises(ServerError) as info:
                c.analyze(frame[:8], PIXEL_NM)
            assert info.value.code == "invalid_input"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drift_of_simulated_frames(big_frame: np.ndarray) -> None:
    """Successive crops of one simulated surface = a sample drifting under the tip by a known amount."""
    srv = Server(baseline_analyzer(None), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()
    try:
        with Client(srv.endpoint, timeout_ms=20_000, retries=0) as c:
            c.analyze(big_frame[40:168, 40:168], PIXEL_NM, instrument_id="sim")
            # the window moves 6 px left and 9 px up, so the surface appears to move +6 px in x, +9 px in y
            c.analyze(big_frame[31:159, 34:162], PIXEL_NM, instrument_id="sim")
            drift = c.last_reply["drift"]
    finally:
        srv.stop()
    assert drift["drift_px"] == pytest.approx([6.0, 9.0], abs=0.5), drift
    assert drift["drift_nm"] == pytest.approx([0.6, 0.9], abs=0.05)
