"""Safety of the whole safe mask, not only of the proposed sites: how much of it breaks a truth rule
(models/MODEL_CARD.md, session 12).

The suites count false-safe *sites*; a frame proposes at most ``planner.max_sites`` of them, so which part of
the safe mask they sample can hide or expose an unsafe patch. Here every safe pixel with negative truth slack
(``planner_eval.truth_slack_nm``: a dimer there would break a truth margin) counts. Per run: frames, frames
with such pixels, those pixels as a fraction of all safe pixels, and the rule each unsafe patch breaks (the
truth class of the nearest must-avoid defect, or "step"), counted once per frame and class.

    python benchmarks/safe_mask_violations.py PRESET FIRST_SEED N [PIXEL_SIZE_NM | LO,HI]
    # realistic 780000 100 0.05,0.2 (pixel_size_sweep.py's frames) in the card
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys

import numpy as np

from simulator.frame import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner import distance_px
from stm_feedback.planner_eval import truth_margin_nm, truth_slack_nm


def broken_rules(truth: object, unsafe: np.ndarray, settings: object) -> set[str]:
    """Truth classes (or "step") whose margin the pixels of ``unsafe`` break."""
    s = truth.pixel_size_nm
    out: set[str] = set()
    off = np.asarray(truth.step_mask, bool) | (np.asarray(truth.terrace_labels) < 0)
    if (distance_px(off)[unsafe] * s < settings.step_margin_nm).any():
        out.add("step")
    inst = np.asarray(truth.defect_instances)
    for d in truth.defects:
        if d.must_avoid:
            near = distance_px(inst == d.id)[unsafe] * s < truth_margin_nm(d.cls, settings)
            if near.any():
                out.add(d.cls)
    return out


def main() -> None:
    preset, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = SimConfig.preset(preset)
    if len(sys.argv) > 4:
        lo, _, hi = sys.argv[4].partition(",")
        cfg = dataclasses.replace(cfg, pixel_size_nm=(float(lo), float(hi or lo)))
    settings = load_settings()
    pipe = Pipeline(settings)
    ps = settings.planner
    frames_bad, safe_px, bad_px = 0, 0, 0
    rules: collections.Counter[str] = collections.Counter()
    for f in simulated_frames(cfg, first, n):
        a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
        unsafe = a.safe_mask & (truth_slack_nm(f.truth, ps) < 0)
        safe_px += int(a.safe_mask.sum())
        bad_px += int(unsafe.sum())
        if unsafe.any():
            frames_bad += 1
            broken = broken_rules(f.truth, unsafe, ps)
            rules.update(broken)
            n_bad = int(unsafe.sum())
            print(f"{f.seed} {f.pixel_size_nm:.3f} nm/px: {n_bad} unsafe px, breaks {sorted(broken)}")
    row = {
        "preset": preset,
        "first_seed": first,
        "frames": n,
        "frames_with_unsafe_px": frames_bad,
        "unsafe_fraction_of_safe_px": round(bad_px / max(safe_px, 1), 6),
        "frames_per_rule": dict(rules),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
