"""Post-processing time of coarse frames with the atoms found on NN-1's grid or on the frame's grid
(``PostprocessParams.atoms_on_net_grid``; models/MODEL_CARD.md, session 9).

For each pixel size, 20 realistic 256 x 256 frames (seeds 4200000+) through the networks once, then
``Pipeline.analyze_maps`` with the setting off / on, twice alternately; prints the medians over frames of the
pipeline's "atoms" stage and of its post-processing total (ms, wall clock: run on a quiet machine).

    python benchmarks/atoms_grid_cost.py [PIXEL_SIZE_NM ...]      # default 0.15 0.2
"""

from __future__ import annotations

import sys

import numpy as np

from simulator.frame import SimConfig, simulate_frame
from stm_feedback.config import load_settings
from stm_feedback.pipeline import Pipeline
from stm_feedback.postprocess import PostprocessParams


def main() -> None:
    settings = load_settings()
    base = Pipeline(settings)
    for px in [float(v) for v in sys.argv[1:]] or [0.15, 0.2]:
        frames = [simulate_frame(4_200_000 + i, 256, px, SimConfig.preset("realistic")) for i in range(20)]
        maps = [base.runner.predict(f.image_nm, px, bias_v=f.bias_v) for f in frames]
        for on in (False, True, False, True):
            pipe = Pipeline(settings, params=PostprocessParams(atoms_on_net_grid=on), runner=base.runner)
            ms: dict[str, list[float]] = {"atoms": [], "total": []}
            for f, m in zip(frames, maps, strict=True):
                a = pipe.analyze_maps(f.image_nm, m, px, f.bias_v)
                for k, v in ms.items():
                    v.append(a.timings_ms[k])
            grid = "net grid" if on else "frame grid"
            print(px, grid, {k: round(float(np.median(v)), 2) for k, v in ms.items()})


if __name__ == "__main__":
    main()
