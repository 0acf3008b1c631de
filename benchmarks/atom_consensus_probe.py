"""Lattice-consensus refinement of atom positions, post hoc: does averaging each atom with its lattice
neighbours (each neighbour minus the terrace's median displacement of that kind) help atom F1?

For every terrace with a row angle, the pairs of detected atoms closer than 0.55 nm are sorted into the
lattice's neighbour kinds (along the row 0 / 0.384 nm, across it 0 / +-0.24 / +-0.528 nm, within 0.09 nm);
each atom's refined position is the mean of itself (weight W) and of its neighbours' positions shifted back
by their kind's median vector. Atom F1 at 0.10 nm (truth and detections more than 0.5 nm from the border)
before and after, on the first N frames of a suite. Measured, not shipped (models/MODEL_CARD.md session 11).
Also printed, for the unrefined detections: how far each false atom lies from its nearest truth atom, how
many missed truth atoms have a false atom within 0.2 nm, and per frame the mean and std of the position error
(detection minus nearest truth atom, within 0.3 nm).

    python benchmarks/atom_consensus_probe.py SUITE N [W]
"""

from __future__ import annotations

import sys

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import suite_frames
from stm_feedback.metrics import match_points
from stm_feedback.pipeline import Pipeline

NEIGHBOURS_NM = [(al, ac) for al in (0.0, 0.384) for ac in (-0.528, -0.24, 0.0, 0.24, 0.528) if al or ac > 0]


def refine(xy_nm: np.ndarray, row_angle_deg: float, self_weight: float) -> np.ndarray:
    """(N, 2) consensus positions (nm) of one terrace's atoms."""
    u = np.array([np.cos(np.radians(row_angle_deg)), np.sin(np.radians(row_angle_deg))])
    nv = np.array([-u[1], u[0]])
    pairs = cKDTree(xy_nm).query_pairs(0.55, output_type="ndarray")
    acc, cnt = xy_nm * self_weight, np.full(len(xy_nm), self_weight)
    if not len(pairs):
        return xy_nm
    d = xy_nm[pairs[:, 1]] - xy_nm[pairs[:, 0]]
    flip = (d @ u < -1e-9) | ((np.abs(d @ u) <= 1e-9) & (d @ nv < 0))
    d[flip] *= -1
    pairs[flip] = pairs[flip][:, ::-1]
    for along, across in NEIGHBOURS_NM:
        m = (np.abs(d @ u - along) < 0.09) & (np.abs(d @ nv - across) < 0.09)
        if m.sum() < 5:
            continue
        v = np.median(d[m], axis=0)
        i, j = pairs[m, 0], pairs[m, 1]
        np.add.at(acc, i, xy_nm[j] - v)
        np.add.at(cnt, i, 1)
        np.add.at(acc, j, xy_nm[i] + v)
        np.add.at(cnt, j, 1)
    return acc / cnt[:, None]


def counts(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(true positives, false positives, false negatives) at 0.10 nm."""
    ti, _ = match_points(t, p, 0.10)
    return np.array([len(ti), len(p) - len(ti), len(t) - len(ti)])


def f1(c: np.ndarray) -> float:
    return float(2 * c[0] / (2 * c[0] + c[1] + c[2]))


def main() -> None:
    suite, n = sys.argv[1], int(sys.argv[2])
    w_self = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    pipe = Pipeline(load_settings())
    before, after = np.zeros(3), np.zeros(3)
    fp_dist: list[float] = []
    fn_with_fp = fn_total = 0
    for f in suite_frames(suite, n):
        s = f.truth.pixel_size_nm
        a = pipe.analyze(f.image_nm, s, bias_v=f.truth.bias_v)
        t = np.asarray(f.truth.atoms_xy_px, float).reshape(-1, 2) * s
        p = np.array([[x.x_px, x.y_px] for x in a.atoms]).reshape(-1, 2) * s
        ter = np.array([x.terrace for x in a.atoms])
        q = p.copy()
        for terrace in a.terraces:
            sel = np.flatnonzero(ter == terrace.id)
            if len(sel) >= 10:
                q[sel] = refine(p[sel], terrace.row_angle_deg, w_self)
        h, w = f.image_nm.shape
        lo, hi = np.array([0.5, 0.5]), np.array([w * s - 0.5, h * s - 0.5])

        def inner(xy: np.ndarray, lo: np.ndarray = lo, hi: np.ndarray = hi) -> np.ndarray:
            return np.all((xy > lo) & (xy < hi), axis=1)

        before += counts(t[inner(t)], p[inner(p)])
        after += counts(t[inner(t)], q[inner(q)])
        ti, pi = match_points(t[inner(t)], p[inner(p)], 0.10)
        tt, pp = t[inner(t)], p[inner(p)]
        fp = np.delete(pp, pi, axis=0)
        fn = np.delete(tt, ti, axis=0)
        if len(fp) and len(tt):
            fp_dist += cKDTree(tt).query(fp)[0].tolist()
        fn_total += len(fn)
        if len(fn) and len(fp):
            fn_with_fp += int(np.sum(cKDTree(fp).query(fn)[0] < 0.2))
        if len(pp) and len(tt):
            dist, j = cKDTree(tt).query(pp)
            e = pp[dist < 0.3] - tt[j[dist < 0.3]]
            print(
                f"  {f.seed}: error mean x/y {e[:, 0].mean():+.3f} {e[:, 1].mean():+.3f} nm, std x/y "
                f"{e[:, 0].std():.3f} {e[:, 1].std():.3f} nm"
            )
    d = np.asarray(fp_dist)
    print(
        f"false atoms 0.1-0.2 nm from a truth atom: {np.mean((d >= 0.1) & (d < 0.2)):.2f} of {len(d)}; "
        f"missed atoms with a false one within 0.2 nm: {fn_with_fp / max(fn_total, 1):.2f} of {fn_total}"
    )
    print(f"{suite} {n} W {w_self}: atom F1 before {f1(before):.4f} after {f1(after):.4f}")


if __name__ == "__main__":
    main()
