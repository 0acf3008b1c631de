"""Where the networks miss atoms: missed / scored truth atoms and unmatched predicted atoms by distance to
the nearest truth step and truth defect, and the frames with the lowest recall.

    python benchmarks/atom_misses.py SUITE N

Uses the evaluation's matching (0.10 nm) and exclusions (unresolved truth atoms, the border).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback.evaluation import nets_analyzer, suite_frames
from stm_feedback.metrics import ATOM_TOL_NM, BORDER_NM, near_border, on_mask, score_matching

BINS_NM = (0.0, 0.5, 1.0, 2.0, np.inf)
NEAREST_BINS_NM = (0.0, 0.1, 0.13, 0.16, 0.2, 0.3, 1.0, np.inf)  # missed atom -> nearest prediction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("n", type=int)
    args = ap.parse_args()
    analyze = nets_analyzer()
    missed = {"step": np.zeros((2, 4)), "defect": np.zeros((2, 4))}  # [missed, scored] per distance bin
    extra = {"step": np.zeros(4), "defect": np.zeros(4)}  # unmatched predictions per bin
    frames = []
    nearest = np.zeros(len(NEAREST_BINS_NM) - 1, int)
    for fr in suite_frames(args.suite, args.n):
        t = fr.truth
        s, h, w = t.pixel_size_nm, t.height_px, t.width_px
        a = analyze(fr.image_nm, fr.pixel_size_nm, fr.bias_v)
        pa = np.array([[p.x_px, p.y_px] for p in a.atoms], float).reshape(-1, 2)
        ta = np.asarray(t.atoms_xy_px, float).reshape(-1, 2)
        t_ex = ~np.asarray(t.atom_resolved, bool) | near_border(ta, h, w, BORDER_NM, s)
        p_ex = near_border(pa, h, w, BORDER_NM, s) | on_mask(pa, np.asarray(t.unresolved_mask, bool))
        counts, ti, pi = score_matching(ta, pa, ATOM_TOL_NM, s, t_ex, p_ex)
        found = np.zeros(len(ta), bool)
        found[ti] = True
        lost = ~t_ex & ~found
        if lost.any() and len(pa):  # a partner found and this atom not: the lost one lies ~0.24 nm away
            d_nn, _ = cKDTree(pa * s).query(ta[lost] * s)
            nearest += np.histogram(d_nn, NEAREST_BINS_NM)[0]
        unmatched = np.ones(len(pa), bool)
        unmatched[pi] = False
        unmatched &= ~p_ex
        dist = {
            "step": ndimage.distance_transform_edt(~np.asarray(t.step_mask, bool)) * s,
            "defect": ndimage.distance_transform_edt(np.asarray(t.defect_instances) == 0) * s,
        }
        for name, d in dist.items():
            for xy, sel, out in ((ta, ~t_ex, None), (pa, unmatched, extra[name])):
                r = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
                c = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
                b = np.digitize(d[r, c], BINS_NM) - 1
                for k in range(4):
                    if out is None:
                        missed[name][0, k] += (sel & (b == k) & ~found).sum()
                        missed[name][1, k] += (sel & (b == k)).sum()
                    else:
                        out[k] += (sel & (b == k)).sum()
        frames.append(
            (fr.seed, round(fr.pixel_size_nm, 3), round(counts.recall, 3), round(counts.precision, 3))
        )
    for name in missed:
        cells = [f"{int(m)}/{int(n)} ({m / max(n, 1):.2f})" for m, n in missed[name].T]
        print(
            f"distance to {name} (nm bins from {BINS_NM[:-1]}): missed/scored {cells}; unmatched preds "
            f"{extra[name].astype(int).tolist()}"
        )
    print(f"missed atom -> nearest predicted atom (nm bins from {NEAREST_BINS_NM[:-1]}): {nearest.tolist()}")
    print("lowest recall (seed, pixel size nm, recall, precision):")
    for row in sorted(frames, key=lambda x: x[2])[:10]:
        print(" ", row)


if __name__ == "__main__":
    main()
