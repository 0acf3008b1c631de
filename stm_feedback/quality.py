"""Per-frame image quality from image and maps: atomic resolution, tip-change lines, double-tip suspicion."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.errors import InputError
from stm_feedback.preprocess import fast_median
from stm_feedback.schema import Quality

RESOLVED_MIN_FRACTION = 0.5  # atomically resolved when at least this fraction of the terrace area has atoms


def resolved_fraction(resolved: np.ndarray, terrace_labels: np.ndarray, defect_mask: np.ndarray) -> float:
    """Fraction (0..1) of terrace pixels outside defect footprints that lie near a detected atom."""
    area = (terrace_labels >= 0) & ~defect_mask
    n = int(area.sum())
    return float((resolved & area).sum() / n) if n else 0.0


# tip-change detector thresholds (robust z-scores), chosen on hard/realistic/clean suite frames 0-59 (seeds
# 1_200_000.., 1_100_000.., 1_000_000..) and measured on the others (docs/analysis-schema.md, quality section)
STREAK_Z = 14.0  # a transition line this disturbed is a tip change on its own
WEAK_STREAK_Z = 6.0  # a less disturbed line counts when the height level also jumps there
JUMP_Z = 4.0


def _row_median(a: np.ndarray) -> np.ndarray:
    """Median of each row of a 2-D array (the upper middle value for an even count): np.partition alone,
    several times cheaper than np.median on the small arrays here."""
    k = a.shape[1] // 2
    return np.partition(a, k, axis=1)[:, k]


def _median(v: np.ndarray) -> np.generic:
    """np.median of a finite 1-D array, bit for bit and as a scalar of the array's dtype (so float32
    arithmetic after it stays float32), at ~1/2 of its per-call cost on these few hundred values."""
    return v.dtype.type(fast_median(v))


def _robust_z(v: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD) of a 1-D array."""
    c = _median(v)
    return (v - c) / (1.4826 * _median(np.abs(v - c)) + 1e-12)


def _line_scores(
    height: np.ndarray, pixel_size_nm: float, block_nm: float, window_nm: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(streak_z (H,), jump_z (H,), window lines) of the scan lines; see ``tip_change_lines``."""
    h, w = height.shape
    b = max(1, min(w, int(round(block_nm / pixel_size_nm))))
    wb = w // b
    # block means along x first (all later steps are linear or robust, so this commutes with them and the
    # rest runs on a (H, W/b) array): lattice corrugation and pixel noise average out within a block
    zb = np.add.reduceat(np.asarray(height, np.float32)[:, : wb * b], np.arange(0, wb * b, b), axis=1) / b
    # second difference across lines: planes, tilt and per-line offsets cancel (offsets up to a constant per
    # line, removed by the per-line median); steps, defects and spikes touch few blocks of a line
    r = zb[2:] - 2.0 * zb[1:-1] + zb[:-2]
    r -= _row_median(r)[:, None]
    streak = np.zeros(h)
    streak[1:-1] = _robust_z(_row_median(np.abs(r)))  # typical wander of line i about its neighbours
    # level profile m from robust line-to-line offsets
    dm = _row_median(zb[1:] - zb[:-1]).astype(np.float64)
    m = np.concatenate([[0.0], np.cumsum(dm - _median(dm))])
    ww = max(2, int(round(window_nm / pixel_size_nm)))
    jump = np.zeros(h)
    i = np.arange(ww, h - _JUMP_GAP - ww + 1)
    if len(i) >= 2:
        med = _row_median(np.lib.stride_tricks.sliding_window_view(m, ww))  # med[j] = median m[j:j+ww]
        jump[i] = med[i + _JUMP_GAP] - med[i - ww]  # after the transition lines minus before the line
        core = jump[i]
        dd = np.diff(m)
        line_sigma = 1.4826 * _median(np.abs(dd - _median(dd)))
        sigma = max(1.4826 * _median(np.abs(core - _median(core))), 1.77 * line_sigma / np.sqrt(ww))
        jump /= sigma + 1e-12
    return streak, jump, ww


_JUMP_GAP = 3  # the simulator's (and typical) tip change disturbs 1-3 lines before the new level settles


def tip_change_lines(
    height: np.ndarray,
    terrace_labels: np.ndarray,
    pixel_size_nm: float,
    block_nm: float = 1.0,
    window_nm: float = 1.6,
) -> list[int]:
    """Scan-line indices (rows) where the tip changed: the first line of the new tip state.

    A tip change leaves a *disturbed transition line* (the feedback wanders while the apex rearranges) and
    usually a new height level. Per line i the second difference across lines, z[i-1] - 2 z[i] + z[i+1]
    (planes, tilt and constant line offsets cancel), is averaged in blocks of ``block_nm`` along x and its
    typical wander is median |block - line median|; ``streak_z`` is its robust z-score over the frame's lines.
    The level jump at i is median(m[i+3 : i+3+w]) - median(m[i-w : i]) of the level profile m (cumulated
    median line-to-line offsets), w = ``window_nm`` in lines, as a robust z-score (floored by the
    line-to-line scatter). A line is reported when streak_z >= STREAK_Z, or streak_z >= WEAK_STREAK_Z and a
    |jump z| >= JUMP_Z within 2 lines; of candidates closer than w lines only the most disturbed is kept.
    A pure level step without a disturbed line is not reported: per-line offsets of that size are common
    (hard preset) and are not tip changes.
    """
    h, w = height.shape
    if h < 8 or w < 2:
        return []
    streak, jump, ww = _line_scores(height, pixel_size_nm, block_nm, window_nm)
    a = np.abs(jump)
    cand = [
        i
        for i in np.flatnonzero(streak >= WEAK_STREAK_Z).tolist()
        if streak[i] >= STREAK_Z or a[max(0, i - 2) : i + 2].max() >= JUMP_Z
    ]
    out: list[int] = []
    for i in sorted(cand, key=lambda k: -streak[k]):  # the most disturbed line of a cluster wins
        if all(abs(i - k) > ww for k in out):
            out.append(int(i))
    return sorted(out)


# double-tip rule (chosen on preset seeds 300000-300059 of clean/realistic/hard with the networks' and the
# oracle's detections, measured on seeds 1300000-1300099: docs/analysis-schema.md, quality section)
DOUBLE_TIP_KINDS: tuple[str, ...] = ("protrusion",)
DOUBLE_TIP_MIN_OFFSET_NM = 0.8


def double_tip_pairs(
    defect_xy_px: np.ndarray,
    kinds: list[str],
    pixel_size_nm: float,
    min_offset_nm: float = DOUBLE_TIP_MIN_OFFSET_NM,
    max_offset_nm: float = 3.0,
    tol_nm: float = 0.2,
    min_pairs: int = 3,
    min_fraction: float = 0.3,
    copied_kinds: tuple[str, ...] = DOUBLE_TIP_KINDS,
) -> np.ndarray | None:
    """The defect pairs (P, 2) int (indices into ``defect_xy_px``) that repeat at one common offset vector,
    oriented so that xy[j] - xy[i] is that offset for every row (i, j), when they make the frame a double-tip
    frame; else None. A double tip images every raised feature twice. Only defects of ``copied_kinds``
    count: under constant current the tip follows whichever apex is closer, z = max(z(p), z(p + offset) -
    dz), so protrusions get a ghost copy and depressions are filled in, not copied. Offsets between
    ``min_offset_nm`` and ``max_offset_nm`` (nm) of same-kind defects are compared; a common offset (within
    ``tol_nm``) shared by >= ``min_pairs`` pairs and by at least ``min_fraction`` of the counted defects
    triggers. ``min_offset_nm`` is 0.8 nm because a ghost closer than a protrusion's footprint (FWHM 0.8-1.2
    nm) merges with it into one blob, while multi-dimer islands detected as several blobs give many pairs at
    the 0.38 / 0.77 nm lattice vectors by chance (28 of 100 clean frames were flagged with 0.3 nm and every
    kind)."""
    xy = np.asarray(defect_xy_px, float).reshape(-1, 2) * pixel_size_nm
    kinds_a = np.asarray(kinds, dtype=object).reshape(-1)
    if len(kinds_a) != len(xy):
        raise InputError(f"{len(xy)} defect positions but {len(kinds_a)} kinds")
    counted = np.flatnonzero(np.isin(kinds_a, list(copied_kinds)))
    xy, kinds_a = xy[counted], kinds_a[counted]
    if len(xy) < 2 * min_pairs:
        return None
    tree = cKDTree(xy)
    pairs = tree.query_pairs(max_offset_nm, output_type="ndarray")
    if len(pairs) < min_pairs:
        return None
    pairs = pairs[kinds_a[pairs[:, 0]] == kinds_a[pairs[:, 1]]]
    d = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    # orient each offset into one half-plane so (a, b) and (b, a) agree
    flip = (d[:, 1] < 0) | ((d[:, 1] == 0) & (d[:, 0] < 0))
    d[flip] *= -1
    pairs[flip] = pairs[flip][:, ::-1]
    far = np.hypot(d[:, 0], d[:, 1]) >= min_offset_nm
    d, pairs = d[far], pairs[far]
    if len(d) < min_pairs:
        return None
    near = cKDTree(d).query_ball_point(d, tol_nm)
    counts = np.array([len(x) for x in near])
    best = int(counts.argmax())
    if not (counts[best] >= min_pairs and counts[best] * 2 >= min_fraction * len(xy)):
        return None
    return counted[pairs[np.asarray(near[best], np.int64)]]


def double_tip_suspected(
    defect_xy_px: np.ndarray, kinds: list[str], pixel_size_nm: float, **rule: Any
) -> bool:
    """True when many defects come in pairs of the same kind at one common offset vector
    (``double_tip_pairs``; ``rule``: its keyword parameters)."""
    return double_tip_pairs(defect_xy_px, kinds, pixel_size_nm, **rule) is not None


def ghost_copies(pairs: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Indices of the ghost copies among double-tip ``pairs`` (``double_tip_pairs``: xy[j] - xy[i] = the
    common offset for each row (i, j)), from the detections' footprint ``area`` (any unit, e.g. nm^2).

    The second apex images every feature once more, shifted by one vector, so the ghosts are all on one side
    of the pairs. Under constant current z = max(z(p), z(p + offset) - dz): the ghost copy is lowered by dz,
    so less of it rises above the surrounding lattice and its footprint is smaller. The side whose
    footprints are the smaller ones in sum, each pair's difference relative to the pair's total area (so
    large islands do not outvote the rest), holds the ghosts; ties: the second. Why area and not the
    centre height: the centre height is one noisy, background-sensitive value and picked the wrong side on
    12 of 70 flagged training-range frames, the area sum on 5 (docs/analysis-schema.md, quality)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not len(pairs):
        return np.empty(0, np.int64)
    a = np.nan_to_num(np.asarray(area, float), nan=0.0)
    a0, a1 = a[pairs[:, 0]], a[pairs[:, 1]]
    rel = (a0 - a1) / np.maximum(np.abs(a0) + np.abs(a1), 1e-12)  # > 0: the second is the smaller
    side = 1 if rel.sum() >= 0 else 0
    return np.unique(pairs[:, side])


def assess(
    height: np.ndarray,
    terrace_labels: np.ndarray,
    resolved: np.ndarray,
    defect_mask: np.ndarray,
    double_pairs: np.ndarray | None,
    pixel_size_nm: float,
) -> Quality:
    """The frame's Quality record (see each helper for the definition); ``double_pairs``: the defects'
    ``double_tip_pairs`` (None: no double tip)."""
    frac = resolved_fraction(resolved, terrace_labels, defect_mask)
    lines = tip_change_lines(height, terrace_labels, pixel_size_nm)
    double = double_pairs is not None
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
