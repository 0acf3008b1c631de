"""A grid of 2 x 2 nm crops of the simulator image around the resolved truth dihydrides, each titled with
its frame seed, F (found by the networks) or m (missed) and the pixel size (models/MODEL_CARD.md, session 14).

    python benchmarks/dihydride_crops.py PRESET FIRST_SEED N OUT.png [--tip sharp]
    python benchmarks/dihydride_crops.py hard:only_listed 800000 40 docs/img/dihydrides_hard_sharp.png \
        --tip sharp

PRESET as in ``benchmarks/hard_variants.py``; ``--tip``: only frames of that true tip state. At most 48 crops.
"""

from __future__ import annotations

import argparse

import matplotlib
import numpy as np
from hard_variants import config_of

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stm_feedback.config import load_settings  # noqa: E402
from stm_feedback.evaluation import simulated_frames  # noqa: E402
from stm_feedback.metrics import match_defects  # noqa: E402
from stm_feedback.pipeline import Pipeline  # noqa: E402

HALF_NM = 1.0
MAX_CROPS = 48


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--tip", help="only frames of this true tip state (sharp, blunt, double, tip_change)")
    args = ap.parse_args()
    pipe = Pipeline(load_settings())
    crops: list[tuple[np.ndarray, str]] = []
    for fr in simulated_frames(config_of(args.preset), args.first_seed, args.n):
        if args.tip and fr.truth.tip_state != args.tip:
            continue
        s, im = fr.pixel_size_nm, fr.image_nm
        a = pipe.analyze(im.astype(np.float32), s, bias_v=fr.bias_v)
        ti, _, t_border, _ = match_defects(fr.truth, a)
        found = set(ti.tolist())
        r = int(round(HALF_NM / s))
        for i, d in enumerate(fr.truth.defects):
            y, x = int(round(d.y_px)), int(round(d.x_px))
            inside = r <= y < im.shape[0] - r and r <= x < im.shape[1] - r
            if d.cls != "dihydride" or t_border[i] or not inside or fr.truth.unresolved_mask[y, x]:
                continue
            tag = "F" if i in found else "m"
            crops.append((im[y - r : y + r + 1, x - r : x + r + 1], f"{fr.seed} {tag} {s:.2f} nm/px"))
    crops = crops[:MAX_CROPS]
    if not crops:
        raise SystemExit("no resolved dihydride in these frames")
    cols = 8
    rows = (len(crops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.7), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(crops):
            c, title = crops[k]
            ax.imshow(c, cmap="gray", interpolation="nearest")
            ax.plot(c.shape[1] // 2, c.shape[0] // 2, "+", color="red", ms=4, mew=0.6)
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    n_found = sum(1 for _, t in crops if " F " in t)
    print(f"{len(crops)} crops ({n_found} found) -> {args.out}")


if __name__ == "__main__":
    main()
