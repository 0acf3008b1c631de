"""Garbage-collection pauses in the daemon, and where they land (issue 6).

Runs the daemon in this process (``server.Server`` with the real pipeline and the shipped models), sends
``--frames`` 256 px realistic simulator frames (seeds 2 000 000+) with a short idle gap after each reply (an
instrument frame takes seconds), and records every collection with ``gc.callbacks``: its generation, its
wall time, and whether it ran inside ``analyze``. Prints the server's per-frame timings (p50 / p95 / p99 /
max ms) and the collections. ``gc_every_frames`` is ``ServerSettings.gc_every_frames`` (0 = automatic
collection, as before speed4). A/B: run both values alternately.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_daemon_gc.py 0 100
    PYTHONPATH=. .venv/bin/python benchmarks/bench_daemon_gc.py 8 100
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import numpy as np


def _q(a: list[float]) -> str:
    p50, p95, p99, mx = np.percentile(a, [50, 95, 99, 100])
    return f"p50 {p50:.1f} p95 {p95:.1f} p99 {p99:.1f} max {mx:.1f}"


def main() -> None:
    from stm_feedback.benchmark import simulated_frames
    from stm_feedback.client import Client
    from stm_feedback.config import ServerSettings, Settings
    from stm_feedback.server import Server, load_analyzer

    every, n = int(sys.argv[1]), int(sys.argv[2])
    pauses: list[tuple[int, float, bool, bool]] = []  # (generation, wall ms, inside analyze, inside a job)
    state = {"t0": 0.0, "inside": False, "job": False}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            state["t0"] = time.perf_counter()
        else:
            ms = (time.perf_counter() - state["t0"]) * 1e3
            pauses.append((info["generation"], ms, state["inside"], state["job"]))

    gc.callbacks.append(on_gc)
    analyzer = load_analyzer(Settings())
    analyze = analyzer.analyze

    def flagged(*args: object, **kwargs: object) -> object:
        state["inside"] = True
        try:
            return analyze(*args, **kwargs)
        finally:
            state["inside"] = False

    analyzer.analyze = flagged
    srv = Server(analyzer, ServerSettings(warmup_px=128, gc_every_frames=every), bind="tcp://127.0.0.1:*")
    run_job = srv._run_job

    def job_flagged(job: object) -> object:  # decode done -> reply frames built (the reply path)
        state["job"] = True
        try:
            return run_job(job)
        finally:
            state["job"] = False

    srv._run_job = job_flagged
    srv.start()
    frames = list(simulated_frames(30, 256, 2_000_000, preset="realistic"))
    timings: dict[str, list[float]] = {"round trip": [], "total": [], "analyze": [], "state": []}
    warmup = 5
    with Client(srv.endpoint, timeout_ms=60_000, retries=0) as client:
        for i in range(n + warmup):
            f = frames[i % len(frames)]
            if i == warmup:
                pauses.clear()
            t0 = time.perf_counter()
            client.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v, with_maps=False)
            wall = (time.perf_counter() - t0) * 1e3
            tm = client.last_reply["timings_ms"]
            if i >= warmup:
                timings["round trip"].append(wall)
                for k in ("total", "analyze", "state"):
                    timings[k].append(tm[k])
            time.sleep(0.02)
    srv.stop()
    inside = [p[1] for p in pauses if p[2]] or [0.0]
    in_job = [p[1] for p in pauses if p[3]] or [0.0]
    print(json.dumps({"gc_every_frames": every, "frames": n, "load": os.getloadavg()[0]}))
    for k, v in timings.items():
        print(f" {k:10s} {_q(v)}")
    print(
        f" collections {len(pauses)} (generation 2: {sum(p[0] == 2 for p in pauses)}), inside analyze "
        f"{sum(p[2] for p in pauses)}: sum {sum(inside):.1f} ms, max {max(inside):.1f} ms; inside the job "
        f"(analyze + state + encode) {sum(p[3] for p in pauses)}: sum {sum(in_job):.1f} ms, max "
        f"{max(in_job):.1f} ms; all collections "
        f"sum {sum(p[1] for p in pauses):.1f} ms, max {max([p[1] for p in pauses] or [0.0]):.1f} ms"
    )


if __name__ == "__main__":
    main()
