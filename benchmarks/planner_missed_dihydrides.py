"""Truth dihydrides that false-safe sites touch (suspect-dimer rule off), and what the analysis had there.

``python benchmarks/planner_missed_dihydrides.py /tmp/pc/train-hard``  (caches of benchmarks/planner_cache.py)

For every truth dihydride within ``dihydride_margin_nm`` of a proposed site's dimer (planner settings as
configured, with the suspect-dimer tests switched off): the distance from its centre to the nearest detected
dimer, the detected atoms within 0.45 nm and their pairwise distances (nm), and NN-2's maximum depression
probability within +-3 px of its centre. Used for docs/analysis-schema.md (why the nets' sites touch them).
"""

import pickle
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings
from stm_feedback.planner import distance_px

settings = load_settings()
settings = settings.model_copy(
    update={
        "planner": settings.planner.model_copy(
            update=dict(suspect_depression_prob=-1.0, suspect_centre_z=-1.0)
        )
    }
)
ps = settings.planner
params = pl.pp.PostprocessParams()
for p in sorted(Path(sys.argv[1]).glob("*.pkl")):
    rec = pickle.loads(p.read_bytes())
    tr = rec["truth"]
    s = rec["pixel_size_nm"]
    an = pl.postprocess_maps(
        rec["image_nm"].astype(np.float32), rec["maps"], s, rec["bias_v"], None, settings, params
    )
    if not an.sites:
        continue
    inst = np.asarray(tr.defect_instances)
    dh = [d for d in tr.defects if d.cls == "dihydride"]
    if not dh:
        continue
    atoms = np.array([[a.x_px, a.y_px] for a in an.atoms])
    at = cKDTree(atoms * s)
    dims = np.array([[d.x_px, d.y_px] for d in an.dimers])
    dt = cKDTree(dims * s)
    sitepts = np.concatenate([np.asarray(x.dimers) for x in an.sites])
    for d in dh:
        dm = distance_px(inst == d.id) * s
        c = np.clip(np.rint(sitepts).astype(int), 0, inst.shape[0] - 1)
        dmin = dm[c[:, 1], c[:, 0]].min()
        if dmin >= ps.dihydride_margin_nm:
            continue
        ctr = np.array([d.x_px, d.y_px]) * s
        # truth dimers on footprint
        ddist, _ = dt.query(ctr, k=1)
        idx = at.query_ball_point(ctr, 0.45)
        a_here = atoms[idx] * s
        pd = [np.hypot(*(a_here[i] - a_here[j])) for i in range(len(idx)) for j in range(i + 1, len(idx))]
        ap = rec["maps"].atom_prob
        dp = rec["maps"].depression_prob
        r0, c0 = int(round(d.y_px)), int(round(d.x_px))
        print(
            f"{rec['seed']} dh n={d.n_dimers} site-dist {dmin:.2f} nearest det dimer {ddist:.2f} nm, "
            f"atoms<0.45: {len(idx)} pair d {np.round(pd, 2).tolist()} "
            f"deprob max {dp[r0 - 3 : r0 + 4, c0 - 3 : c0 + 4].max():.2f} tip {tr.tip_state}"
        )
