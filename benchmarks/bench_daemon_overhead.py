"""Where the daemon's round trip goes beyond the analysis (issue 6, session 4).

Two parts, both on 256 x 256 realistic simulator frames (seeds 2 000 000+), with the code of the tree on
PYTHONPATH:

``pieces``: the reply path's pieces timed in this process on real analyses (the shipped models run once per
frame): the reply payload (``analysis_json`` on main, ``pack_analysis`` where it exists), ``encode_reply``
(msgpack of the header), the client's ``parse_reply`` (msgpack decode + array specs) and
``client._analysis`` (the ``Analysis`` the caller gets), and the cost of reading ``.atoms`` / ``.dimers``
afterwards. Median and min over ``--repeats`` per frame, then the median over frames (ms); reply size.

``roundtrip``: ``stm-feedback serve`` as a subprocess on 127.0.0.1 (as ``benchmark.bench_daemon``) and a
client loop that times, per request: building the request, ``send_multipart``, waiting for the reply (send
done -> poll returns), ``recv_multipart``, ``parse_reply``, ``client._analysis``; the server's own
``timings_ms`` come with the reply. ``gap`` = (send start -> poll returns) - server ``total``: transport, the
I/O thread's hand-offs and whatever holds the server's GIL between the worker's push and the ROUTER send.
Also the plain ``Client.analyze`` wall time (what ``stm-feedback bench`` reports), alternating with the
instrumented loop. Extra ``STM_FEEDBACK_*`` settings for the daemon with ``--env KEY=VALUE``.

    PYTHONPATH=<tree> .venv/bin/python benchmarks/bench_daemon_overhead.py pieces --frames 5 --repeats 20
    PYTHONPATH=<tree> .venv/bin/python benchmarks/bench_daemon_overhead.py roundtrip --n 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def _p(a: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(a, [50, 95])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "n": len(a)}


def _timed(fn: Any, repeats: int) -> tuple[float, float, Any]:
    out, ms = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms), out


def _frame_pieces(analysis: Any, bias_v: float, repeats: int) -> tuple[dict[str, tuple], int]:
    """The reply-path pieces of one analysis: {name: (median ms, min ms, last result)}, header bytes."""
    import stm_feedback.client as client_mod
    import stm_feedback.server as server_mod
    from stm_feedback.protocol import parse_reply

    # the tree's own reply payload: pack_analysis (msgpack bytes, this branch) or analysis_json (main)
    payload_analysis = getattr(server_mod, "pack_analysis", server_mod.analysis_json)
    meta = {"pixel_size_nm": 0.1, "scan_angle_deg": 0.0, "bias_v": bias_v, "setpoint_pa": None}
    drift = {"frames": 1, "drift_px": None}

    def encode() -> list[Any]:
        payload = {"analysis": payload_analysis(analysis), "instrument_id": "s", "request_meta": meta}
        payload["drift"] = drift
        return server_mod.encode_reply("id-1", "analyze", payload, None, lambda: {"total": 1.0})

    res = {
        "server payload (analysis_json | pack_analysis)": _timed(lambda: payload_analysis(analysis), repeats),
        "server payload + encode_reply": _timed(encode, repeats),
    }
    body = [bytes(b) for b in res["server payload + encode_reply"][2]]
    res["client parse_reply"] = _timed(lambda: parse_reply(body), repeats)
    header = res["client parse_reply"][2][0]
    res["client _analysis"] = _timed(lambda: client_mod._analysis(header, {}), repeats)

    def decode_and_read() -> Any:
        a = client_mod._analysis(parse_reply(body)[0], {})
        return len(a.atoms) + len(a.dimers)

    res["client decode + read .atoms/.dimers"] = _timed(decode_and_read, repeats)
    return res, len(body[0])


def pieces(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    from stm_feedback.benchmark import simulated_frames
    from stm_feedback.config import Settings
    from stm_feedback.server import freeze_heap, load_analyzer

    analyzer = load_analyzer(Settings())
    frames = simulated_frames(args.frames, 256, 2_000_000, preset="realistic")
    analyzer.analyze(frames[0].image_nm, 0.1, bias_v=frames[0].bias_v)  # warm-up
    freeze_heap()
    rows: dict[str, list[tuple[float, float]]] = {}
    sizes = []
    for f in frames:
        analysis = analyzer.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v, frame_id="x")
        gc.collect()
        gc.disable()  # the daemon runs without automatic collection (collects between frames)
        try:
            res, size = _frame_pieces(analysis, f.bias_v, args.repeats)
        finally:
            gc.enable()
        sizes.append(size)
        for k, (med, mn, _) in res.items():
            rows.setdefault(k, []).append((med, mn))
        counts = (len(analysis.atoms), len(analysis.dimers), len(analysis.defects), len(analysis.sites))
        print(f"frame: atoms/dimers/defects/sites {counts}, reply header {size} B", file=sys.stderr)
    out: dict[str, Any] = {
        k: {
            "median_ms": round(statistics.median(m for m, _ in v), 3),
            "min_ms": round(min(x for _, x in v), 3),
        }
        for k, v in rows.items()
    }
    out["reply_header_bytes_median"] = statistics.median(sizes)
    return out


def roundtrip(args: argparse.Namespace) -> dict[str, Any]:
    import zmq

    import stm_feedback.client as client_mod
    from stm_feedback.benchmark import (
        _wait_ready,
        free_tcp_port,
        load_average,
        simulated_frames,
        stop_daemon,
    )
    from stm_feedback.client import Client
    from stm_feedback.protocol import build_request, parse_reply

    frames = simulated_frames(args.frames, 256, 2_000_000, preset="realistic")
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    env = dict(os.environ)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-daemon-overhead-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", endpoint]
    t_spawn = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(endpoint, timeout_ms=500, retries=0)
    samples: dict[str, list[float]] = {}
    try:
        from pathlib import Path

        _wait_ready(proc, client, t_spawn, 300.0, Path(log.name))
        client.timeout_ms = 60_000
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        load0 = load_average()
        for i in range(args.warmup + args.n):
            f = frames[i % len(frames)]
            # 1) plain Client.analyze: what `stm-feedback bench` measures
            t0 = time.perf_counter()
            client.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v, with_maps=False)
            wall_client = (time.perf_counter() - t0) * 1e3
            time.sleep(args.pause_ms / 1e3)
            # 2) the same request, each client-side step timed
            t0 = time.perf_counter()
            req = build_request(
                "analyze",
                f"r{i}",
                {"image": np.asarray(f.image_nm)},
                pixel_size_nm=float(f.pixel_size_nm),
                bias_v=f.bias_v,
                with_maps=False,
            )
            t1 = time.perf_counter()
            sock.send_multipart([b"", *req], copy=args.copy_request)
            t2 = time.perf_counter()
            sock.poll(60_000, zmq.POLLIN)
            t3 = time.perf_counter()
            msg = sock.recv_multipart()
            t4 = time.perf_counter()
            header, arrays = parse_reply(msg[1:])
            t5 = time.perf_counter()
            client_mod._analysis(header, arrays)
            t6 = time.perf_counter()
            time.sleep(args.pause_ms / 1e3)
            if i < args.warmup:
                continue
            tm = header["timings_ms"]
            rec = {
                "Client.analyze wall": wall_client,
                "instrumented wall": (t6 - t0) * 1e3,
                "client build_request": (t1 - t0) * 1e3,
                "client send_multipart": (t2 - t1) * 1e3,
                "client wait (send done -> poll returns)": (t3 - t2) * 1e3,
                "client recv_multipart": (t4 - t3) * 1e3,
                "client parse_reply (msgpack)": (t5 - t4) * 1e3,
                "client _analysis": (t6 - t5) * 1e3,
                "gap: send start -> poll returns, minus server total": (t3 - t1) * 1e3 - tm["total"],
                "wall minus server analyze": (t6 - t0) * 1e3 - tm["analyze"],
            }
            for k in ("decode", "queue", "analyze", "state", "encode", "total"):
                rec[f"server {k}"] = tm[k]
            for k, v in rec.items():
                samples.setdefault(k, []).append(v)
        sock.close(0)
        return {
            "load_before": load0,
            "load_after": load_average(),
            "env": args.env,
            "stages_ms": {k: _p(v) for k, v in samples.items()},
        }
    finally:
        stop_daemon(proc, client, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pieces")
    a.add_argument("--frames", type=int, default=5)
    a.add_argument("--repeats", type=int, default=20)
    b = sub.add_parser("roundtrip")
    b.add_argument("--frames", type=int, default=10, help="distinct simulator frames, cycled")
    b.add_argument("--n", type=int, default=100, help="timed requests of each kind")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--pause-ms", type=float, default=20.0, help="idle time after each reply")
    b.add_argument("--env", action="append", default=[], help="STM_FEEDBACK_...=value for the daemon")
    b.add_argument(
        "--copy-request",
        action="store_true",
        help="instrumented loop: send the request frames with copy=True (Client uses copy=False)",
    )
    for p in (a, b):
        p.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    out = pieces(args) if args.cmd == "pieces" else roundtrip(args)
    out["tree"] = os.path.dirname(os.path.dirname(os.path.abspath(__import__("stm_feedback").__file__)))
    out["utc"] = time.strftime("%H:%M:%S", time.gmtime())
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
