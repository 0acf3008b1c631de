"""Systematic offset of the defect detections from the truth: per kind, the mean (dx, dy) in nm of each truth
defect's nearest detection of its kind within 1 nm, the median distance and the fraction beyond the 0.40 nm
match radius (models/MODEL_CARD.md, session 14). Dihydrides are left out (few are found).

    python benchmarks/defect_offset.py PRESET FIRST_SEED N [--oracle]
    python benchmarks/defect_offset.py realistic@0.2 710000 12

PRESET as in ``benchmarks/hard_variants.py`` (``realistic@0.2``: the realistic preset at 0.2 nm/px).
``--oracle``: the truth's own maps instead of the networks' (the post-processing's share of the offset).
Weights from ``STM_FEEDBACK_MODELS__MODELS_DIR`` (default models/).
"""

from __future__ import annotations

import argparse

import numpy as np
from hard_variants import config_of
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline

NEAR_NM = 1.0
MATCH_NM = 0.40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--oracle", action="store_true")
    args = ap.parse_args()
    pipe = Pipeline(load_settings())
    offsets: dict[str, list[np.ndarray]] = {"protrusion": [], "depression": []}
    for fr in simulated_frames(config_of(args.preset), args.first_seed, args.n):
        s = fr.pixel_size_nm
        if args.oracle:
            from stm_feedback.targets import oracle_maps

            a = pipe.analyze_maps(fr.image_nm, oracle_maps(fr.image_nm, fr.truth, fr.bias_v), s, fr.bias_v)
        else:
            a = pipe.analyze(fr.image_nm.astype(np.float32), s, bias_v=fr.bias_v)
        for kind, out in offsets.items():
            truth = [d for d in fr.truth.defects if d.kind == kind and d.cls != "dihydride"]
            t = np.array([[d.x_px, d.y_px] for d in truth]).reshape(-1, 2)
            p = np.array([[d.x_px, d.y_px] for d in a.defects if d.kind == kind]).reshape(-1, 2)
            if not len(t) or not len(p):
                continue
            dist, j = cKDTree(p).query(t)
            near = dist * s < NEAR_NM
            out.append((p[j[near]] - t[near]) * s)
    for kind, parts in offsets.items():
        if not parts:
            continue
        d = np.concatenate(parts)
        r = np.hypot(d[:, 0], d[:, 1])
        print(
            f"{args.preset} {kind:10s} n {len(d):4d}  mean dx, dy {d[:, 0].mean():+.3f}, "
            f"{d[:, 1].mean():+.3f} nm  median |d| {np.median(r):.3f} nm  "
            f"beyond {MATCH_NM} nm {np.mean(r > MATCH_NM):.3f}"
        )


if __name__ == "__main__":
    main()
