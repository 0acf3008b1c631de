"""PNG gallery of the simulator's defect classes: a few examples of each class cropped from seeded frames,
rows rotated to run along x, filled state (sample -) and empty state (sample +), each crop with its own
grey stretch; the footprint from the truth is outlined.

    .venv/bin/python benchmarks/class_gallery.py --out docs/img/classes/simulator_classes.png

Seeds are training seeds (< 1_000_000); the preset is "clean" so the templates are seen without artefacts
(``--preset realistic`` shows them as the suites do).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulator.frame import SimConfig, simulate_frame  # noqa: E402
from stm_feedback.classify import row_aligned_patch  # noqa: E402
from stm_feedback.physics import DEFECT_CLASS_NAMES  # noqa: E402

CROP_PX = 40  # 4 nm at 0.1 nm per pixel
CROP_PIXEL_NM = 0.1


def collect(preset: str, bias_v: float, per_class: int, first_seed: int, max_frames: int) -> dict[str, list]:
    """Up to ``per_class`` (patch, footprint patch) pairs per class from frames first_seed, first_seed + 1, ..
    (at most max_frames)."""
    cfg = SimConfig.preset(preset)
    cfg.density_per_100nm2["litho_patch"] = 0.2  # not placed by the realistic presets; shown for completeness
    out: dict[str, list] = {c: [] for c in DEFECT_CLASS_NAMES}
    for seed in range(first_seed, first_seed + max_frames):
        f = simulate_frame(seed, 192, 0.1, cfg, bias_v=bias_v)
        t = f.truth
        angles = {tr.id: tr.row_angle_deg for tr in t.terraces}
        for d in t.defects:
            if len(out[d.cls]) >= per_class or not (20 <= d.x_px < 172 and 20 <= d.y_px < 172):
                continue
            a = angles.get(d.terrace, 0.0)
            args = (d.x_px, d.y_px, t.pixel_size_nm, a, CROP_PX, CROP_PIXEL_NM)
            patch = row_aligned_patch(f.image_nm, *args)
            foot = row_aligned_patch((t.defect_instances == d.id).astype(np.float32), *args)
            out[d.cls].append((patch, foot))
        if all(len(v) >= per_class for v in out.values()):
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/classes/simulator_classes.png"))
    ap.add_argument("--preset", default="clean")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=500_000)
    args = ap.parse_args()
    states = [("filled -2 V", -2.0), ("empty +1.5 V", 1.5)]
    galleries = [collect(args.preset, v, args.per_class, args.first_seed, 200) for _, v in states]
    classes = list(DEFECT_CLASS_NAMES)
    ncol = args.per_class * len(states)
    fig, axes = plt.subplots(len(classes), ncol, figsize=(1.3 * ncol, 1.4 * len(classes)))
    ext = CROP_PX * CROP_PIXEL_NM
    for r, cls in enumerate(classes):
        for s, ((label, _), gal) in enumerate(zip(states, galleries, strict=True)):
            for k in range(args.per_class):
                ax = axes[r, s * args.per_class + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(gal[cls]):
                    patch, foot = gal[cls][k]
                    lo, hi = np.percentile(patch, [1, 99.5])
                    ax.imshow(patch, cmap="gray", vmin=lo, vmax=hi, extent=(0, ext, ext, 0))
                    ax.contour(
                        np.linspace(0, ext, CROP_PX),
                        np.linspace(0, ext, CROP_PX),
                        foot,
                        [0.5],
                        colors="tab:orange",
                        linewidths=0.6,
                    )
                    ax.set_title(f"{1000 * patch.min():.0f}..{1000 * patch.max():.0f} pm", fontsize=6)
                if k == 0 and s == 0:
                    ax.set_ylabel(cls, fontsize=8)
                if r == 0 and k == 0:
                    ax.text(0, -0.9, label, fontsize=8, transform=ax.transData)
    fig.suptitle(
        f"simulator defect classes ({args.preset} preset, {ext:.0f} nm crops, rows along x, per-crop grey"
        " scale; orange = truth footprint; title = patch min..max minus median)",
        fontsize=8,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
