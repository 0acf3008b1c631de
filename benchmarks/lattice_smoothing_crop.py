"""Side-by-side crop of one frame's atoms and dimers with the lattice smoothing off and on
(models/MODEL_CARD.md and docs/real-data.md, session 13).

    python benchmarks/lattice_smoothing_crop.py FRAME.npy PIXEL_SIZE_NM BIAS_V X0 Y0 N OUT.png
    # ../shared/data/real-hsi100/20220819_bias_series_0007.npy 0.097 1.3 200 200 60 docs/img/real/...

Runs the pipeline twice (``PostprocessParams.atom_smooth_sigma_nm`` 0 and the default) and draws the reported
atoms (cyan dots) and dimers (yellow crosses) on the N x N pixel crop at (X0, Y0).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stm_feedback import postprocess as pp  # noqa: E402
from stm_feedback.config import load_settings  # noqa: E402
from stm_feedback.pipeline import Pipeline  # noqa: E402


def main() -> None:
    path, s, bias = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    x0, y0, n, out_png = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    img = np.load(path).astype(np.float32)
    sigmas = (0.0, pp.PostprocessParams().atom_smooth_sigma_nm)
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    for ax, sig in zip(axes, sigmas, strict=True):
        pipe = Pipeline(load_settings())
        pipe.params = pp.PostprocessParams(atom_smooth_sigma_nm=sig)
        a = pipe.analyze(img, s, bias_v=bias)
        extent = (x0 - 0.5, x0 + n - 0.5, y0 + n - 0.5, y0 - 0.5)
        ax.imshow(img[y0 : y0 + n, x0 : x0 + n], cmap="gray", extent=extent)
        for xy, style in (
            (np.array([[q.x_px, q.y_px] for q in a.atoms]).reshape(-1, 2), "c."),
            (np.array([[d.x_px, d.y_px] for d in a.dimers]).reshape(-1, 2), "y+"),
        ):
            m = (xy[:, 0] > x0) & (xy[:, 0] < x0 + n - 1) & (xy[:, 1] > y0) & (xy[:, 1] < y0 + n - 1)
            ax.plot(xy[m, 0], xy[m, 1], style, ms=7)
        ax.set_title(f"atom_smooth_sigma_nm = {sig}: atoms (cyan), dimers (yellow)")
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=70)


if __name__ == "__main__":
    main()
