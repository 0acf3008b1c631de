"""Figures of the defect classes (the paper's Fig. 6): a hierarchical-clustering dendrogram of the defect
features, the number of defects per mean-shift cluster for each kind, and row-aligned class-mean images.

Pure functions from arrays to PNG files (matplotlib, Agg backend); ``library_figures`` reads a library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stm_feedback.classify import FEATURE_NAMES, _transform
from stm_feedback.errors import InputError
from stm_feedback.physics import KINDS


def _plt():  # noqa: ANN202 - matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dendrogram_png(
    features: np.ndarray,
    kinds: Sequence[str],
    path: str | Path,
    feature_names: Sequence[str] = FEATURE_NAMES,
    max_leaves: int = 40,
) -> Path:
    """Ward dendrogram of the defects (one panel per kind) in the clustering's feature space (the
    ``classify`` transforms, z-scored per kind), truncated to ``max_leaves`` leaves labelled "(n)"."""
    from scipy.cluster.hierarchy import dendrogram, linkage

    x = np.asarray(features, float)
    k = np.asarray(list(kinds), dtype=object)
    if x.ndim != 2 or len(x) != len(k):
        raise InputError(f"features {x.shape} and {len(k)} kinds do not match")
    present = [kind for kind in KINDS if (k == kind).sum() >= 2]
    plt = _plt()
    fig, axes = plt.subplots(
        1, max(1, len(present)), figsize=(6.5 * max(1, len(present)), 4.2), squeeze=False
    )
    for ax, kind in zip(axes[0], present, strict=False):
        z = _transform(x[k == kind], feature_names)
        z = (z - z.mean(0)) / np.maximum(z.std(0), 1e-9)
        link = linkage(z, method="ward")
        dendrogram(
            link,
            ax=ax,
            truncate_mode="lastp" if len(z) > max_leaves else None,
            p=max_leaves,
            show_leaf_counts=True,
            leaf_rotation=90,
            leaf_font_size=7,
            color_threshold=0.7 * link[:, 2].max(),
        )
        ax.set_title(f"{kind}s (n = {len(z)}): Ward linkage on {len(feature_names)} features")
        ax.set_ylabel("distance (standardised features)")
    if not present:
        axes[0][0].text(0.5, 0.5, "fewer than 2 defects of each kind", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cluster_counts_png(kinds: Sequence[str], groups: Sequence[object], path: str | Path) -> Path:
    """Bar charts of the number of defects per group (cluster id or label), one panel per kind."""
    k = np.asarray(list(kinds), dtype=object)
    g = np.asarray([str(v) for v in groups], dtype=object)
    plt = _plt()
    fig, axes = plt.subplots(1, len(KINDS), figsize=(10, 3.4), squeeze=False)
    for ax, kind in zip(axes[0], KINDS, strict=True):
        names, counts = np.unique(g[k == kind], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        ax.bar(
            [str(n) for n in names[order]],
            counts[order],
            color="#8c564b" if kind == "depression" else "#1f77b4",
        )
        ax.set_title(f"{kind}s")
        ax.set_ylabel("defects")
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def class_means_png(
    patches: np.ndarray,
    kinds: Sequence[str],
    groups: Sequence[object],
    path: str | Path,
    patch_pixel_size_nm: float = 0.125,
    max_groups_per_kind: int = 8,
) -> Path:
    """Mean row-aligned patch (dimer rows along x) of each (kind, group), biggest groups first; one row of
    panels per kind, shared colour scale per kind (nm, relative to each patch's median)."""
    p = np.asarray(patches, np.float32)
    k = np.asarray(list(kinds), dtype=object)
    g = np.asarray([str(v) for v in groups], dtype=object)
    if p.ndim != 3 or len(p) != len(k) or len(g) != len(k):
        raise InputError(f"patches {p.shape}, {len(k)} kinds and {len(g)} groups do not match")
    panels: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for kind in KINDS:
        names, counts = np.unique(g[k == kind], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:max_groups_per_kind]
        panels[kind] = [
            (str(names[i]), int(counts[i]), p[(k == kind) & (g == names[i])].mean(0)) for i in order
        ]
    ncol = max(1, max(len(v) for v in panels.values()))
    plt = _plt()
    fig, axes = plt.subplots(len(KINDS), ncol, figsize=(1.9 * ncol + 0.6, 2.2 * len(KINDS)), squeeze=False)
    extent_nm = p.shape[-1] * patch_pixel_size_nm
    for r, kind in enumerate(KINDS):
        items = panels[kind]
        lim = max([np.abs(m).max() for _, _, m in items] + [1e-6])
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.set_axis_off()
                continue
            name, n, mean = items[c]
            im = ax.imshow(mean, cmap="afmhot", vmin=-lim, vmax=lim, extent=(0, extent_nm, extent_nm, 0))
            ax.set_title(f"{name}\n(n = {n})", fontsize=8)
        if items:
            axes[r][0].set_ylabel(f"{kind}s", fontsize=9)
            fig.colorbar(im, ax=list(axes[r]), shrink=0.8, label="height (nm)")
    fig.suptitle(f"class means, rows along x, {extent_nm:.1f} nm patches", fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def library_figures(
    lib: object, out_dir: str | Path, by: str = "cluster", patch_pixel_size_nm: float = 0.125
) -> list[Path]:
    """Write ``dendrogram.png``, ``counts.png`` and ``class_means.png`` of a ``DefectLibrary`` to out_dir,
    grouping by ``cluster`` (mean-shift id), ``label`` (expert/predicted name) or ``true`` (simulator)."""
    if by not in ("cluster", "label", "true"):
        raise InputError(f"group by 'cluster', 'label' or 'true', not {by!r}")
    recs = lib.defects(with_patches=True)  # type: ignore[attr-defined]
    if not recs:
        raise InputError("the library has no defects")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [r.kind for r in recs]
    groups = [
        (r.cluster if by == "cluster" else r.label if by == "label" else (r.true_label or "?")) for r in recs
    ]
    paths = [
        dendrogram_png(np.array([r.features for r in recs]), kinds, out / "dendrogram.png"),
        cluster_counts_png(kinds, groups, out / "counts.png"),
    ]
    with_patch = [i for i, r in enumerate(recs) if r.patch is not None]
    if with_patch:
        shapes = {recs[i].patch.shape for i in with_patch}
        if len(shapes) > 1:
            raise InputError(f"patches of different sizes in the library: {sorted(shapes)}")
        paths.append(
            class_means_png(
                np.array([recs[i].patch for i in with_patch]),
                [kinds[i] for i in with_patch],
                [groups[i] for i in with_patch],
                out / "class_means.png",
                patch_pixel_size_nm=patch_pixel_size_nm,
            )
        )
    return paths
