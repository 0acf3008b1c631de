"""PNG overlay of one Analysis on its image: atoms, defects coloured by label, terrace boundaries, sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stm_feedback.schema import Analysis

_SAFE_RGBA = (0.1, 0.9, 0.3, 0.18)


def render_overlay(
    image: np.ndarray,
    analysis: Analysis,
    path: str | Path,
    dpi: int = 100,
    show_atoms: bool = True,
    show_safe: bool = True,
) -> Path:
    """Write a PNG: grey image (1-99 % percentile stretch), translucent green safe mask, white terrace
    boundaries, atoms as small cyan dots, dimers as yellow dots, defects as circles (area-equivalent radius)
    coloured per label (red outline = must-avoid, dashed = writable), sites as magenta dimer chains.
    Pixel coordinates as in the schema: marker at (x_px, y_px) = pixel centre (imshow extent -0.5..W-0.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    img = np.asarray(image, float)
    h, w = img.shape
    lo, hi = np.percentile(img, [1, 99])
    size_in = max(4.0, min(12.0, max(h, w) / dpi * 2.5))
    fig, ax = plt.subplots(figsize=(size_in, size_in * h / w), dpi=dpi)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    if show_safe and analysis.safe_mask is not None and analysis.safe_mask.any():
        rgba = np.zeros((h, w, 4))
        rgba[analysis.safe_mask] = _SAFE_RGBA
        ax.imshow(rgba, interpolation="nearest")
    if analysis.terrace_labels is not None and analysis.terrace_labels.max() >= 0:
        lab = analysis.terrace_labels.astype(float)
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        edge[1:, :] |= lab[1:, :] != lab[:-1, :]
        rgba = np.zeros((h, w, 4))
        rgba[edge] = (1, 1, 1, 0.8)
        ax.imshow(rgba, interpolation="nearest")
    if show_atoms and analysis.atoms:
        xy = np.array([[a.x_px, a.y_px] for a in analysis.atoms])
        ax.plot(xy[:, 0], xy[:, 1], ".", color="cyan", ms=1.2, alpha=0.8, lw=0)
    if analysis.dimers:
        xy = np.array([[d.x_px, d.y_px] for d in analysis.dimers])
        ax.plot(xy[:, 0], xy[:, 1], ".", color="yellow", ms=0.8, alpha=0.6, lw=0)
    labels = sorted({d.label for d in analysis.defects})
    cmap = plt.get_cmap("tab10")
    colour = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    s = analysis.image.pixel_size_nm
    for d in analysis.defects:
        r_px = max(2.0, np.sqrt(max(d.area_nm2, 0.0) / np.pi) / s)
        ax.add_patch(
            Circle(
                (d.x_px, d.y_px),
                r_px,
                fill=False,
                lw=1.4,
                color=colour[d.label],
                ls="-" if d.must_avoid else "--",
            )
        )
        if d.must_avoid:
            ax.add_patch(Circle((d.x_px, d.y_px), r_px + 1.5, fill=False, lw=0.6, color="red"))
    for lab in labels:
        ax.plot([], [], "o", mfc="none", color=colour[lab], label=lab)
    for site in analysis.sites:
        pts = np.array(site.dimers)
        ax.plot(pts[:, 0], pts[:, 1], "-o", color="magenta", ms=2.5, lw=1.5)
    if analysis.sites:
        ax.plot([], [], "-o", color="magenta", label=f"sites ({len(analysis.sites)})")
    if labels or analysis.sites:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ang = ", ".join(f"T{t.id}: {t.row_angle_deg:.1f} deg" for t in analysis.terraces)
    q = analysis.quality
    ax.set_title(
        f"{analysis.image.frame_id or ''}  {len(analysis.atoms)} atoms, {len(analysis.defects)} defects, "
        f"rows {ang}; resolved {q.resolved_fraction:.0%}",
        fontsize=8,
    )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
