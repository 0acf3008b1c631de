"""Post-processing steps 1-4 (terraces, atoms, lattice, dimers) on a validation suite: CPU time per step
and the row-angle errors with and without ``Terrace.row_angle_undistorted_deg``.

``python benchmarks/geometry_steps.py --suite realistic --repeats 3``

The networks run once per frame; ``postprocess_maps`` then runs ``--repeats`` times and each step keeps its
minimum CPU time (``time.process_time``: on a shared machine wall-clock times mostly measure the other
jobs). Prints p50 / p95 over the frames per step (ms) and the suite's row-angle error median / mean / p90
(deg) scored as ``stm-feedback evaluate`` does, then once more with the undistorted angle removed (image-frame
rows only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings
from stm_feedback.evaluation import aggregate, suite_frames
from stm_feedback.metrics import score_frame

STEPS = ("terraces", "atoms", "lattice", "dimers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="realistic", choices=("clean", "realistic", "hard"))
    ap.add_argument("--n", type=int, default=None, help="frames (default: the suite's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    pipe = pl.Pipeline(load_settings())
    best: list[list[float]] = []
    scores, scores_img = [], []
    perf = time.perf_counter
    for fr in suite_frames(args.suite, args.n):
        maps = pipe.runner.predict(fr.image_nm, fr.pixel_size_nm, bias_v=fr.bias_v)
        row = [np.inf] * len(STEPS)
        pl.time.perf_counter = time.process_time  # the pipeline's stage timer reads CPU time here
        try:
            for _ in range(args.repeats):
                a = pipe.analyze_maps(fr.image_nm, maps, fr.pixel_size_nm, fr.bias_v)
                row = [min(r, a.timings_ms[k]) for r, k in zip(row, STEPS, strict=True)]
        finally:
            pl.time.perf_counter = perf
        best.append(row)
        scores.append(score_frame(fr.truth, a))
        a.terraces = [dataclasses.replace(t, row_angle_undistorted_deg=None) for t in a.terraces]
        scores_img.append(score_frame(fr.truth, a))
    b = np.array(best)
    total = b.sum(axis=1)
    out = {
        k: [round(float(np.median(v)), 2), round(float(np.percentile(v, 95)), 2)]
        for k, v in zip((*STEPS, "steps1-4"), (*b.T, total), strict=True)
    }
    angle_keys = ("angle_err_median_deg", "angle_err_mean_deg", "angle_err_p90_deg")
    m, m_img = aggregate(scores), aggregate(scores_img)
    print(json.dumps({"suite": args.suite, "frames": len(best), "cpu_ms_p50_p95": out}))
    print(json.dumps({"angles": {k: round(m[k], 3) for k in angle_keys}}))
    print(json.dumps({"angles_image_frame_only": {k: round(m_img[k], 3) for k in angle_keys}}))


if __name__ == "__main__":
    main()
