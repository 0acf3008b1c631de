"""Test-time flip averaging: each named net's output averaged over the 4 flips of its input (4x its cost),
scored on a suite (models/MODEL_CARD.md, session 12). A measure of how much the nets' own variance costs,
not a shipped mode.

    python benchmarks/flip_averaging.py SUITE N [NETS]       # hard 30 "" / atoms / atoms,defects in the card

One JSON line: atom / dimer / defect F1, terrace ARI, site-found rate, false-safe sites, unsafe-mask frames.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import evaluate_frames, suite_frames
from stm_feedback.pipeline import Pipeline

KEYS = ("atom_f1", "dimer_f1", "defect_f1", "terrace_ari", "site_found_rate", "false_safe_sites")


def main() -> None:
    suite, n = sys.argv[1], int(sys.argv[2])
    nets = {x for x in (sys.argv[3] if len(sys.argv) > 3 else "").split(",") if x}
    pipe = Pipeline(load_settings())
    runner = pipe.runner
    run_net = runner.run_net

    def averaged(name: str, x: np.ndarray) -> np.ndarray:
        if name not in nets:
            return run_net(name, x)
        outs = []
        for flip_y in (False, True):
            for flip_x in (False, True):
                xi = x[::-1] if flip_y else x
                y = run_net(name, np.ascontiguousarray(xi[:, ::-1] if flip_x else xi))
                y = y[:, ::-1] if flip_y else y
                outs.append(y[:, :, ::-1] if flip_x else y)
        return np.ascontiguousarray(np.mean(outs, axis=0))

    runner.run_net = averaged  # the pipeline calls the runner's run_net for every net
    m = evaluate_frames(
        suite_frames(suite, n),
        lambda f: pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v),
        suite,
        "nets",
    ).metrics
    row = {"suite": suite, "averaged": sorted(nets), **{k: round(m[k], 4) for k in KEYS}}
    print(json.dumps({**row, "unsafe_mask_frames": m["unsafe_mask_frames"]}))


if __name__ == "__main__":
    main()
