"""NN-2's depression probability at the true dihydrides: filled-state against empty-state frames.

For each resolved truth dihydride (centre not in ``unresolved_mask``) of N frames of each preset, the maximum
of ``depression_prob`` within 0.2 nm of its centre; prints the 10/50/90 % quantiles and the fractions above
0.5 and above the pipeline's defect threshold 0.7. Weights from ``STM_FEEDBACK_MODELS__MODELS_DIR`` (default
models/), so a candidate NN-2 can be compared with the shipped one (models/MODEL_CARD.md, session 7).

    python benchmarks/dihydride_probability.py [--first-seed 700000] [--n 20] \
        [--presets realistic,realistic_empty]
"""

from __future__ import annotations

import argparse

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.runner import ModelRunner

RADIUS_NM = 0.2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-seed", type=int, default=700_000)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--presets", default="realistic,realistic_empty")
    args = ap.parse_args()
    runner = ModelRunner.from_settings(load_settings().models)
    for preset in args.presets.split(","):
        peaks: list[float] = []
        for fr in simulated_frames(preset, args.first_seed, args.n):
            maps = runner.predict(fr.image_nm.astype(np.float32), fr.pixel_size_nm, bias_v=fr.bias_v)
            h, w = maps.depression_prob.shape
            r = max(1, int(round(RADIUS_NM / fr.pixel_size_nm)))
            for d in fr.truth.defects:
                y, x = int(round(d.y_px)), int(round(d.x_px))
                if d.cls != "dihydride" or not (0 <= y < h and 0 <= x < w) or fr.truth.unresolved_mask[y, x]:
                    continue
                peaks.append(
                    float(maps.depression_prob[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].max())
                )
        v = np.asarray(peaks)
        if v.size == 0:
            print(f"{preset}: no resolved dihydrides in {args.n} frames")
            continue
        q = np.quantile(v, [0.1, 0.5, 0.9])
        print(
            f"{preset}: {v.size} dihydrides in {args.n} frames from seed {args.first_seed};"
            f" max depression_prob p10/p50/p90 {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f};"
            f" > 0.5: {np.mean(v > 0.5):.3f}, > 0.7: {np.mean(v > 0.7):.3f}"
        )


if __name__ == "__main__":
    main()
