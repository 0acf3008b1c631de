"""What is left of the atoms' position error once they sit on their local lattice (models/MODEL_CARD.md,
session 13).

    python benchmarks/atom_error_structure.py PRESET FIRST_SEED N      # hard 800000 40 in the card

Runs the pipeline (shipped settings) on N simulator frames and prints, summed over the frames:
- atom F1 at the evaluation's 0.10 nm (same exclusions as ``stm-feedback evaluate``);
- mean and std (nm) of x and y error of the atoms matched within 0.3 nm: the error the smoothing leaves;
- atom F1 with each frame's median x (and y) error removed using the truth (an oracle: what a per-frame
  offset estimate, e.g. of the feedback loop's lag, could at most gain);
- atom F1 without the atoms that do not fit their local lattice (those that a second
  ``postprocess.lattice_smooth_atoms`` pass leaves where they are), with precision and recall.

``STM_FEEDBACK_POSTPROCESS='{"atom_smooth_sigma_nm": 0}'`` gives the same for the detected peaks.
"""

from __future__ import annotations

import sys

import numpy as np

from simulator.frame import SimConfig
from stm_feedback import postprocess as pp
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.metrics import ATOM_TOL_NM, BORDER_NM, near_border, on_mask, score_matching
from stm_feedback.pipeline import Pipeline


def f1(c: np.ndarray) -> str:
    """F1 (precision, recall) of summed [tp, fp, fn]."""
    tp, fp, fn = c
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return f"F1 {2 * tp / max(2 * tp + fp + fn, 1):.4f} (P {prec:.3f}, R {rec:.3f})"


def main() -> None:
    preset, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = load_settings()
    pipe = Pipeline(settings)
    params = pipe.params
    counts = {k: np.zeros(3) for k in ("as analysed", "oracle dx", "oracle dx, dy", "off-lattice dropped")}
    errors = []
    for fr in simulated_frames(SimConfig.preset(preset), first, n):
        t, s = fr.truth, fr.pixel_size_nm
        h, w = t.height_px, t.width_px
        a = pipe.analyze(fr.image_nm, s, bias_v=fr.bias_v)
        pa = np.array([[p.x_px, p.y_px] for p in a.atoms], float).reshape(-1, 2)
        ter = np.array([p.terrace for p in a.atoms], int)
        ta = np.asarray(t.atoms_xy_px, float).reshape(-1, 2)
        t_ex = ~np.asarray(t.atom_resolved, bool) | near_border(ta, h, w, BORDER_NM, s)

        def score(q: np.ndarray, ta: np.ndarray = ta, t_ex: np.ndarray = t_ex, t: object = t) -> np.ndarray:
            p_ex = near_border(q, t.height_px, t.width_px, BORDER_NM, t.pixel_size_nm) | on_mask(
                q, np.asarray(t.unresolved_mask, bool)
            )
            c = score_matching(ta, q, ATOM_TOL_NM, t.pixel_size_nm, t_ex, p_ex)[0]
            return np.array([c.tp, c.fp, c.fn])

        _, ti, pi = score_matching(ta, pa, 0.3, s, t_ex)
        err = pa[pi] - ta[ti]
        errors.append(err * s)
        med = np.median(err, axis=0) if len(err) else np.zeros(2)
        # the reported atoms are on the lattice already: what a second pass leaves in place does not fit it
        fitted = {x.id: x.row_angle_deg for x in a.terraces if x.fit_residual_nm is not None}
        ang = np.array([fitted.get(k, np.nan) for k in ter])
        sigma = params.atom_smooth_sigma_nm if params.atom_smooth_sigma_nm > 0 else 0.6  # off: the default
        again = pp.lattice_smooth_atoms(pa * s, ter, ang, sigma, params.atom_smooth_max_move_nm) / s
        off = (np.abs(again - pa).max(axis=1) == 0) & np.isfinite(ang) & (ter >= 0)
        counts["as analysed"] += score(pa)
        counts["oracle dx"] += score(pa - [med[0], 0.0])
        counts["oracle dx, dy"] += score(pa - med)
        counts["off-lattice dropped"] += score(pa[~off])
    e = np.concatenate(errors)
    print(f"{preset} {first}+{n}: matched within 0.3 nm: {len(e)} atoms")
    print(f"error x mean {e[:, 0].mean():+.4f} std {e[:, 0].std():.4f} nm; y mean {e[:, 1].mean():+.4f} std "
          f"{e[:, 1].std():.4f} nm")
    for k, c in counts.items():
        print(f"{k:22s} {f1(c)}")


if __name__ == "__main__":
    main()
