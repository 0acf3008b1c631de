"""Figures of the defect classes (the paper's Fig. 6): a hierarchical-clustering dendrogram of the defect
features, the number of defects per mean-shift cluster for each kind, and row-aligned class-mean images.

Pure functions from arrays to PNG files (matplotlib, Agg backend); ``library_figures`` reads a library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stm_feedback.classify import FEATURE_NAMES, ClusterModel
from stm_feedback.errors import InputError
from stm_feedback.physics import KINDS


def _plt():  # noqa: ANN202 - matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _leaf_labels(link: np.ndarray, groups: np.ndarray) -> dict[int, str]:
    """Per node id of a scipy linkage: "<majority group> <k>/<n>" of the defects under it."""
    n = len(groups)
    members: list[list[int]] = [[i] for i in range(n)]
    for a, b in link[:, :2].astype(int):
        members.append(members[a] + members[b])
    out = {}
    for node, idx in enumerate(members):
        names, counts = np.unique(groups[idx], return_counts=True)
        j = int(np.argmax(counts))
        out[node] = f"{names[j]} {counts[j]}/{len(idx)}"
    return out


def dendrogram_png(
    features: np.ndarray,
    kinds: Sequence[str],
    path: str | Path,
    feature_names: Sequence[str] = FEATURE_NAMES,
    max_leaves: int = 40,
    groups: Sequence[object] | None = None,
    model: ClusterModel | None = None,
) -> Path:
    """Ward dendrogram of the defects, one panel per kind, in the space the mean shift clusters them in
    (``model.standardised``: the embedding's class probabilities, or the kind's columns transformed and
    z-scored as fitted; ``model`` None fits a feature-space ``ClusterModel`` on these defects), truncated to ``max_leaves`` leaves. With ``groups`` (cluster id,
    label or true class per defect) each leaf is labelled "<majority group> <k>/<n>", else "(n)"."""
    from scipy.cluster.hierarchy import dendrogram, linkage

    x = np.asarray(features, float)
    k = np.asarray(list(kinds), dtype=object)
    if x.ndim != 2 or len(x) != len(k):
        raise InputError(f"features {x.shape} and {len(k)} kinds do not match")
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and len(g) != len(k):
        raise InputError(f"{len(g)} groups for {len(k)} defects")
    ok = np.all(np.isfinite(x), axis=1)  # undefined features are neither clustered nor drawn
    x, k = x[ok], k[ok]
    g = None if g is None else g[ok]
    if model is None:
        model = ClusterModel(feature_names=tuple(feature_names))
        if len(x):
            model.fit(x, k)
    present = [kind for kind in KINDS if (k == kind).sum() >= 2 and kind in model.kinds]
    plt = _plt()
    fig, axes = plt.subplots(
        1, max(1, len(present)), figsize=(6.5 * max(1, len(present)), 4.6), squeeze=False
    )
    for ax, kind in zip(axes[0], present, strict=False):
        sel = k == kind
        z = model.standardised(x[sel], kind)
        link = linkage(z, method="ward")
        labels = _leaf_labels(link, g[sel]) if g is not None else None
        dendrogram(
            link,
            ax=ax,
            truncate_mode="lastp" if len(z) > max_leaves else None,
            p=max_leaves,
            show_leaf_counts=True,
            leaf_rotation=90,
            leaf_font_size=6 if labels else 7,
            leaf_label_func=(lambda i, lab=labels: lab[i]) if labels else None,
            color_threshold=0.7 * link[:, 2].max(),
        )
        if model.embedded(kind):
            on = "class probabilities of the learned embedding"
            ax.set_ylabel("distance (mean-shift space: class probabilities)")
        else:
            on = ", ".join(model.feature_names[c] for c in model.columns(kind))
            ax.set_ylabel("distance (mean-shift space, standardised)")
        ax.set_title(f"{kind}s (n = {len(z)}): Ward linkage on {on}", fontsize=9)
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
    panels per kind. Each panel has its own symmetric colour scale (heights in nm relative to each patch's
    median; the range is in the title): one shared scale let a few tall clusters (gunk, 0.3-1 nm) wash out
    every other class of the kind."""
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
    fig, axes = plt.subplots(len(KINDS), ncol, figsize=(1.7 * ncol + 0.4, 2.3 * len(KINDS)), squeeze=False)
    extent_nm = p.shape[-1] * patch_pixel_size_nm
    for r, kind in enumerate(KINDS):
        items = panels[kind]
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(items):
                ax.set_axis_off()
                continue
            name, n, mean = items[c]
            lim = max(float(np.abs(mean).max()), 1e-6)
            ax.imshow(mean, cmap="afmhot", vmin=-lim, vmax=lim, extent=(0, extent_nm, extent_nm, 0))
            ax.set_title(f"{name} (n = {n})\n\u00b1{lim * 1e3:.0f} pm", fontsize=7)
        if items:
            axes[r][0].set_ylabel(f"{kind}s", fontsize=9)
    fig.suptitle(
        f"class means, dimer rows along x, {extent_nm:.1f} nm patches; colour scale per panel "
        "(dark = low, bright = high, range in pm)",
        fontsize=8,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def library_figures(
    lib: object, out_dir: str | Path, by: str = "cluster", patch_pixel_size_nm: float = 0.125
) -> list[Path]:
    """Write ``dendrogram.png``, ``counts.png`` and ``class_means.png`` of a ``DefectLibrary`` to out_dir,
    grouping by ``cluster`` (mean-shift id), ``label`` (expert/predicted name) or ``true`` (simulator class;
    "unmatched" for a detection no truth defect matched)."""
    if by not in ("cluster", "label", "true"):
        raise InputError(f"group by 'cluster', 'label' or 'true', not {by!r}")
    recs = lib.defects(with_patches=True)  # type: ignore[attr-defined]
    if not recs:
        raise InputError("the library has no defects")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [r.kind for r in recs]
    groups = [
        (r.cluster if by == "cluster" else r.label if by == "label" else (r.true_label or "unmatched"))
        for r in recs
    ]
    paths = [
        dendrogram_png(
            np.array([r.features for r in recs]),
            kinds,
            out / "dendrogram.png",
            groups=groups,
            model=lib.cluster_model(),  # type: ignore[attr-defined]
        ),
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
