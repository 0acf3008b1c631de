"""Every false-safe site of a simulator preset, with the truth rule it breaks and the frame's quality record.

    python benchmarks/false_safe_causes.py PRESET FIRST_SEED N [--sim FIELD=JSON ...]
    # hard_factors' no_drift: hard 800000 40 --sim 'drift_nm_per_min=[0.0, 0.1]' --sim 'creep_nm=[0.0, 0.05]'
    # hard_factors' no_double: hard 800000 40 --sim p_double=0.0

``--sim`` overrides a ``SimConfig`` field (JSON value; lists become tuples). Per false-safe site: seed, pixel
size, true tip state, whether the quality check suspected a double tip, ``quality.line_jitter_rms_px``, the
site centre (px) and the rules its dimers break (``double_tip_sites.breaks``: "step" or "defect margin M").
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
from double_tip_sites import breaks  # benchmarks/ is on sys.path when run as a script

from simulator.frame import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner_eval import score_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--sim", action="append", default=[], help="SimConfig FIELD=JSON")
    args = ap.parse_args()
    over = {}
    for kv in args.sim:
        name, value = kv.split("=", 1)
        v = json.loads(value)
        over[name] = tuple(v) if isinstance(v, list) else v
    cfg = dataclasses.replace(SimConfig.preset(args.preset), **over)
    st = load_settings()
    pipe = Pipeline(st)
    total = 0
    for f in simulated_frames(cfg, args.first_seed, args.n):
        a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
        if not score_sites(f.truth, a).false_safe:
            continue
        for s in a.sites:
            rules = breaks(np.asarray(s.dimers, float), f.truth, st.planner)
            if rules:
                total += 1
                print(
                    f"{f.seed} {f.pixel_size_nm:.3f} nm/px tip {f.truth.tip_state} double-tip flag "
                    f"{a.quality.double_tip_suspected} jitter rms {a.quality.line_jitter_rms_px:.2f} px: "
                    f"site ({s.center_x_px:.0f}, {s.center_y_px:.0f}) breaks {rules}"
                )
    print(f"{total} false-safe sites in {args.n} frames")


if __name__ == "__main__":
    main()
