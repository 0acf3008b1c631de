"""Per-frame image quality from image and maps: atomic resolution, tip-change lines, double-tip suspicion."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.schema import Quality

RESOLVED_MIN_FRACTION = 0.5  # atomically resolved when at least this fraction of the terrace area has atoms


def resolved_fraction(resolved: np.ndarray, terrace_labels: np.ndarray, defect_mask: np.ndarray) -> float:
    """Fraction (0..1) of terrace pixels outside defect footprints that lie near a detected atom."""
    area = (terrace_labels >= 0) & ~defect_mask
    n = int(area.sum())
    return float((resolved & area).sum() / n) if n else 0.0


def tip_change_lines(
    height: np.ndarray,
    terrace_labels: np.ndarray,
    pixel_size_nm: float,
    k_sigma: float = 8.0,
    window_nm: float = 1.6,
) -> list[int]:
    """Scan-line indices (rows) where the apparent height jumps between consecutive blocks of lines.

    Each terrace's median is removed first (steps are not tip changes), then a per-line median profile m[i] is
    built; the jump at line i is median(m[i:i+w]) - median(m[i-w:i]) with w = ``window_nm`` (two row periods,
    so rows running along x do not alias into jumps). Lines whose |jump| exceeds ``k_sigma`` robust sigmas
    (1.4826 * MAD of the jump profile) and is a local maximum are reported (first line of the new tip state).
    """
    h = height.shape[0]
    w = max(2, int(round(window_nm / pixel_size_nm)))
    if h < 2 * w + 2:
        return []
    z = height.astype(np.float64)  # a copy
    lab = terrace_labels.ravel()
    counts = np.bincount(lab + 1)  # label -1 (steps/unknown) is levelled as a group of its own too
    if np.count_nonzero(counts) == 1:
        z -= np.median(z)
    else:
        zf = z.ravel()
        for t in np.flatnonzero(counts) - 1:
            sel = lab == t
            zf[sel] -= np.median(zf[sel])
    m = np.median(z, axis=1)
    # sliding medians via a strided view (no Python loop over lines)
    win = np.lib.stride_tricks.sliding_window_view(m, w)  # (h - w + 1, w): win[j] = m[j:j+w]
    med = np.median(win, axis=1)
    jump = np.zeros(h)
    jump[w : h - w + 1] = med[w:] - med[: h - 2 * w + 1]
    core = jump[w : h - w + 1]
    sigma = 1.4826 * np.median(np.abs(core - np.median(core))) + 1e-12
    a = np.abs(jump)
    cand = np.flatnonzero(a > k_sigma * sigma)
    out: list[int] = []
    for i in cand:
        lo, hi = max(0, i - w), min(h, i + w + 1)
        if a[i] == a[lo:hi].max() and (not out or i - out[-1] > w):
            out.append(int(i))
    return out


def double_tip_suspected(
    defect_xy_px: np.ndarray,
    kinds: list[str],
    pixel_size_nm: float,
    min_offset_nm: float = 0.3,
    max_offset_nm: float = 3.0,
    tol_nm: float = 0.2,
    min_pairs: int = 3,
    min_fraction: float = 0.3,
) -> bool:
    """True when many defects come in pairs of the same kind at one common offset vector (a double tip images
    every feature twice). Offsets between ``min_offset_nm`` and ``max_offset_nm`` of same-kind defects are
    compared; a common offset (within ``tol_nm``) shared by >= ``min_pairs`` pairs and by at least
    ``min_fraction`` of the defects triggers."""
    xy = np.asarray(defect_xy_px, float).reshape(-1, 2) * pixel_size_nm
    if len(xy) < 2 * min_pairs:
        return False
    kinds_a = np.asarray(kinds, dtype=object)
    tree = cKDTree(xy)
    pairs = tree.query_pairs(max_offset_nm, output_type="ndarray")
    if len(pairs) < min_pairs:
        return False
    pairs = pairs[kinds_a[pairs[:, 0]] == kinds_a[pairs[:, 1]]]
    d = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    # orient each offset into one half-plane so (a, b) and (b, a) agree
    flip = (d[:, 1] < 0) | ((d[:, 1] == 0) & (d[:, 0] < 0))
    d[flip] *= -1
    d = d[np.hypot(d[:, 0], d[:, 1]) >= min_offset_nm]
    if len(d) < min_pairs:
        return False
    counts = np.array([len(x) for x in cKDTree(d).query_ball_point(d, tol_nm)])
    best = int(counts.max())
    return best >= min_pairs and best * 2 >= min_fraction * len(xy)


def assess(
    height: np.ndarray,
    terrace_labels: np.ndarray,
    resolved: np.ndarray,
    defect_mask: np.ndarray,
    defect_xy_px: np.ndarray,
    kinds: list[str],
    pixel_size_nm: float,
) -> Quality:
    """The frame's Quality record (see each helper for the definition)."""
    frac = resolved_fraction(resolved, terrace_labels, defect_mask)
    lines = tip_change_lines(height, terrace_labels, pixel_size_nm)
    double = double_tip_suspected(defect_xy_px, kinds, pixel_size_nm)
    notes: list[str] = []
    if frac < RESOLVED_MIN_FRACTION:
        notes.append(f"atoms resolved on {frac:.0%} of the terrace area")
    if lines:
        notes.append(f"tip change at lines {lines}")
    if double:
        notes.append("defects repeat at a constant offset: double tip suspected")
    return Quality(
        atomically_resolved=frac >= RESOLVED_MIN_FRACTION,
        resolved_fraction=round(frac, 4),
        tip_change_lines=lines,
        double_tip_suspected=double,
        notes=notes,
    )
