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


def _level_terraces(height: np.ndarray, terrace_labels: np.ndarray, max_samples: int = 16384) -> np.ndarray:
    """Height (float64) minus a least-squares plane per terrace (label -1 as a group of its own), each plane
    fitted on the terrace's pixels among a strided subsample of <= ``max_samples`` frame pixels (regions
    too small to appear in it keep their height): steps and sample tilt are not tip changes."""
    h, w = height.shape
    z = height.astype(np.float64)
    lab = terrace_labels.ravel().astype(np.int64) + 1
    sub = np.arange(0, h * w, max(1, (h * w) // max_samples))
    rr, cc = np.divmod(sub, w)
    ls, zs = lab[sub], z.ravel()[sub]
    coef = np.zeros((int(lab.max()) + 1, 3))
    for t in np.unique(ls):
        sel = ls == t
        if sel.sum() >= 3:
            a = np.stack([np.ones(int(sel.sum())), cc[sel], rr[sel]], axis=1).astype(np.float64)
            coef[t] = np.linalg.lstsq(a, zs[sel], rcond=None)[0]
        else:
            coef[t, 0] = zs[sel].mean()
    c = coef[lab].reshape(h, w, 3)
    z -= c[..., 0] + c[..., 1] * np.arange(w)[None, :] + c[..., 2] * np.arange(h)[:, None]
    return z


def tip_change_lines(
    height: np.ndarray,
    terrace_labels: np.ndarray,
    pixel_size_nm: float,
    k_sigma: float = 8.0,
    window_nm: float = 1.6,
) -> list[int]:
    """Scan-line indices (rows) where the apparent height jumps between consecutive blocks of lines.

    A plane is removed per terrace first (steps and tilt are not tip changes), then a per-line median
    profile m[i] is built; the jump at line i is median(m[i:i+w]) - median(m[i-w:i]) with w = ``window_nm``
    (two row periods, so rows running along x do not alias into jumps). Lines whose |jump| exceeds
    ``k_sigma`` robust sigmas and is a local maximum are candidates; sigma = 1.4826 * MAD of the jump
    profile, floored by the jump noise expected from the line-to-line scatter of m (a smooth profile must
    not make every wiggle significant). Each candidate is then placed at the split of m[p - w : p + w]
    that best separates the two levels (least absolute deviations): the first line of the new tip state
    (the jump profile itself is flat over +-w/2 around a step).
    """
    h = height.shape[0]
    w = max(2, int(round(window_nm / pixel_size_nm)))
    if h < 2 * w + 2:
        return []
    z = _level_terraces(height, terrace_labels)
    m = np.median(z, axis=1)
    # sliding medians via a strided view (no Python loop over lines)
    win = np.lib.stride_tricks.sliding_window_view(m, w)  # (h - w + 1, w): win[j] = m[j:j+w]
    med = np.median(win, axis=1)
    jump = np.zeros(h)
    jump[w : h - w + 1] = med[w:] - med[: h - 2 * w + 1]
    core = jump[w : h - w + 1]
    d = np.diff(m)
    line_sigma = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)
    sigma = max(1.4826 * np.median(np.abs(core - np.median(core))), 1.77 * line_sigma / np.sqrt(w)) + 1e-12
    a = np.abs(jump)
    cand = np.flatnonzero(a > k_sigma * sigma)
    out: list[int] = []
    for i in cand:
        lo, hi = max(0, i - w), min(h, i + w + 1)
        if a[i] == a[lo:hi].max() and (not out or i - out[-1] > w):
            out.append(_split_line(m, int(i), w))
    return out


def _split_line(m: np.ndarray, p: int, w: int) -> int:
    """Line k in (p - w, p + w] minimising sum |m[:k] - L| + sum |m[k:] - R| over m[p - w : p + w], with L,
    R the medians of the w lines before / after p."""
    lo, hi = max(0, p - w), min(len(m), p + w)
    seg = m[lo:hi]
    left, right = np.median(m[lo:p]), np.median(m[p:hi])
    cost_l = np.concatenate([[0.0], np.cumsum(np.abs(seg - left))])  # cost of lines [lo, lo + j) on the left
    cost_r = np.concatenate([np.cumsum(np.abs(seg - right)[::-1])[::-1], [0.0]])  # lines [lo + j, hi)
    j = int(np.argmin((cost_l + cost_r)[1:])) + 1
    return lo + j


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
