"""CPU of the drift estimate's part left on the daemon's reply path (issue 6): ``server.measure_drift``
(the defect pairing, with the image part precomputed as the drift thread does) on consecutive 256 x 256
realistic simulator frames analysed by the shipped models, and ``drift.significant_count`` alone.

    PYTHONPATH=<tree> .venv/bin/python benchmarks/bench_drift_pairing.py --frames 6 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from stm_feedback.benchmark import simulated_frames
    from stm_feedback.config import Settings
    from stm_feedback.drift import significant_count
    from stm_feedback.server import load_analyzer, measure_drift, prepare_drift

    analyzer = load_analyzer(Settings())
    frames = simulated_frames(args.frames, 256, 2_000_000)
    analyses = [analyzer.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v) for f in frames]
    preps, prev = [], None
    for f in frames:
        preps.append(prepare_drift(f.image_nm.astype(np.float32), f.pixel_size_nm, prev))
        prev = preps[-1].binned
    per_frame = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(1, len(frames)):
            p, q = preps[i - 1], preps[i]
            measure_drift(analyses[i - 1], p.binned, analyses[i], q.binned, q.factor, q.candidates)
        per_frame.append((time.perf_counter() - t0) * 1e3 / (len(frames) - 1))
    t0 = time.perf_counter()
    for k in range(200):
        significant_count(0.05 * k, trials=1 + k)
    sc_ms = (time.perf_counter() - t0) * 1e3 / 200
    print(
        f"measure_drift ms per frame: median {statistics.median(per_frame):.3f} min {min(per_frame):.3f}; "
        f"significant_count ms per call {sc_ms:.3f}"
    )


if __name__ == "__main__":
    main()
