"""The realistic preset at other frame sizes than the suites' 256 x 256: suite metrics of the networks and
every false-safe site (its seed, pixel size, tip state and planner counts).

    python benchmarks/frame_size_sweep.py FIRST_SEED N SIZE_PX [PRESET]      # 730000 30 128
"""

from __future__ import annotations

import json
import sys

from stm_feedback.config import load_settings
from stm_feedback.evaluation import evaluate_frames, simulated_frames
from stm_feedback.pipeline import Pipeline

KEYS = ("atom_f1", "dimer_f1", "defect_f1", "terrace_ari", "angle_err_median_deg", "site_found_rate")


def main() -> None:
    first, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    preset = sys.argv[4] if len(sys.argv) > 4 else "realistic"
    pipe = Pipeline(load_settings())
    res = evaluate_frames(
        simulated_frames(preset, first, n, size_px=size),
        lambda f: pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v),
        "realistic",
        "nets",
    )
    out = {k: round(res.metrics[k], 4) for k in (*KEYS, "false_safe_sites", "false_safe_frames")}
    print(json.dumps({"preset": preset, "size_px": size, "first_seed": first, "n": n, **out}))
    for fr in res.frames:
        if fr["planner"]["false_safe"]:
            print(fr["seed"], round(fr["pixel_size_nm"], 3), fr["tip_state"], fr["planner"])


if __name__ == "__main__":
    main()
