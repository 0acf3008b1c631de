"""Where the networks' defect detections go wrong on simulator frames: missed truth defects per class,
unmatched detections (false ones) by category (on a truth footprint = duplicate, near a step, near a truth
defect, in an unresolved patch, on the lattice) and kind, and the peak score / area of the false depressions
on the lattice and in unresolved patches against the true ones (models/MODEL_CARD.md, session 5).

    python benchmarks/defect_errors.py PRESET FIRST_SEED N [--all-depressions]   # realistic 700000 60

PRESET may be ``hard:VARIANT`` and may end in ``@PIXEL_SIZE_NM`` (``benchmarks/hard_variants.py``), e.g.
``hard:only_listed`` or ``realistic@0.05``.

``--all-depressions``: also the depressions below ``PostprocessParams.depression_report_min_score``.
``--tip sharp,blunt``: only frames of these true tip states (sharp, blunt, double, tip_change).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
from hard_variants import config_of
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import match_defects
from stm_feedback.pipeline import Pipeline
from stm_feedback.postprocess import PostprocessParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--all-depressions", action="store_true")
    ap.add_argument("--tip", help="only frames of these true tip states (comma-separated)")
    args = ap.parse_args()
    params = PostprocessParams(depression_report_min_score=0.0) if args.all_depressions else None
    pipe = Pipeline(load_settings(), params=params)
    total: collections.Counter = collections.Counter()
    missed: collections.Counter = collections.Counter()
    false: collections.Counter = collections.Counter()
    false_dep: list[
        tuple[float, float]
    ] = []  # (score, area_nm2) of false depressions on lattice / unresolved
    true_dep: list[tuple[float, float]] = []
    tips = set(args.tip.split(",")) if args.tip else None
    for fr in simulated_frames(config_of(args.preset), args.first_seed, args.n):
        if tips is not None and fr.truth.tip_state not in tips:
            continue
        t, s = fr.truth, fr.pixel_size_nm
        a = pipe.analyze(fr.image_nm.astype(np.float32), s, bias_v=fr.bias_v)
        ti, pi, t_border, p_border = match_defects(t, a)
        tf = np.array([[d.x_px, d.y_px] for d in t.defects]).reshape(-1, 2)
        for i, d in enumerate(t.defects):
            if not t_border[i]:
                total[d.cls] += 1
                missed[d.cls] += i not in set(ti.tolist())
        step_nm = ndimage.distance_transform_edt(~np.asarray(t.step_mask, bool)) * s
        tree = cKDTree(tf) if len(tf) else None
        cls_of = {d.id: d.cls for d in t.defects}
        matched = set(pi.tolist())
        for j, d in enumerate(a.defects):
            if p_border[j]:
                continue
            if j in matched:
                if d.kind == "depression":
                    true_dep.append((d.score, d.area_nm2))
                continue
            x = min(int(round(d.x_px)), t.width_px - 1)
            y = min(int(round(d.y_px)), t.height_px - 1)
            on = int(t.defect_instances[y, x])
            near_nm = tree.query([d.x_px, d.y_px])[0] * s if tree is not None else np.inf
            if on > 0:
                cat = f"on a truth {cls_of[on]} (duplicate)"
            elif step_nm[y, x] < 1.0:
                cat = "within 1 nm of a step"
            elif near_nm < 1.0:
                cat = "within 1 nm of a truth defect"
            elif t.unresolved_mask[y, x]:
                cat = "unresolved patch"
            else:
                cat = "lattice"
            false[(cat, d.kind)] += 1
            if d.kind == "depression" and cat in ("lattice", "unresolved patch"):
                false_dep.append((d.score, d.area_nm2))
    print("truth defects per class", dict(total))
    print("missed per class", dict(missed))
    for (cat, kind), c in false.most_common():
        print(f"false {kind:10s} {cat}: {c}")
    for name, v in (("false depressions (lattice, unresolved)", false_dep), ("true depressions", true_dep)):
        # score = peak probability, area in nm^2
        if v:
            a = np.array(v)
            q = np.percentile(a, [10, 50, 90], axis=0).round(3)
            score, area = q[:, 0].tolist(), q[:, 1].tolist()
            print(f"{name}: n {len(a)}, score p10/50/90 {score}, area nm2 p10/50/90 {area}")


if __name__ == "__main__":
    main()
