"""How well the runner guesses the polarity when no bias is given (``ModelRunner.predict`` with bias_v None).

The runner runs NN-1 on the frame and on its inverse and keeps the polarity whose atom map is the more
confident (``runner.atom_map_confidence``). For N frames of each simulator preset this prints the ratio
inverse / raw of the two confidences (> 1 -> "empty"), by true polarity, and the frames the rule gets wrong.
Frames without any raw-frame atom are left out of the ratio quantiles. Weights from
``STM_FEEDBACK_MODELS__MODELS_DIR`` (default models/). Results: models/MODEL_CARD.md, session 7.

    python benchmarks/polarity_estimate.py PRESET[,PRESET...] FIRST_SEED N
    python benchmarks/polarity_estimate.py realistic,realistic_empty 700000 60
"""

from __future__ import annotations

import argparse

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.preprocess import normalize_frame
from stm_feedback.runner import ModelRunner, atom_map_confidence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    args = ap.parse_args()
    runner = ModelRunner.from_settings(load_settings().models)
    for preset in args.presets.split(","):
        ratios: dict[str, list[float]] = {"filled": [], "empty": []}
        wrong: list[str] = []
        for fr in simulated_frames(preset, args.first_seed, args.n):
            s = fr.pixel_size_nm
            norm = normalize_frame(fr.image_nm.astype(np.float32), s)
            raw = atom_map_confidence(runner.net_on_frame("atoms", norm, s, False)[0])
            inv = atom_map_confidence(runner.net_on_frame("atoms", norm, s, True)[0])
            truth = "empty" if fr.bias_v > 0 else "filled"
            ratio = inv / raw if raw > 0 else float("inf")  # no atoms at all on the raw frame
            if np.isfinite(ratio):
                ratios[truth].append(ratio)
            if (inv > raw) != (truth == "empty"):
                wrong.append(f"{fr.seed} ({truth}, {fr.truth.tip_state}, ratio {ratio:.2f}, raw {raw:.0f})")
        for truth, r in ratios.items():
            if r:
                q = np.quantile(np.asarray(r), [0.0, 0.1, 0.5, 0.9, 1.0])
                print(
                    f"{preset} {truth}: {len(r)} frames, inverse/raw confidence min/p10/p50/p90/max "
                    + " / ".join(f"{v:.2f}" for v in q)
                )
        print(f"{preset}: {len(wrong)} of {args.n} frames guessed wrong: " + "; ".join(wrong))


if __name__ == "__main__":
    main()
