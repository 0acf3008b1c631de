"""How much the feedback loop's lag along the fast axis costs the atoms, and whether a frame shows it
(models/MODEL_CARD.md, session 10).

    python benchmarks/feedback_lag_probe.py PRESET FIRST_SEED N       # hard 800000 24 in the card

A slow feedback loop (simulator ``feedback_gain`` < 1, a first-order lag along each line) moves every
feature to the right (+x). Per frame: the drawn gain, the median x and y offset of detected atoms from their
true ones (matched within 3 px), atom F1 as analysed and with that median offset removed (an oracle: it uses
the truth), and two things measurable without truth: the centroid of the mean image profile along x through
the detected atoms (px, relative to the atoms) and its right-minus-left mean. Last lines: atom F1 summed over
the frames as analysed / de-biased by the oracle, and the correlation of each measurable with the x offset.
"""

import dataclasses
import sys

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import score_frame
from stm_feedback.pipeline import Pipeline

pipe = Pipeline(load_settings())
counts = np.zeros((2, 3), int)
rows = []
u = np.arange(-3.0, 3.01, 0.5)  # px along x around each atom
for f in simulated_frames(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):
    maps = pipe.runner.predict(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    t = f.truth
    pa = np.array([[q.x_px, q.y_px] for q in a.atoms]).reshape(-1, 2)
    ta = np.asarray(t.atoms_xy_px)[np.asarray(t.atom_resolved, bool)]
    if len(pa) < 200 or len(ta) < 200:
        continue
    d, k = cKDTree(pa).query(ta, distance_upper_bound=3.0)
    ok = np.isfinite(d)
    bx, by = np.median(pa[k[ok]] - ta[ok], axis=0)
    moved = [dataclasses.replace(q, x_px=q.x_px - bx, y_px=q.y_px - by) for q in a.atoms]
    s0, s1 = score_frame(t, a).atoms, score_frame(t, dataclasses.replace(a, atoms=moved)).atoms
    counts += [(s0.tp, s0.fp, s0.fn), (s1.tp, s1.fp, s1.fn)]
    ys, xs = np.repeat(pa[:, 1:2], len(u), 1), pa[:, 0:1] + u[None, :]
    prof = map_coordinates(maps.image_norm, [ys.ravel(), xs.ravel()], order=1, mode="nearest")
    prof = prof.reshape(len(pa), len(u))
    mean = (prof - prof.min(axis=1, keepdims=True)).mean(axis=0)
    centroid, r_minus_l = float((u * mean).sum() / mean.sum()), float(mean[u > 0].mean() - mean[u < 0].mean())
    gain = float(t.params.get("feedback_gain", 1.0))
    rows.append((bx, centroid, r_minus_l, gain))
    print(
        f"{f.seed} {t.tip_state} gain {gain:.2f}: offset x {bx:+.2f} y {by:+.2f} px, atom F1 {s0.f1:.3f} -> "
        f"{s1.f1:.3f}; centroid {centroid:+.3f} px, R-L {r_minus_l:+.4f}",
        flush=True,
    )
f1 = 2 * counts[:, 0] / (2 * counts[:, 0] + counts[:, 1] + counts[:, 2])
print(f"atom F1 as analysed {f1[0]:.4f}, x/y offset removed (oracle) {f1[1]:.4f}")
r = np.array(rows)
for j, name in ((1, "centroid"), (2, "R-L"), (3, "gain (truth)")):
    print(f"correlation of the x offset with {name}: {np.corrcoef(r[:, 0], r[:, j])[0, 1]:+.3f}")
