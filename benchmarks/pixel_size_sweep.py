"""The realistic preset across the issue's pixel-size range (0.05-0.2 nm/px, drawn per frame): suite metrics
of the networks and every false-safe frame (models/MODEL_CARD.md, session 5).

    python benchmarks/pixel_size_sweep.py FIRST_SEED N [PRESET] [PIXEL_SIZE_NM]
    # 780000 100 in the card; 710000 20 realistic 0.05 for one fixed pixel size
"""

import dataclasses
import json
import sys

from simulator.frame import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import evaluate_frames, simulated_frames
from stm_feedback.pipeline import Pipeline

pipe = Pipeline(load_settings())
fixed = float(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = dataclasses.replace(
    SimConfig.preset(sys.argv[3] if len(sys.argv) > 3 else "realistic"),
    pixel_size_nm=(fixed, fixed) if fixed else (0.05, 0.2),
)
first, n = int(sys.argv[1]), int(sys.argv[2])


KEYS = (
    "atom_f1",
    "dimer_f1",
    "defect_f1",
    "terrace_ari",
    "angle_err_median_deg",
    "site_found_rate",
    "false_safe_sites",
    "false_safe_frames",
)
res = evaluate_frames(
    simulated_frames(cfg, first, n),
    lambda f: pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v),
    "realistic",
    "nets",
)
print(json.dumps({k: round(res.metrics[k], 4) for k in KEYS}))
for fr in res.frames:
    if fr["planner"]["false_safe"]:
        print(fr["seed"], fr["pixel_size_nm"], fr["tip_state"], fr["planner"])
