"""``stm-feedback serve`` as a real subprocess: SIGTERM finishes in-flight work, then exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import zmq

from stm_feedback.protocol import build_request, parse_reply

TESTS_DIR = Path(__file__).resolve().parent


def _start_serve(extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "STM_FEEDBACK_SERVER__ANALYZER": "test_server_doubles:make_analyzer",
        "STM_FEEDBACK_SERVER__WARMUP_PX": "16",
        **extra_env,
    }
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "stm-feedback serving on tcp://127.0.0.1:PORT"
    match = re.search(r"serving on (\S+)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.communicate(timeout=10)}")
    return proc, match.group(1)


def test_sigterm_drains_in_flight_work_and_exits_0() -> None:
    proc, endpoint = _start_serve({"STM_TEST_ANALYZER_DELAY_S": "0.5"})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
        sock.send_multipart([b"", *build_request("analyze", "inflight", {"image": image}, pixel_size_nm=0.1)])
        sock.send_multipart([b"", *build_request("health", "h")])
        # same connection, so once "h" is answered the analyze request has been accepted
        assert sock.poll(10_000)
        first, _ = parse_reply(sock.recv_multipart()[1:])
        assert first["id"] == "h" and first["ok"]
        proc.send_signal(signal.SIGTERM)
        assert sock.poll(10_000), "the accepted request was lost on shutdown"
        reply, arrays = parse_reply(sock.recv_multipart()[1:])
        assert reply["id"] == "inflight" and reply["ok"] and arrays["safe_mask"].shape == (32, 32)
        assert proc.wait(timeout=20) == 0
    finally:
        sock.close(0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_idle_exit_0() -> None:
    proc, endpoint = _start_serve({})
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
