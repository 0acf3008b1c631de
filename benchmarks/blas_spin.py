"""Do the networks slow down after the post-processing's BLAS products? (docs/performance.md, session 10)

    python benchmarks/blas_spin.py [N]                           # as configured (models.blas_threads = 1)
    STM_FEEDBACK_MODELS__BLAS_THREADS=0 python benchmarks/blas_spin.py [N]   # OpenBLAS's default threads

N bench-like realistic frames (seeds 2 000 000+, 40). Two rounds of: ``Pipeline.analyze`` with the scan-line
jitter correction on and off, each frame followed by a bare ``runner.predict`` of the same frame. Prints the
p50 of both. With OpenBLAS's idle workers spinning after the jitter estimate's matrix products, the predict
that follows an analysis with the correction on was slower than after one with it off.
"""

import dataclasses
import sys
import time

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline

on = Pipeline(load_settings())
off = Pipeline(
    on.settings, runner=on.runner, params=dataclasses.replace(on.params, line_jitter_correction=False)
)
frames = list(simulated_frames("realistic", 2_000_000, int(sys.argv[1]) if len(sys.argv) > 1 else 40))
for pipe in (on, off):  # warm-up
    for f in frames[:5]:
        pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
for rnd in range(2):
    for name, pipe in (("correction on", on), ("correction off", off)):
        t_an, t_pr = [], []
        for f in frames:
            t0 = time.perf_counter()
            pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
            t1 = time.perf_counter()
            on.runner.predict(f.image_nm, f.pixel_size_nm, f.bias_v)
            t_an.append(t1 - t0)
            t_pr.append(time.perf_counter() - t1)
        print(
            f"round {rnd + 1}, {name}: analyze p50 {np.median(t_an) * 1e3:.1f} ms, the predict after it p50 "
            f"{np.median(t_pr) * 1e3:.1f} ms",
            flush=True,
        )
