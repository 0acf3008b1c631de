"""Cost of recording one analysed frame into the defect library (what the daemon's recorder thread does per
frame): ``library.analysis_rows`` (row-aligned patches, features) and ``LibraryRecorder._write`` (the rows
again plus one SQLite transaction, WAL, synchronous=FULL) on N realistic 256 x 256 bench frames (seeds
2000000+, 0.1 nm/px, the shipped nets), into a temporary library. Prints medians: defects per frame, wall ms,
thread CPU ms (docs/performance.md, session 9).

    python benchmarks/recorder_cost.py [N]      # 30
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simulator.frame import SimConfig, simulate_frame
from stm_feedback.config import load_settings
from stm_feedback.library import DefectLibrary, LibraryRecorder, analysis_rows
from stm_feedback.pipeline import Pipeline


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    pipe = Pipeline(load_settings())
    frames = [simulate_frame(2_000_000 + i, 256, 0.1, SimConfig.preset("realistic")) for i in range(n)]
    analysed = [
        (f.image_nm, pipe.analyze(f.image_nm, 0.1, bias_v=f.bias_v, frame_id=f"f{i}"))
        for i, f in enumerate(frames)
    ]
    with tempfile.TemporaryDirectory() as d:
        rec = LibraryRecorder(DefectLibrary(Path(d) / "lib.sqlite"), close_library=True)
        rows_ms, write_ms, cpu_ms = [], [], []
        for img, a in analysed:
            t0, c0 = time.perf_counter(), time.thread_time()
            analysis_rows(img, a, rec.patch_size_px, rec.patch_pixel_size_nm)
            t1 = time.perf_counter()
            rec._write(img, a, "bench")  # the writer thread's work, here on this thread
            t2, c2 = time.perf_counter(), time.thread_time()
            rows_ms.append((t1 - t0) * 1e3)
            write_ms.append((t2 - t1) * 1e3)
            cpu_ms.append((c2 - c0) * 1e3)
        rec.close()
    med = lambda v: round(float(np.median(v)), 2)  # noqa: E731
    per_frame = med([len(a.defects) for _, a in analysed])
    print(
        f"{n} frames, defects per frame {per_frame}: analysis_rows {med(rows_ms)} ms, "
        f"_write (rows + transaction) {med(write_ms)} ms; thread CPU of both {med(cpu_ms)} ms"
    )


if __name__ == "__main__":
    main()
