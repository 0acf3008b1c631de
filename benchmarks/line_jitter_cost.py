"""Wall and CPU time of the scan-line jitter estimate per frame (docs/performance.md, session 10).

    python benchmarks/line_jitter_cost.py [N]        # N bench-like realistic frames (seeds 2 000 000+), 20
    OPENBLAS_NUM_THREADS=1 python benchmarks/line_jitter_cost.py [N]      # BLAS on one thread

The frames' maps and first-pass analyses are computed once; the estimate then runs 3 times per frame, with the
lattice fit's wave vectors as the pipeline passes them. Prints
ms per frame (wall, process CPU) and the share of frames whose gain passes the gate (they get a second pass).
"""

import sys
import time

import numpy as np

from stm_feedback import jitter
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline, _atom_columns

pipe = Pipeline(load_settings())
gate = pipe.params.line_jitter_min_gain
args = []
for f in simulated_frames("realistic", 2_000_000, int(sys.argv[1]) if len(sys.argv) > 1 else 20):
    m = pipe.runner.predict(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    a = pipe.analyze_maps(f.image_nm, m, f.pixel_size_nm, bias_v=f.bias_v)
    xy, ter, _ = _atom_columns(a)
    angles = {t.id: t.row_angle_deg for t in a.terraces}
    args.append((m.image_norm, a.terrace_labels, xy, ter, angles, f.pixel_size_nm, a.terrace_wavevectors))
gains = [
    jitter.estimate_line_jitter(*x[:6], stop_below_gain=gate, wavevectors_per_nm=x[6]).gain for x in args
]
w, c = time.perf_counter(), time.process_time()
for _ in range(3):
    for x in args:
        jitter.estimate_line_jitter(*x[:6], stop_below_gain=gate, wavevectors_per_nm=x[6])
k = 3 * len(args)
wall_ms = (time.perf_counter() - w) / k * 1e3
cpu_ms = (time.process_time() - c) / k * 1e3
print(f"wall {wall_ms:.2f} ms, process CPU {cpu_ms:.2f} ms per frame")
print(f"gain >= {gate}: {np.mean(np.array(gains) >= gate):.2f} of {len(args)} frames")
