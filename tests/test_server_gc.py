"""The daemon's garbage-collection policy (issue 6): automatic collection off while serving, one full
collection after a reply when idle or every ``gc_every_frames`` frames, restored when the server stops."""

from __future__ import annotations

import gc
import threading

import numpy as np
from test_server_doubles import DeterministicTestAnalyzer

from stm_feedback.client import Client
from stm_feedback.config import ServerSettings
from stm_feedback.server import Server


def _collections_during(fn) -> list[int]:  # noqa: ANN001 - a callable
    gens: list[int] = []

    def cb(phase: str, info: dict) -> None:
        if phase == "stop":
            gens.append(info["generation"])

    gc.callbacks.append(cb)
    try:
        fn()
    finally:
        gc.callbacks.remove(cb)
    return gens


def test_collects_between_frames_and_restores_automatic_gc() -> None:
    assert gc.isenabled()
    srv = Server(
        DeterministicTestAnalyzer(), ServerSettings(warmup_px=0, gc_every_frames=2), bind="tcp://127.0.0.1:*"
    ).start()
    try:
        assert not gc.isenabled()  # no automatic collection lands inside an analysis
        assert gc.get_freeze_count() > 0  # the heap is frozen even without a warm-up
        img = np.zeros((32, 32), np.float32)
        with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
            c.analyze(img, 0.1, bias_v=-2.0)  # warm the client and server paths

            def frames() -> None:
                for _ in range(6):
                    c.analyze(img, 0.1, bias_v=-2.0)
                    assert c.last_reply["ok"] is True

            gens = _collections_during(frames)
        # full collections only: after a reply when the queue is empty (racy: the next request may be
        # queued already) and at the latest every 2nd frame, so >= 2 before the 6th reply; none automatic
        assert gens.count(2) >= 2 and set(gens) == {2}
    finally:
        srv.stop()
    assert gc.isenabled()


def test_zero_keeps_automatic_gc() -> None:
    srv = Server(
        DeterministicTestAnalyzer(), ServerSettings(warmup_px=0, gc_every_frames=0), bind="tcp://127.0.0.1:*"
    ).start()
    try:
        assert gc.isenabled()
    finally:
        srv.stop()
    assert gc.isenabled()


def test_two_servers_restore_only_after_the_last_stops() -> None:
    a = Server(DeterministicTestAnalyzer(), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()
    b = Server(DeterministicTestAnalyzer(), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()
    a.stop()
    assert not gc.isenabled()
    b.stop()
    assert gc.isenabled()


def test_collections_run_after_the_reply_is_sent_on_the_io_thread() -> None:
    """The collection holds the GIL: in the worker it delayed the I/O thread's forwarding of the reply it
    followed. It now runs on the I/O thread, after the ROUTER send (stats count the reply before it)."""
    srv = Server(
        DeterministicTestAnalyzer(), ServerSettings(warmup_px=0, gc_every_frames=1), bind="tcp://127.0.0.1:*"
    ).start()
    seen: list[tuple[str, int]] = []  # (thread, replies counted) at the start of each collection

    def cb(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append((threading.current_thread().name, srv.stats.replies))

    try:
        img = np.zeros((32, 32), np.float32)
        with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
            c.analyze(img, 0.1, bias_v=-2.0)
            gc.callbacks.append(cb)
            try:
                replies = [srv.stats.replies]
                for _ in range(4):
                    c.analyze(img, 0.1, bias_v=-2.0)
                    replies.append(srv.stats.replies)
                c.health()  # the I/O thread answers this after it finished the last collection
            finally:
                gc.callbacks.remove(cb)
    finally:
        srv.stop()
    assert len(seen) >= 4  # gc_every_frames=1: one after each analyze reply
    assert {name for name, _ in seen} == {"stm-feedback-io"}
    # each collection starts after the reply it follows was counted (and sent): never between two frames'
    # reply counts from the worker side, i.e. every recorded count is one the client saw after a reply
    assert {n for _, n in seen} <= set(replies)


def test_idle_event_is_clear_while_an_analysis_runs() -> None:
    """``Server.idle`` (the defect-library writer waits for it) is cleared while a frame is analysed and set
    again once its reply is sent and nothing else is queued."""
    analyzer = DeterministicTestAnalyzer(delay_s=0.3)
    srv = Server(analyzer, ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*").start()
    try:
        assert srv.idle.is_set()
        seen_busy = threading.Event()

        def watch() -> None:
            for _ in range(200):
                if not srv.idle.is_set():
                    seen_busy.set()
                    return
                threading.Event().wait(0.005)

        t = threading.Thread(target=watch)
        t.start()
        with Client(srv.endpoint, timeout_ms=5000, retries=0) as c:
            c.analyze(np.zeros((32, 32), np.float32), 0.1, bias_v=-2.0)
            assert c.last_reply["ok"] is True
        t.join()
        assert seen_busy.is_set() and srv.idle.wait(2.0)
    finally:
        srv.stop()
    assert srv.idle.is_set()
