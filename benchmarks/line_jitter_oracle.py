"""How much of the hard suite's atom error is scan-line jitter (models/MODEL_CARD.md, session 10).

    python benchmarks/line_jitter_oracle.py [SUITE] [N]          # hard 16 in the card

Per frame with jitter (the simulator's true line offsets are captured while the frame is made), with the
pipeline's own correction off:
- the slope of the detected atoms' x error on the true offset their blob is recorded at (0 = NN-1 follows
  each line's offset fully, 1 = not at all);
- atom F1 as analysed, and with the true offsets removed before the analysis and put back after (an oracle:
  whole-pixel ``jitter.shift_lines``, atoms moved back with ``jitter.unshift_x``).
Last line: atom and dimer F1 summed over all N frames, as analysed and with the oracle.
"""

import dataclasses
import sys

import numpy as np
from scipy.spatial import cKDTree

import simulator.frame as sim
from stm_feedback.config import load_settings
from stm_feedback.evaluation import SUITES
from stm_feedback.jitter import feature_offset_px, shift_lines, unshift_x
from stm_feedback.metrics import score_frame
from stm_feedback.pipeline import Pipeline

captured: dict[str, np.ndarray] = {}
_jitter_lines = sim.jitter_lines


def jitter_lines(rng, h, lam):  # noqa: ANN001, ANN201
    captured["j"] = _jitter_lines(rng, h, lam)
    return captured["j"]


sim.jitter_lines = jitter_lines
suite = sys.argv[1] if len(sys.argv) > 1 else "hard"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
base = Pipeline(load_settings())
pipe = Pipeline(
    base.settings, runner=base.runner, params=dataclasses.replace(base.params, line_jitter_correction=False)
)
counts = np.zeros((2, 2, 3), int)  # (analysed, oracle) x (atoms, dimers) x (tp, fp, fn)
first = SUITES[suite].first_seed
for seed in range(first, first + n):
    captured.clear()
    f = sim.simulate_frame(seed, SUITES[suite].size_px, None, sim.SimConfig.preset(SUITES[suite].preset))
    j = captured["j"] if f.truth.params["jitter_lambda_px"] > 0 else np.zeros(f.image_nm.shape[0])
    a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    b = pipe.analyze(shift_lines(f.image_nm, j), f.pixel_size_nm, bias_v=f.bias_v)

    def back(objs, j=j, px=f.pixel_size_nm):  # noqa: ANN001, ANN202
        return [
            dataclasses.replace(o, x_px=float(unshift_x(np.array([o.x_px]), np.array([o.y_px]), j, px)[0]))
            for o in objs
        ]

    b = dataclasses.replace(b, atoms=back(b.atoms), dimers=back(b.dimers))
    s0, s1 = score_frame(f.truth, a), score_frame(f.truth, b)
    for i, s in enumerate((s0, s1)):
        counts[i, 0] += (s.atoms.tp, s.atoms.fp, s.atoms.fn)
        counts[i, 1] += (s.dimers.tp, s.dimers.fp, s.dimers.fn)
    if not j.any():
        continue
    pa = np.array([[o.x_px, o.y_px] for o in a.atoms]).reshape(-1, 2)
    ta = np.asarray(f.truth.atoms_xy_px)[np.asarray(f.truth.atom_resolved, bool)]
    slope = float("nan")
    if len(pa) > 10 and len(ta) > 10:
        d, k = cKDTree(pa).query(ta, distance_upper_bound=3.0)
        ok = np.isfinite(d)
        jt = feature_offset_px(j, ta[ok, 1], f.pixel_size_nm)  # the truth's offset of each atom
        slope = float(np.polyfit(jt, pa[k[ok], 0] - ta[ok, 0], 1)[0])
    print(
        f"{seed} {f.truth.tip_state}: x-error slope on the line offset {slope:+.2f}, atom F1 "
        f"{s0.atoms.f1:.3f} -> oracle {s1.atoms.f1:.3f}",
        flush=True,
    )
f1 = 2 * counts[..., 0] / np.maximum(1, 2 * counts[..., 0] + counts[..., 1] + counts[..., 2])
print(
    f"{n} frames: atoms {f1[0, 0]:.3f} -> oracle {f1[1, 0]:.3f}, "
    f"dimers {f1[0, 1]:.3f} -> oracle {f1[1, 1]:.3f}"
)
