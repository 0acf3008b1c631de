"""Which side of a double-tip frame's protrusion pairs is the ghost: each candidate rule against the truth
(docs/analysis-schema.md, quality; models/MODEL_CARD.md, session 14).

    python benchmarks/ghost_side.py PRESET FIRST_SEED N [PRESET FIRST_SEED N ...]
    python benchmarks/ghost_side.py hard 800000 100 hard:only_listed 800000 100 training 300000 350

The networks' detections with ``drop_double_tip_ghosts`` off; on every frame ``quality.double_tip_pairs``
flags, the true ghost side is the side of the pairs with fewer detections within 0.40 nm of a truth defect
(frames where both sides have as many are skipped). Rules: the side weaker in most pairs by ``height_rel``
(the rule before session 14) or by NN-2 ``score``, and the side whose relative footprint-area differences
sum smaller (``quality.ghost_copies``). Prints the frames each rule gets wrong and the real detections it
would drop there. PRESET may be ``hard:VARIANT`` (``benchmarks/hard_variants.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
from hard_variants import config_of
from scipy.spatial import cKDTree

from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.postprocess import PostprocessParams
from stm_feedback.quality import double_tip_pairs, ghost_copies

MATCH_NM = 0.40


def majority_weaker(v: np.ndarray) -> Callable[[np.ndarray], int]:
    """Rule: the side lower in ``v`` in most pairs (ties: the second)."""

    def side(pairs: np.ndarray) -> int:
        second = np.count_nonzero(v[pairs[:, 1]] < v[pairs[:, 0]])
        first = np.count_nonzero(v[pairs[:, 0]] < v[pairs[:, 1]])
        return 1 if second >= first else 0

    return side


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 3:
        raise SystemExit(__doc__)
    pipe = Pipeline(load_settings(), params=PostprocessParams(drop_double_tip_ghosts=False))
    wrong: dict[str, list[int]] = {}
    dropped: dict[str, int] = {}
    n_frames = 0
    for k in range(0, len(args), 3):
        preset, first, n = args[k], int(args[k + 1]), int(args[k + 2])
        for fr in simulated_frames(config_of(preset), first, n):
            s = fr.pixel_size_nm
            a = pipe.analyze(fr.image_nm.astype(np.float32), s, bias_v=fr.bias_v)
            xy = np.array([[d.x_px, d.y_px] for d in a.defects]).reshape(-1, 2)
            pairs = double_tip_pairs(xy, [d.kind for d in a.defects], s)
            if pairs is None or not fr.truth.defects:
                continue
            tx = np.array([[d.x_px, d.y_px] for d in fr.truth.defects])
            real = cKDTree(tx).query(xy)[0] * s < MATCH_NM
            n0, n1 = int(real[pairs[:, 0]].sum()), int(real[pairs[:, 1]].sum())
            if n0 == n1:
                continue
            truth_side = 1 if n0 > n1 else 0
            n_frames += 1
            area = np.array([d.area_nm2 for d in a.defects], float)
            rules = {
                "height_rel, most pairs": majority_weaker(np.array([d.height_rel for d in a.defects], float)),
                "NN-2 score, most pairs": majority_weaker(np.array([d.score for d in a.defects], float)),
                "area, relative sum (shipped)": lambda p, area=area: int(
                    np.array_equal(ghost_copies(p, area), np.unique(p[:, 1]))
                ),
            }
            for name, rule in rules.items():
                side = rule(pairs)
                if side != truth_side:
                    wrong.setdefault(name, []).append(fr.seed)
                    dropped[name] = dropped.get(name, 0) + int(real[pairs[:, side]].sum())
                else:
                    wrong.setdefault(name, [])
    print(f"flagged double-tip frames with a true ghost side: {n_frames}")
    for name, seeds in wrong.items():
        lost = dropped.get(name, 0)
        print(f"{name:30s} wrong on {len(seeds):3d}, real detections dropped there {lost:4d}: {seeds}")


if __name__ == "__main__":
    main()
