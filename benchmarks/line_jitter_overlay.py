"""Atoms of one jittered hard-suite frame without and with the scan-line jitter correction, against the truth
(docs/img/line_jitter_1200003.png in docs/analysis-schema.md).

    python benchmarks/line_jitter_overlay.py [SEED] [OUT_PNG]     # 1200003 docs/img/line_jitter_1200003.png

A 48 x 48 px crop of the recorded image; green + = truth atoms (resolved), red x = detected atoms.
"""

import dataclasses
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulator.frame import SimConfig, simulate_frame  # noqa: E402
from stm_feedback.config import load_settings  # noqa: E402
from stm_feedback.metrics import score_frame  # noqa: E402
from stm_feedback.pipeline import Pipeline  # noqa: E402

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1_200_003
out = sys.argv[2] if len(sys.argv) > 2 else f"docs/img/line_jitter_{seed}.png"
on = Pipeline(load_settings())
off = Pipeline(
    on.settings, runner=on.runner, params=dataclasses.replace(on.params, line_jitter_correction=False)
)
f = simulate_frame(seed, 256, None, SimConfig.preset("hard"))
truth = np.asarray(f.truth.atoms_xy_px)[np.asarray(f.truth.atom_resolved, bool)]
y0, x0, w = 60, 60, 48
fig, axes = plt.subplots(1, 2, figsize=(12, 6.4))
for ax, pipe, name in zip(axes, (off, on), ("off", "on"), strict=True):
    a = pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    f1 = score_frame(f.truth, a).atoms.f1
    p = np.array([[q.x_px, q.y_px] for q in a.atoms]).reshape(-1, 2)
    ax.imshow(f.image_nm, cmap="gray")
    ax.plot(truth[:, 0], truth[:, 1], "+", color="lime", ms=9, label="truth")
    ax.plot(p[:, 0], p[:, 1], "rx", ms=6, label="detected")
    ax.set_xlim(x0 - 0.5, x0 + w - 0.5)
    ax.set_ylim(y0 + w - 0.5, y0 - 0.5)
    ax.set_title(
        f"correction {name}: lines moved rms {a.quality.line_jitter_rms_px:.2f} px, frame atom F1 {f1:.3f}",
        fontsize=10,
    )
    ax.legend(loc="lower right")
fig.suptitle(f"hard suite seed {seed}, {f.pixel_size_nm:.3f} nm/px, x = fast scan axis", fontsize=11)
plt.tight_layout()
plt.savefig(out, dpi=70)
print(f"wrote {out}")
