"""Scan-line jitter: per-line offsets along the fast axis measured against the frame's own dimer lattice, and
the line shifts that remove them from an image and put them back into its results.

A jittered line is recorded displaced along x (the fast scan axis) by an offset of its own, so every
feature on that line appears shifted by it: an atom's blob is cut into slices that do not line up, and a
network sees broken atoms. The position of a feature in the image is the centre of its recorded blob: the
offsets of the lines it covers, weighted by its profile across them (``feature_offset_px``; the simulator's
truth uses the same convention, simulator/scan.py ``feature_pixels``). So the correction is done in three
steps: estimate each line's offset (``estimate_line_jitter``), analyse the image with the offsets removed
(``shift_lines``), and move the results back into the recorded image (``unshift_x``, ``unshift_map``).

Image axes: row = y (slow axis, one line per row), column = x (fast axis). Offsets in pixels along x; a line
with offset o shows at column x what lies at x + o of a jitter-free line (its content moved left by o).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d, median_filter

from stm_feedback.errors import InputError
from stm_feedback.lattice import ROW_SPACING_NM, SURFACE_LATTICE_NM, refine_wavevector, unit_vectors

# apparent radius (nm) of an atom across the scan lines: the profile that weights the offsets of the lines a
# feature covers (``feature_offset_px``; the simulator's atom sigmas are 0.065-0.10 nm before the tip)
FEATURE_SIGMA_NM = 0.09


@dataclass(frozen=True)
class LineJitter:
    """Per-line offsets ``offsets_px`` (H,) float64 along x (median 0: a common shift is not jitter) and
    ``gain``: how much better the lines match the lattice model at those offsets than at 0, as a fraction
    of the match at 0 summed over the lines (0 = no line moved; a few percent on jitter-free frames)."""

    offsets_px: np.ndarray
    gain: float

    @property
    def rms_px(self) -> float:
        return float(np.sqrt(np.mean(self.offsets_px**2))) if len(self.offsets_px) else 0.0


def lattice_frequencies(k1: np.ndarray, k2: np.ndarray, max_a: int = 3, max_b: int = 2) -> np.ndarray:
    """Spatial frequencies G = a k1 + b k2 (M, 2) (cycles/px, x then y) of a lattice with across-row wave
    vector ``k1`` and along-row ``k2``, one of each +-G pair (b > 0, or b = 0 and a > 0), below Nyquist
    (|G_x|, |G_y| < 0.5). a runs to 3: the two atoms of a dimer (0.24 nm apart on the 0.768 nm row period)
    put weight on the harmonics of k1, with a sign change at a = 2."""
    out = [
        a * k1 + b * k2
        for b in range(max_b + 1)
        for a in range(-max_a, max_a + 1)
        if (b > 0 or a > 0) and np.abs(a * k1 + b * k2).max() < 0.5
    ]
    return np.array(out, float).reshape(-1, 2)


def estimate_line_jitter(
    image: np.ndarray,
    terrace_labels: np.ndarray,
    atoms_xy_px: np.ndarray,
    atom_terrace: np.ndarray,
    terrace_angles_deg: dict[int, float],
    pixel_size_nm: float,
    max_offset_px: float = 5.0,
    prior: float = 0.02,
    sigma_lines: float = 12.0,
    iters: int = 3,
    min_atoms: int = 100,
    step_px: float = 0.05,
    stop_below_gain: float = 0.0,
    max_fit_atoms: int = 800,
    wavevectors_per_nm: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> LineJitter:
    """Offsets of each scan line of ``image`` (H, W) (float, rows bright, e.g. ``NetworkMaps.image_norm``).

    Per terrace with >= ``min_atoms`` detected atoms (``atoms_xy_px`` (N, 2) x_px, y_px; ``atom_terrace``
    (N,) ids; ``terrace_angles_deg``: id -> row angle): the row and along-row wave vectors are refined on the
    atoms (``lattice.refine_wavevector``), and the terrace's pixels are described by the Fourier components
    of that lattice (``lattice_frequencies``). Their amplitudes are averaged over the neighbouring lines
    (Gaussian of ``sigma_lines`` lines, the line itself left out), which follows drift and creep, and give a
    model of each line. Each line's offset maximises its correlation with its model, summed over the
    terraces it crosses, minus ``prior`` * offset^2 (px^-2) in units of the median line's best correlation:
    lines with little lattice signal (between rows, steps, defects) stay near 0. Offsets are searched on a
    ``step_px`` grid within +-``max_offset_px``; ``iters`` rounds, each with the models of the lines
    shifted back by the previous round's offsets. When the first round's gain is below
    ``stop_below_gain`` the lines are taken as jitter-free: zeros and that gain (most frames stop there).
    The wave vectors are refined on at most ``max_fit_atoms`` atoms (a random subsample, seeded), or
    taken from ``wavevectors_per_nm`` (terrace id -> image-frame k1, k2 in cycles/nm, e.g. the lattice
    fit's ``lattice.row_wavevectors``) where given.

    An offset is known only up to the lattice's period along the line: where rows run along x, a line
    shifted by one along-row period (0.384 nm) looks the same. Such a choice is harmless for the analysis
    (the shifted line is still a lattice line, and ``unshift_x`` returns features to where they were
    recorded). Returns zeros and gain 0 when no terrace qualifies.
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 2:
        raise InputError(f"image must be 2-D, got shape {img.shape}")
    h, w = img.shape
    labels = np.asarray(terrace_labels)
    if labels.shape != (h, w):
        raise InputError(f"terrace_labels shape {labels.shape} != image shape {(h, w)}")
    xy = np.asarray(atoms_xy_px, np.float64).reshape(-1, 2)
    ter = np.asarray(atom_terrace).reshape(-1)
    if len(ter) != len(xy):
        raise InputError(f"{len(xy)} atoms but {len(ter)} terrace ids")
    s = float(pixel_size_nm)
    fine = np.arange(-max_offset_px, max_offset_px + 0.5 * step_px, step_px)
    # the first round (which decides whether to go on) on a 5x coarser grid: 5x fewer model evaluations
    coarse = fine[np.abs(np.round(fine / (5 * step_px)) * 5 * step_px - fine) < 0.25 * step_px]
    xs, ys = np.arange(w), np.arange(h)
    models = []
    for tid, angle in terrace_angles_deg.items():
        sel = ter == tid
        mask = labels == tid
        if sel.sum() < min_atoms or angle is None or not np.isfinite(angle) or not mask.any():
            continue
        known = (wavevectors_per_nm or {}).get(tid)
        if known is not None:
            k1, k2 = (np.asarray(k, np.float64) * s for k in known)  # cycles/px
        else:
            p = xy[sel] * s
            if len(p) > max_fit_atoms:  # random, not strided: a raster-order stride aliases with the lattice
                p = p[np.random.default_rng(0).choice(len(p), max_fit_atoms, replace=False)]
            pc = p - p.mean(axis=0)
            u, n = unit_vectors(float(angle))
            k1 = refine_wavevector(pc, n / ROW_SPACING_NM, iters=4) * s  # cycles/px
            k2 = refine_wavevector(pc, u / SURFACE_LATTICE_NM, iters=4) * s
        g = lattice_frequencies(k1, k2)
        if not len(g):
            continue
        v = np.where(mask, img - img[mask].mean(), 0.0)
        # per line: sum_x v e^{-2 pi i G.p} (lines as recorded), (H, M); two real products, not a complex one
        ph = 2.0 * np.pi * np.outer(xs, g[:, 0])
        d = (v @ np.cos(ph) - 1j * (v @ np.sin(ph))) * np.exp(-2j * np.pi * np.outer(ys, g[:, 1]))
        models.append((d, mask.sum(axis=1).astype(np.float64), g[:, 0]))
    o = np.zeros(h)
    if not models:
        return LineJitter(o, 0.0)
    w0 = 1.0 / (np.sqrt(2.0 * np.pi) * sigma_lines)  # the centre tap of the Gaussian: the line itself
    gain = 0.0
    rows = np.arange(h)
    for it in range(iters):
        offs = coarse if it == 0 else fine
        i0 = int(np.argmin(np.abs(offs)))
        score = np.zeros((h, len(offs)))
        for d, cnt, gx in models:
            dc = d * np.exp(-2j * np.pi * np.outer(o, gx))  # each line moved back by its current offset
            num = gaussian_filter1d(dc.real, sigma_lines, axis=0, mode="constant") + 1j * gaussian_filter1d(
                dc.imag, sigma_lines, axis=0, mode="constant"
            )
            den = gaussian_filter1d(cnt, sigma_lines, mode="constant") - w0 * cnt
            amp = (num - w0 * dc) / np.maximum(den, 1e-9)[:, None]  # local lattice amplitudes per line
            # sum_x v(r, x) model_r(x + o) = 2 Re sum_G amp_G conj(d_G) e^{2 pi i G_x o}
            score += 2.0 * np.real((amp * np.conj(d)) @ np.exp(2j * np.pi * np.outer(gx, offs)))
        scale = float(np.median(np.abs(score).max(axis=1))) + 1e-12
        best = np.argmax(score / scale - prior * offs[None, :] ** 2, axis=1)
        gain = float(np.sum(score[rows, best] - score[:, i0]) / (np.sum(np.abs(score[:, i0])) + 1e-12))
        if it == 0 and gain < stop_below_gain:
            return LineJitter(np.zeros(h), gain)
        # the local models follow any smooth offset (drift, creep, or a slow walk of the estimate itself):
        # only the line-to-line part is jitter, so the running median over the model's window is removed
        o = offs[best] - median_filter(offs[best], size=int(2 * sigma_lines) + 1, mode="mirror")
        o -= np.median(o)
    return LineJitter(o, gain)


def _check_offsets(offsets_px: np.ndarray, h: int) -> np.ndarray:
    o = np.asarray(offsets_px, np.float64).reshape(-1)
    if len(o) != h or not np.all(np.isfinite(o)):
        raise InputError(f"offsets_px must be {h} finite values, got {len(o)}")
    return o


def shift_lines(image: np.ndarray, offsets_px: np.ndarray) -> np.ndarray:
    """``image`` (H, W) with line r moved right by ``offsets_px[r]`` (linear interpolation, edge pixels
    repeated): out[r, x] = image[r, x - o_r]. Undoes the jitter of ``estimate_line_jitter``'s offsets."""
    img = np.asarray(image, np.float32)
    h, w = img.shape
    o = _check_offsets(offsets_px, h)
    map_x = (np.arange(w, dtype=np.float32)[None, :] - o[:, None].astype(np.float32)).astype(np.float32)
    map_y = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w)).astype(np.float32)
    return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def feature_offset_px(
    offsets_px: np.ndarray, y_px: np.ndarray, pixel_size_nm: float, sigma_nm: float = FEATURE_SIGMA_NM
) -> np.ndarray:
    """Offset (px along x) at which a feature centred at row ``y_px`` (any shape, px) is recorded when line r
    is displaced by ``offsets_px[r]``: the mean offset of the lines it covers, weighted by a Gaussian
    profile across them (``sigma_nm``; lines outside the frame left out). A feature's slices sit at their
    own lines' offsets, so this is the centre of its recorded blob. Unlike the nearest line's offset it
    moves smoothly with y: a centre 0.1 px either side of a half row does not jump by the difference of two
    lines' offsets (several px on a strongly jittered frame), which the image cannot show."""
    o = np.asarray(offsets_px, np.float64).reshape(-1)
    y = np.asarray(y_px, np.float64)
    if not o.any() or y.size == 0:
        return np.zeros(y.shape)
    sig = float(sigma_nm) / float(pixel_size_nm)
    k = int(math.ceil(4.0 * sig))
    yf = y.reshape(-1)
    rows = np.floor(yf).astype(np.int64)[:, None] + np.arange(-k, k + 2)[None, :]
    w = np.exp(-0.5 * ((rows - yf[:, None]) / sig) ** 2) * ((rows >= 0) & (rows < len(o)))
    den = w.sum(axis=1)
    val = (w * o[np.clip(rows, 0, len(o) - 1)]).sum(axis=1)
    nearest = o[np.clip(np.rint(yf), 0, len(o) - 1).astype(np.int64)]  # a centre beyond the frame's lines
    return np.where(den > 0, val / np.where(den > 0, den, 1.0), nearest).reshape(y.shape)


def unshift_x(x_px: np.ndarray, y_px: np.ndarray, offsets_px: np.ndarray, pixel_size_nm: float) -> np.ndarray:
    """Columns of features found in a ``shift_lines`` image, back in the recorded image: x minus the
    offset its blob is recorded at (``feature_offset_px``)."""
    return np.asarray(x_px, np.float64) - feature_offset_px(offsets_px, y_px, pixel_size_nm)


def unshift_map(values: np.ndarray, offsets_px: np.ndarray, fill: int | bool | float) -> np.ndarray:
    """A per-pixel map (H, W) of a ``shift_lines`` image back on the recorded image's pixels: out[r, x] =
    values[r, round(x + o_r)], ``fill`` where that falls outside the frame (nearest pixel: labels and
    masks keep their values)."""
    v = np.asarray(values)
    h, w = v.shape
    o = _check_offsets(offsets_px, h)
    cols = np.rint(np.arange(w)[None, :] + o[:, None]).astype(np.int64)
    inside = (cols >= 0) & (cols < w)
    out = np.take_along_axis(v, np.clip(cols, 0, w - 1), axis=1)
    return np.where(inside, out, np.asarray(fill, dtype=v.dtype))
