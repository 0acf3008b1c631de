"""Write-then-verify (issue 5 item 6) through the daemon: simulated STM -> adapter -> daemon -> query_sites ->
the simulated STM bares the chosen 3 dimers -> rescan -> the daemon finds a new bright patch there (within one
dimer pitch after its drift estimate) and, in the simulator's truth, no must-avoid defect was touched.

While trained weights are missing the daemon's analyzer is the real Pipeline on perfect maps from the
simulator's truth (``test_server_doubles.SimulatorOracleRunner``): this proves the loop, query_sites and the
drift handling. With weights in models/, the same loop runs against a real ``stm-feedback serve`` process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_server_doubles import oracle_pipeline

from instrument_adapters.demo_write_verify import write_then_verify
from instrument_adapters.simulated import SimulatedAdapter
from stm_feedback.client import Client
from stm_feedback.config import ServerSettings
from stm_feedback.physics import SURFACE_LATTICE_NM
from stm_feedback.schema import Site
from stm_feedback.server import Server

PIXELS = 256  # 25.6 nm at 0.1 nm/px: enough defects and steps for the drift estimate


def _oracle_daemon(adapter: SimulatedAdapter) -> Server:
    return Server(oracle_pipeline(adapter.stm), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()


@pytest.mark.parametrize("seed", [1, 3])
def test_write_then_verify_with_oracle_pipeline(seed: int) -> None:
    adapter = SimulatedAdapter(seed=seed, preset="realistic", pixels=PIXELS, size_nm=PIXELS * 0.1)
    srv = _oracle_daemon(adapter)
    try:
        with Client(srv.endpoint, timeout_ms=60_000, retries=0) as client:
            res = write_then_verify(adapter, client)
    finally:
        srv.stop()
    print(res.summary())  # shown with pytest -s (the numbers in docs/instruments.md)
    assert res.ok, res.summary()
    assert res.bared_count == 3 and res.touched_must_avoid == []
    assert res.drift_method in ("image", "image+defects", "defects")
    assert res.found_distance_nm <= SURFACE_LATTICE_NM
    # the truth agrees: a 3-dimer litho patch within one dimer pitch of where the daemon's drift puts the site
    assert res.truth_patch_dimers == 3 and res.truth_distance_nm <= SURFACE_LATTICE_NM
    assert 1.5 <= res.found_area_cells <= 8.0  # a patch of ~3 cells (1 cell = 0.295 nm^2), not a speck


def test_write_then_verify_detects_failures() -> None:
    """The checker can fail: a write that bares nothing, and a 'site' placed on a must-avoid defect."""
    adapter = SimulatedAdapter(seed=1, preset="realistic", pixels=PIXELS, size_nm=PIXELS * 0.1)
    srv = _oracle_daemon(adapter)
    try:
        with Client(srv.endpoint, timeout_ms=60_000, retries=0) as client:
            real_depassivate = adapter.stm.depassivate_px
            adapter.stm.depassivate_px = lambda xy: np.zeros((0, 2))  # the tip pulses do nothing
            res = write_then_verify(adapter, client)
            assert not res.ok and res.bared_count == 0 and "bared" in res.reason
            adapter.stm.depassivate_px = real_depassivate
            picked: list[Any] = []

            def on_must_avoid_defect(frame: Any, analysis: Any) -> Site:
                bad = next(
                    d for d in frame.meta["truth"].defects if d.must_avoid and 20 < d.x_px < PIXELS - 20
                )
                picked.append(bad)
                dimers = [[bad.x_px + k * 3.84, bad.y_px] for k in (-1, 0, 1)]
                return Site(bad.x_px, bad.y_px, dimers, 0, 0.0)

            res = write_then_verify(adapter, client, choose_site=on_must_avoid_defect)
    finally:
        srv.stop()
    assert not res.ok and picked[0].cls in res.touched_must_avoid, res.summary()
    assert "must-avoid" in res.reason


# --------------------------------------------------------------------------- the real networks, when present


def _weights_missing() -> str | None:
    """None when the trained pipeline can be built here, else why not."""
    try:
        from stm_feedback.config import load_settings
        from stm_feedback.server import load_analyzer

        load_analyzer(load_settings())
    except Exception as exc:
        return f"trained pipeline unavailable (weights in models/?): {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def serve_process() -> Iterator[tuple[subprocess.Popen, str]]:
    """A real ``stm-feedback serve`` with the default analyzer (the trained Pipeline) on 127.0.0.1."""
    why = _weights_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "STM_FEEDBACK_SERVER__ANALYZER"}
    env["STM_FEEDBACK_SERVER__WARMUP_PX"] = "64"
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"serving on (\S+)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.communicate(timeout=10)}")
    try:
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_real_serve_with_networks_health_models_stats_sites(serve_process: Any) -> None:
    from simulator.frame import SimConfig, simulate_frame

    _, endpoint = serve_process
    frame = simulate_frame(1_000_001, size_px=PIXELS, pixel_size_nm=0.1, config=SimConfig.preset("clean"))
    with Client(endpoint, timeout_ms=120_000, retries=0) as c:
        assert c.health()["status"] == "ok" and c.ready()
        models = c.models()
        assert models["backend"] not in ("classical", "unknown") and models["versions"], models
        a = c.analyze(frame.image_nm, 0.1, bias_v=frame.bias_v, instrument_id="nets", frame_id="f1")
        # the daemon's contract with the networks behind it (their accuracy: stm-feedback evaluate)
        assert a.image.frame_id == "f1" and a.terrace_labels.shape == a.safe_mask.shape == (PIXELS, PIXELS)
        assert len(a.atoms) > 0 and a.models == models["versions"]
        assert "pipeline.networks" in c.last_reply["timings_ms"]
        sites = c.query_sites("nets", limit=5)
        assert len(sites) == min(5, len(a.sites)) and all(s in a.sites for s in sites)
        stats = c.stats()
        assert stats["requests_by_type"]["analyze"] >= 1 and "analyze" in stats["latency_ms"]


def test_frame_without_bias_gets_no_sites_through_the_daemon(serve_process: Any) -> None:
    """Contract through the wire: a frame sent without bias_v comes back with its polarity estimated, a note,
    and no sites, and query_sites has nothing for that instrument (planner.withhold_on_unknown_polarity)."""
    from simulator.frame import SimConfig, simulate_frame

    _, endpoint = serve_process
    frame = simulate_frame(1_000_001, size_px=PIXELS, pixel_size_nm=0.1, config=SimConfig.preset("clean"))
    with Client(endpoint, timeout_ms=120_000, retries=0) as c:
        a = c.analyze(frame.image_nm, 0.1, instrument_id="nets-nobias", frame_id="nb1")
        assert a.quality.polarity_source == "estimated" and a.quality.polarity in ("filled", "empty")
        assert a.sites == [] and not a.safe_mask.any() and len(a.atoms) > 0
        assert any("no bias given" in n for n in a.quality.notes)
        assert c.query_sites("nets-nobias") == []


def test_write_then_verify_with_networks_in_serve_process(serve_process: Any) -> None:
    _, endpoint = serve_process
    adapter = SimulatedAdapter(seed=1, preset="realistic", pixels=PIXELS, size_nm=PIXELS * 0.1)
    adapter.instrument_id = "nets-wv"
    with Client(endpoint, timeout_ms=120_000, retries=0) as client:
        res = write_then_verify(adapter, client)
        atoms = len(client.last_reply.get("analysis", {}).get("atoms", []))
    # no site = the networks found too little lattice to plan on (their accuracy: stm-feedback evaluate)
    assert res.site_center_px, f"the networks proposed no site ({atoms} atoms found in the frame)"
    assert res.ok, res.summary()
    assert res.bared_count == 3 and res.touched_must_avoid == []
    assert res.truth_distance_nm <= SURFACE_LATTICE_NM


def test_serve_process_stops_gracefully(serve_process: Any) -> None:
    proc, endpoint = serve_process
    with Client(endpoint, timeout_ms=10_000, retries=0) as c:
        assert c.health()["status"] == "ok"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
