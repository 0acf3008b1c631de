"""Frame-to-frame drift of one instrument: the apparent motion of the surface between two scans of the same
frame, in image pixels (x right, y down), from the images and the defects both analyses found.

Why not a plain phase correlation: H-Si(100)-2x1 is a crystal. Whitening the cross-power spectrum makes the
dimer-row lattice (period 0.768 nm, 7.7 px at 0.1 nm/px) as loud as anything else in the frame, so the
correlation peak snaps to a lattice alias (a shift off by whole row periods). Here the whitened spectrum is
weighted by a Gaussian that is ~1e-3 at the row frequency ("band-limited phase correlation"): only the
non-periodic content (steps, defects, terrace heights) locates the shift. The correlation surface is then
smooth; its strongest local maxima are candidates. When two candidates are nearly equally strong the defects
both frames share decide (the candidate that pairs the most defects), and when they cannot, the estimate is
reported as ambiguous instead of picking one. A clear winner is refined by the trimmed-mean displacement of
its paired defects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import trim_mean

from stm_feedback.physics import ROW_SPACING_NM

DRIFT_MAX_PX = 256  # images are block-averaged to at most this many pixels per side before correlating
# Real-space Gaussian scale of the low-pass, in row periods: the weight at the row frequency is
# exp(-2 pi^2 0.6^2) = 8e-4 and at the dimer pitch (half the row period) 4e-13.
LOWPASS_ROW_PERIODS = 0.6
# a runner-up peak above this fraction of the best one makes the image estimate ambiguous
AMBIGUOUS_PEAK_RATIO = 0.6
MIN_PAIRS = 3  # defects needed to refine or to break a tie
# below this peak height an image estimate the defects do not confirm is not trusted (same-area rescans give
# 0.8-0.99 on clean/realistic simulated frames, 0.35-0.75 on hard ones; unrelated frames up to ~0.2)
MIN_RESPONSE = 0.5


@dataclass
class DriftEstimate:
    """Apparent motion of the surface from the previous frame to the current one.

    ``dx_px``/``dy_px`` are None when ambiguous; ``candidates_px`` lists the competing (dx, dy, peak) in
    input pixels, best first. ``response``: height of the chosen (or best) band-limited correlation peak
    (0..1; unrelated frames give ~0.01-0.03). ``method``: "image", "image+defects" (refined by paired
    defects), "defects" (a tie broken by the defects) or "ambiguous".
    """

    dx_px: float | None
    dy_px: float | None
    response: float
    method: str
    n_pairs: int = 0
    ambiguous: bool = False
    candidates_px: list[tuple[float, float, float]] = field(default_factory=list)


def drift_bin_factor(shape: tuple[int, ...]) -> int:
    """Integer block size that brings the longer side of ``shape`` to at most ``DRIFT_MAX_PX``."""
    return max(1, math.ceil(max(shape) / DRIFT_MAX_PX))


def bin_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over ``factor`` x ``factor`` pixels (edges cropped to a multiple), float32 (for speed)."""
    if factor == 1:
        return np.array(image, np.float32, copy=True)
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def remove_plane(image: np.ndarray) -> np.ndarray:
    """``image`` (float64) minus its least-squares plane: a tilt is fixed in the frame, not on the sample,
    and would pull the correlation towards zero shift.

    On a full grid the centred coordinates are orthogonal to each other and to the constant, so the
    least-squares coefficients are the mean and the two centred-coordinate projections (the normal
    equations decouple): the same plane as ``np.linalg.lstsq`` (to rounding), ~20x cheaper."""
    z = np.asarray(image, dtype=np.float64)
    h, w = z.shape
    xc = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    yc = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    sxx = float(xc @ xc) * h
    syy = float(yc @ yc) * w
    c1 = float(z.sum(axis=0) @ xc) / sxx if sxx > 0 else 0.0
    c2 = float(z.sum(axis=1) @ yc) / syy if syy > 0 else 0.0
    return z - (z.mean() + c1 * xc[None, :] + c2 * yc[:, None])


def correlation_surface(
    previous: np.ndarray, current: np.ndarray, lowpass_sigma_px: float, window: bool = True
) -> np.ndarray:
    """Band-limited phase correlation of two same-shape images, ``fftshift``-ed: the value at
    (row cy + dy, col cx + dx), with (cy, cx) = (H // 2, W // 2), scores the content having moved by
    (dx, dy) px. The whitened cross spectrum is weighted by exp(-2 pi^2 sigma^2 f^2) (f in cycles/px), the
    spectrum of a Gaussian of ``lowpass_sigma_px``, and normalised so a perfect match peaks at 1."""
    if previous.shape != current.shape or previous.ndim != 2:
        raise ValueError(f"images must be 2-D and equal in shape, got {previous.shape} and {current.shape}")
    a, b = remove_plane(previous), remove_plane(current)
    if window:
        taper = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
        a, b = a * taper, b * taper
    # real-input FFTs (half spectrum): the same surface as the full complex FFTs, at half their cost
    h, w = a.shape
    cross = np.fft.rfft2(b) * np.conj(np.fft.rfft2(a))
    cross /= np.maximum(np.abs(cross), 1e-12)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    weight = np.exp(-2.0 * np.pi**2 * lowpass_sigma_px**2 * (fx**2 + fy**2))
    weight[0, 0] = 0.0  # the mean carries no position
    # normalisation by the full spectrum's weight sum: columns 1 .. ceil(w/2)-1 stand for two columns each
    full_sum = 2.0 * weight.sum() - weight[:, 0].sum() - (weight[:, -1].sum() if w % 2 == 0 else 0.0)
    r = np.fft.irfft2(cross * weight, s=(h, w)) * (h * w / full_sum)
    return np.fft.fftshift(r)


def _peak_offset(left: float, centre: float, right: float) -> float:
    """Sub-sample vertex offset (-0.5..0.5) of a peak from three samples: Gaussian (log-parabola) fit when
    all are positive, parabola otherwise."""
    if left > 0 and centre > 0 and right > 0:
        left, centre, right = math.log(left), math.log(centre), math.log(right)
    curvature = left - 2 * centre + right
    return 0.0 if curvature >= 0 else float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))


def correlation_peaks(
    r: np.ndarray, min_separation_px: float, max_shift_px: float | None = None, k: int = 4
) -> list[tuple[float, float, float]]:
    """The ``k`` highest local maxima of a ``correlation_surface`` at least ``min_separation_px`` apart, as
    (dx_px, dy_px, height) with sub-pixel (dx, dy), highest first; ``max_shift_px`` bounds |dx| and |dy|."""
    h, w = r.shape
    size = max(3, 2 * int(math.ceil(min_separation_px)) + 1)
    is_max = (r == ndimage.maximum_filter(r, size=size, mode="wrap")) & (r > 0)
    ys, xs = np.nonzero(is_max)
    cy, cx = h // 2, w // 2
    if max_shift_px is not None:
        keep = (np.abs(ys - cy) <= max_shift_px) & (np.abs(xs - cx) <= max_shift_px)
        ys, xs = ys[keep], xs[keep]
    order = np.argsort(-r[ys, xs], kind="stable")[:k]
    out = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        oy = _peak_offset(r[(y - 1) % h, x], r[y, x], r[(y + 1) % h, x])
        ox = _peak_offset(r[y, (x - 1) % w], r[y, x], r[y, (x + 1) % w])
        out.append((x + ox - cx, y + oy - cy, float(r[y, x])))
    return out


def pair_defects(
    prev_xy: np.ndarray, cur_xy: np.ndarray, dx_px: float, dy_px: float, tol_px: float
) -> np.ndarray:
    """Displacements (K, 2) px of the defects that pair up: each previous defect moved by (dx, dy) with its
    nearest current defect within ``tol_px``, keeping mutual nearest pairs only."""
    if len(prev_xy) == 0 or len(cur_xy) == 0:
        return np.zeros((0, 2))
    moved = np.asarray(prev_xy, np.float64) + (dx_px, dy_px)
    cur = np.asarray(cur_xy, np.float64)
    d_pc, i_pc = cKDTree(cur).query(moved, distance_upper_bound=tol_px)
    _, i_cp = cKDTree(moved).query(cur, distance_upper_bound=tol_px)
    ok = np.flatnonzero(np.isfinite(d_pc))
    ok = ok[i_cp[i_pc[ok]] == ok]  # mutual nearest neighbours: one defect never pairs twice
    return cur[i_pc[ok]] - np.asarray(prev_xy, np.float64)[ok]


def estimate_drift(
    previous: np.ndarray,
    current: np.ndarray,
    pixel_size_nm: float,
    factor: int = 1,
    prev_defects_px: np.ndarray | None = None,
    cur_defects_px: np.ndarray | None = None,
    candidates: list[tuple[float, float, float]] | None = None,
) -> DriftEstimate:
    """Drift between two frames of one instrument, in input pixels.

    ``previous``/``current``: the frames already block-averaged by ``factor`` (``bin_mean``), same shape;
    ``pixel_size_nm``: of the input frames. ``*_defects_px``: (N, 2) defect centres (x_px, y_px) in input
    pixels from the two analyses (optional). See the module docstring for the method; a weak image peak
    (< ``MIN_RESPONSE``) that no defects confirm is reported as ambiguous. ``candidates``: the result of
    ``image_candidates(previous, current, pixel_size_nm, factor)`` when already computed (the daemon runs
    that image part while the frame is being analysed; the defects are known only afterwards).
    """
    if previous.shape != current.shape:
        raise ValueError(f"frames differ in shape: {previous.shape} vs {current.shape}")
    if not (pixel_size_nm > 0 and factor >= 1):
        raise ValueError(f"pixel_size_nm must be > 0 and factor >= 1, got {pixel_size_nm}, {factor}")
    cands = image_candidates(previous, current, pixel_size_nm, factor) if candidates is None else candidates
    if not cands:
        return DriftEstimate(None, None, 0.0, "ambiguous", ambiguous=True)
    prev_xy = np.zeros((0, 2)) if prev_defects_px is None else np.asarray(prev_defects_px, np.float64)
    cur_xy = np.zeros((0, 2)) if cur_defects_px is None else np.asarray(cur_defects_px, np.float64)
    # pairing tolerance: the image estimate is good to ~a pixel of the binned grid; defect centres to
    # ~0.15 nm; a third of a row period keeps neighbours on adjacent rows apart
    tol_px = max(1.5 * factor, ROW_SPACING_NM / 3.0 / pixel_size_nm)
    max_shift_px = min(previous.shape) * factor / 3.0
    rivals = [c for c in cands[1:] if c[2] >= AMBIGUOUS_PEAK_RATIO * cands[0][2]]
    contenders = [cands[0], *rivals]
    counts = [len(pair_defects(prev_xy, cur_xy, c[0], c[1], tol_px)) for c in contenders]
    vote = defect_vote(prev_xy, cur_xy, max_shift_px, tol_px)
    # pairs that many defects would also make at a random shift confirm nothing
    area_px2 = float(previous.size) * factor**2
    enough = significant_count(len(prev_xy) * len(cur_xy) * math.pi * tol_px**2 / area_px2)
    confirmed = counts[0] >= enough
    if not rivals and (confirmed or (vote is None and cands[0][2] >= MIN_RESPONSE)):
        best, method = cands[0], "image"  # a clear image peak the defects confirm or cannot contradict
    else:
        # competing image peaks, or defects that agree on a shift the best peak does not explain
        best, method = None, "defects"
        if vote is not None:
            near = [c for c in cands if math.hypot(c[0] - vote[0], c[1] - vote[1]) <= tol_px]
            best = near[0] if near else None
        elif len(contenders) > 1:
            order = np.argsort(counts)[::-1]
            if counts[order[0]] >= enough and counts[order[0]] >= 2 * counts[order[1]]:
                best = contenders[order[0]]
        if best is None:
            shown = (contenders if rivals else cands[:3]) + ([(vote[0], vote[1], 0.0)] if vote else [])
            return DriftEstimate(None, None, cands[0][2], "ambiguous", max(counts), True, shown)
    pairs = pair_defects(prev_xy, cur_xy, best[0], best[1], tol_px)
    dx, dy = best[0], best[1]
    if len(pairs) >= enough:
        # trimmed mean, not median: defect centres are often quantised to half pixels (mask centroids), and
        # the median of quantised displacements stays quantised
        dx, dy = (float(v) for v in trim_mean(pairs, 0.25, axis=0))
        method = "image+defects" if method == "image" else method
    return DriftEstimate(dx, dy, best[2], method, len(pairs), False, cands)


def image_candidates(
    previous: np.ndarray, current: np.ndarray, pixel_size_nm: float, factor: int = 1
) -> list[tuple[float, float, float]]:
    """The image part of ``estimate_drift``: the strongest peaks of the band-limited correlation of two
    binned frames (``bin_mean`` by ``factor``, same shape), as (dx_px, dy_px, height) in input pixels, best
    first. Needs no analysis, so it can run while the current frame is being analysed."""
    if previous.shape != current.shape:
        raise ValueError(f"frames differ in shape: {previous.shape} vs {current.shape}")
    if not (pixel_size_nm > 0 and factor >= 1):
        raise ValueError(f"pixel_size_nm must be > 0 and factor >= 1, got {pixel_size_nm}, {factor}")
    binned_px_nm = pixel_size_nm * factor
    sigma_px = max(1.0, LOWPASS_ROW_PERIODS * ROW_SPACING_NM / binned_px_nm)
    r = correlation_surface(previous, current, sigma_px)
    # peaks closer than ~2 sigma are one peak; shifts beyond a third of the frame leave too little overlap
    peaks = correlation_peaks(r, 2.0 * sigma_px, max_shift_px=min(previous.shape) / 3.0)
    return [(dx * factor, dy * factor, hgt) for dx, dy, hgt in peaks]


def significant_count(chance: float, trials: int = 1, alpha: float = 1e-3) -> int:
    """Smallest count of coincidences (at least ``MIN_PAIRS``) that chance, Poisson with mean ``chance`` per
    trial, exceeds with probability below ``alpha`` in the best of ``trials`` independent tries."""
    return max(MIN_PAIRS, int(poisson_isf(alpha / max(1, trials), chance)) + 1)


def poisson_isf(q: float, mu: float) -> float:
    """``scipy.stats.poisson.isf(q, mu)`` for 0 < q < 1 and mu >= 0, computed as scipy computes it there
    (``isf(q) = _ppf(1 - q)`` with Poisson's ``_ppf``: ``pdtrik``, then one ``pdtr`` step down) without
    the distribution class's argument handling, most of its time on the daemon's reply path
    (docs/performance.md, "Session 4 daemon overhead"; equal over a grid: tests/test_daemon_overhead.py)."""
    from scipy import special

    if not (0.0 < q < 1.0 and mu >= 0.0):
        from scipy.stats import poisson

        return float(poisson.isf(q, mu))
    p = np.float64(1.0) - np.float64(q)
    mu64 = np.float64(mu)
    vals = np.ceil(special.pdtrik(p, mu64))
    vals1 = np.maximum(vals - 1, 0)
    return float(np.where(special.pdtr(vals1, mu64) >= p, vals1, vals))


def defect_vote(
    prev_xy: np.ndarray, cur_xy: np.ndarray, max_shift_px: float, tol_px: float
) -> tuple[float, float, int] | None:
    """The displacement most defect pairs agree on, from the defects alone (no image): every
    previous->current displacement within ``max_shift_px`` votes for the displacements within ``tol_px`` of
    it. Returns (dx_px, dy_px, votes) for the best one (votes = its mutual pairs) if that is more than chance
    allows (Poisson, mean from the displacement density, + 4 sigma, and at least ``MIN_PAIRS``), else None."""
    if len(prev_xy) < MIN_PAIRS or len(cur_xy) < MIN_PAIRS:
        return None
    disp = np.asarray(cur_xy, np.float64)[None, :, :] - np.asarray(prev_xy, np.float64)[:, None, :]
    disp = disp.reshape(-1, 2)
    disp = disp[np.all(np.abs(disp) <= max_shift_px, axis=1)]
    if len(disp) < MIN_PAIRS:
        return None
    counts = cKDTree(disp).query_ball_point(disp, tol_px, return_length=True)
    k = int(np.argmax(counts))
    centre = np.median(disp[cKDTree(disp).query_ball_point(disp[k], tol_px)], axis=0)
    n = len(pair_defects(prev_xy, cur_xy, float(centre[0]), float(centre[1]), tol_px))
    # the best of len(disp) displacements, each of which counts itself once
    chance = len(disp) * math.pi * tol_px**2 / (2 * max_shift_px) ** 2
    if n < 1 + significant_count(chance, trials=len(disp)):
        return None
    return float(centre[0]), float(centre[1]), n
