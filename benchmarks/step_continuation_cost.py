"""Wall time of ``planner.step_continuations`` on the planning step masks of realistic frames.

    python benchmarks/step_continuation_cost.py N [PRESET] [PIXEL_SIZE_NM]

For N simulated frames (seeds 700000+), runs the networks once, builds the planner's step mask as the
pipeline does (segmentation step pixels | NN-0 step probability >= ``step_prob_plan``) and times the
continuation (median of 20 calls per frame). Prints the median and max over frames (ms) and how many
frames got a continuation.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from simulator.config import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner import step_continuations


def main() -> None:
    n = int(sys.argv[1])
    cfg = SimConfig.preset(sys.argv[2] if len(sys.argv) > 2 else "realistic")
    if len(sys.argv) > 3:
        cfg = dataclasses.replace(cfg, pixel_size_nm=(float(sys.argv[3]), float(sys.argv[3])))
    st = load_settings()
    pipe = Pipeline(st)
    times, hits = [], 0
    for f in simulated_frames(cfg, 700000, n):
        a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
        m = pipe.runner.predict(f.image_nm, f.pixel_size_nm, f.bias_v)
        step = (a.terrace_labels < 0) | (m.step_prob >= st.planner.step_prob_plan)
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            c = step_continuations(step, f.pixel_size_nm, st.planner.step_continuation_min_nm)
            ts.append(time.perf_counter() - t0)
        times.append(np.median(ts) * 1e3)
        hits += bool(c.any())
    print(f"{n} frames: median {np.median(times):.3f} ms, max {np.max(times):.3f} ms; continued on {hits}")


if __name__ == "__main__":
    main()
