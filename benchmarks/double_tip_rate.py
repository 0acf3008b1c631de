"""How often the ghost-pair double-tip rule (quality.double_tip_pairs) flags double-tip and single-tip
frames of the realistic preset at 0.05-0.2 nm/px, for a few rule variants (min pairs, min fraction, min
offset nm, tolerance nm).

    python benchmarks/double_tip_rate.py FIRST_SEED N P_DOUBLE     # 730000 60 0.5 in models/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from simulator.frame import SimConfig, simulate_frame
from stm_feedback.config import load_settings
from stm_feedback.pipeline import Pipeline
from stm_feedback.quality import double_tip_pairs

# (min_pairs, min_fraction, min_offset_nm, tol_nm); the first is the shipped rule
VARIANTS = [(3, 0.3, 0.8, 0.2), (2, 0.3, 0.8, 0.2), (2, 0.2, 0.5, 0.2), (2, 0.3, 0.8, 0.15)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("p_double", type=float)
    args = ap.parse_args()
    pipe = Pipeline(load_settings())
    cfg = dataclasses.replace(
        SimConfig.preset("realistic"), p_double=args.p_double, pixel_size_nm=(0.05, 0.2)
    )
    flags = {v: [0, 0] for v in VARIANTS}  # [single-tip frames flagged, double-tip frames flagged]
    frames = [0, 0]
    for seed in range(args.first_seed, args.first_seed + args.n):
        f = simulate_frame(seed, size_px=256, pixel_size_nm=None, config=cfg)
        double = int(bool(f.truth.params["double_tip"]))
        s = f.truth.pixel_size_nm
        a = pipe.analyze(f.image_nm.astype(np.float32), s, bias_v=f.bias_v)
        xy = np.array([[d.x_px, d.y_px] for d in a.defects]).reshape(-1, 2)
        kinds = [d.kind for d in a.defects]
        frames[double] += 1
        for v in VARIANTS:
            mp, mf, mo, tol = v
            pairs = double_tip_pairs(
                xy, kinds, s, min_offset_nm=mo, min_pairs=mp, min_fraction=mf, tol_nm=tol
            )
            flags[v][double] += pairs is not None
    print("frames single / double tip", frames)
    for v, (single, double) in flags.items():
        print(v, f"false flags {single} / {frames[0]}, hits {double} / {frames[1]}")


if __name__ == "__main__":
    main()
