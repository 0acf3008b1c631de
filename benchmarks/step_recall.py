"""How much of the truth step edge NN-0 finds, by frame pixel size: the fraction of truth step-mask pixels
within 0.5 nm and 1.0 nm of a pixel with ``step_prob`` >= 0.25 (the segmentation threshold), averaged over
the frames that have a step, and the mean ``step_prob`` on the truth step pixels (models/MODEL_CARD.md,
session 9).
Weights from ``STM_FEEDBACK_MODELS__MODELS_DIR`` (default models/).

    python benchmarks/step_recall.py PIXEL_SIZES FIRST_SEED N      # 0.05,0.1,0.2 710000 20
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from scipy import ndimage

from simulator.frame import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.runner import ModelRunner


def main() -> None:
    runner = ModelRunner.from_settings(load_settings().models)
    first, n = int(sys.argv[2]), int(sys.argv[3])
    for px in [float(v) for v in sys.argv[1].split(",")]:
        cfg = dataclasses.replace(SimConfig.preset("realistic"), pixel_size_nm=(px, px))
        rec = []
        for fr in simulated_frames(cfg, first, n):
            truth = np.asarray(fr.truth.step_mask, bool)
            if not truth.any():
                continue
            maps = runner.predict(fr.image_nm, px, bias_v=fr.bias_v)
            d_nm = ndimage.distance_transform_edt(maps.step_prob < 0.25) * px
            near = d_nm[truth]
            rec.append(((near <= 0.5).mean(), (near <= 1.0).mean(), maps.step_prob[truth].mean()))
        r = np.array(rec)
        print(
            f"{px} nm/px: {len(r)} frames with steps; truth step pixels within 0.5 / 1.0 nm of a detected "
            "one "
            f"{r[:, 0].mean():.3f} / {r[:, 1].mean():.3f}; mean step_prob on them {r[:, 2].mean():.3f}"
        )


if __name__ == "__main__":
    main()
