"""Truth defects found / missed by the networks, per class, split by whether the footprint centre lies in the
simulator's unresolved patches (``GroundTruth.unresolved_mask``): the measurement behind the session-6 scoring
rule for dihydrides (models/MODEL_CARD.md). Scored like ``stm-feedback evaluate`` (0.40 nm, border rule) but
counting every truth defect, the unresolved ones included.

    python benchmarks/defect_recall_resolved.py PRESET FIRST_SEED N      # realistic 700000 60
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import match_defects
from stm_feedback.pipeline import Pipeline

pipe = Pipeline(load_settings())
c = collections.Counter()
for fr in simulated_frames(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):
    t, s = fr.truth, fr.pixel_size_nm
    a = pipe.analyze(fr.image_nm.astype(np.float32), s, bias_v=fr.bias_v)
    ti, _, tb, _ = match_defects(t, a)
    hit = set(ti.tolist())
    for i, d in enumerate(t.defects):
        if tb[i]:
            continue
        x = min(int(round(d.x_px)), t.width_px - 1)
        y = min(int(round(d.y_px)), t.height_px - 1)
        un = bool(t.unresolved_mask[y, x])
        c[(d.cls, "unres" if un else "res", "hit" if i in hit else "miss")] += 1
for k in sorted(c):
    print(k, c[k])
