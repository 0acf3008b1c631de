"""A process killed with SIGKILL while writing leaves a sound library with every committed row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stm_feedback.library import DefectLibrary

WRITER = r"""
import sys
import numpy as np
from stm_feedback.classify import FEATURE_NAMES
from stm_feedback.library import DefectLibrary

lib = DefectLibrary(sys.argv[1])
rng = np.random.default_rng(0)
n = 50  # defects per frame: one transaction each
i = 0
while True:
    if i % 2:  # the frame and its defects in one transaction
        lib.add_frame_with_defects(f"frame-{i}", 0.1, rng.uniform(0, 256, (n, 2)), ["depression"] * n,
                                   rng.normal(size=(n, len(FEATURE_NAMES))),
                                   patches=rng.normal(size=(n, 16, 16)).astype(np.float32))
    else:  # two transactions: a crash in between leaves a frame without defects, never a partial set
        fid = lib.add_frame(f"frame-{i}", 0.1)
        lib.add_defects(fid, rng.uniform(0, 256, (n, 2)), ["depression"] * n,
                        rng.normal(size=(n, len(FEATURE_NAMES))),
                        rng.normal(size=(n, 16, 16)).astype(np.float32))
    print(i, flush=True)  # frame i and its defects are committed
    i += 1
"""


def test_sigkill_mid_write_keeps_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "lib.sqlite"
    DefectLibrary(path).close()  # schema exists before the race
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    committed = -1
    try:
        assert proc.stdout is not None
        while committed < 20:  # let it commit a few frames, then kill it at an arbitrary point
            line = proc.stdout.readline()
            assert line, "writer died on its own"
            committed = int(line)
        time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with DefectLibrary(path) as lib:
        assert lib.integrity_check() == "ok"
        frames = lib.frames()
        # every frame reported committed is there with all its defects; later ones may be too (committed
        # after the last line we read, the kill lands at an arbitrary point)
        assert len(frames) >= committed + 1
        counts = [len(lib.defects(frame_id=f["id"])) for f in frames]
        assert all(c == 50 for c in counts[: committed + 1])
        # never a partial set of one frame's defects; a frame without defects can only be the last one,
        # written by add_frame just before the kill (add_frame_with_defects frames are always complete)
        assert all(c == 50 for c in counts[:-1]) and counts[-1] in (0, 50)
        # the library stays writable after the crash
        fid = lib.add_frame("after-crash", 0.1)
        assert fid > frames[-1]["id"]
