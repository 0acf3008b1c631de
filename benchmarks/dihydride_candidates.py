"""How well the lattice evidence for undetected dihydrides (the planner's stretched dimers and lone atom
pairs, ``planner.lattice_anomalies``) points at true defects the defect net missed.

For each frame: the pipeline's analysis, then the stretched-dimer midpoints from its atoms, and for each
midpoint whether it lies within the defect tolerance (0.40 nm) of a truth defect that the analysis missed
(by class), of a truth defect it found (a duplicate), or of none (false). Prints the counts, so whether
reporting these points as defects would raise the defect F1 can be read off.

    python benchmarks/dihydride_candidates.py PRESET FIRST_SEED N [--max-bond-nm 0.27]
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import DEFECT_TOL_NM, match_defects, near_border
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner import lattice_anomalies
from stm_feedback.postprocess import pair_dimers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--max-bond-nm", type=float, default=0.27)
    ap.add_argument("--max-split-nm", type=float, default=0.55)
    args = ap.parse_args()
    pipe = Pipeline(load_settings())
    hits: collections.Counter = collections.Counter()
    n_missed: collections.Counter = collections.Counter()
    false = dup = 0
    for fr in simulated_frames(args.preset, args.first_seed, args.n):
        t, s = fr.truth, fr.pixel_size_nm
        a = pipe.analyze(fr.image_nm.astype(np.float32), s, bias_v=fr.bias_v)
        ti, _, t_border, _ = match_defects(t, a)
        found = set(ti.tolist())
        tf = np.array([[d.x_px, d.y_px] for d in t.defects]).reshape(-1, 2)
        for i, d in enumerate(t.defects):
            if not t_border[i] and i not in found:
                n_missed[d.cls] += 1
        xy = np.array([[p.x_px, p.y_px] for p in a.atoms]).reshape(-1, 2)
        if len(xy) < 2:
            continue
        ter = np.array([p.terrace for p in a.atoms])
        ang_of = {tr.id: tr.row_angle_deg for tr in a.terraces}
        ang = np.array([ang_of.get(int(k), np.nan) for k in ter])
        pairs = pair_dimers(xy * s, pipe.params.dimer_tol_nm)
        mask = lattice_anomalies(
            xy, pairs, (t.height_px, t.width_px), s, args.max_bond_nm, args.max_split_nm, atom_angle_deg=ang
        )
        pts = np.argwhere(mask)[:, ::-1].astype(float)
        pts = pts[~near_border(pts, t.height_px, t.width_px, 0.5, s)]
        if not len(pts):
            continue
        if not len(tf):
            false += len(pts)
            continue
        d, j = cKDTree(tf).query(pts)
        used: set[int] = set()
        for dist, k in zip((d * s).tolist(), j.tolist(), strict=True):
            if dist > DEFECT_TOL_NM or t_border[k]:
                false += dist > DEFECT_TOL_NM
                continue
            if k in found or k in used:
                dup += 1
            else:
                used.add(k)
                hits[t.defects[k].cls] += 1
    print(f"{args.preset} {args.first_seed}+{args.n}: candidates on missed truth defects {dict(hits)}")
    print(f"missed truth defects {dict(n_missed)}")
    print(f"candidates on found truth defects (duplicates) {dup}, on no truth defect (false) {false}")


if __name__ == "__main__":
    main()
