"""Input handling of the networks: validation, per-frame normalisation, resampling, padding (pure functions).

Grid convention of every resampling here (cv2's): a frame of W px resampled to W' px maps input pixel
coordinate x to x' = (x + 0.5) * W' / W - 0.5, so resampling there and back returns to the same grid.
Heights are in nm on input; normalised images are unitless (about 0..1 between the 1st and 99th percentile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from stm_feedback.errors import InputError
from stm_feedback.physics import ROW_SPACING_NM

MIN_PIXEL_SIZE_NM = 0.005
MAX_PIXEL_SIZE_NM = 2.0
MIN_SIDE_PX = 8
MAX_SIDE_PX = 8192


def validate_frame(image: np.ndarray, pixel_size_nm: float, bias_v: float | None = None) -> np.ndarray:
    """The frame as a C-contiguous float32 (H, W) array; InputError on wrong ndim, size, non-finite values,
    absurd pixel size (outside [0.005, 2] nm/px) or a non-finite/zero bias (V)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise InputError(f"image must be 2-D (H, W), got shape {image.shape}")
    h, w = image.shape
    if min(h, w) < MIN_SIDE_PX or max(h, w) > MAX_SIDE_PX:
        raise InputError(f"image size {h}x{w} px outside [{MIN_SIDE_PX}, {MAX_SIDE_PX}] per side")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise InputError(f"image must be real numeric, got dtype {image.dtype}")
    img = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(img).all():
        raise InputError("image contains NaN or infinite values")
    try:
        s = float(pixel_size_nm)
    except (TypeError, ValueError) as e:
        raise InputError(f"pixel_size_nm must be a number, got {pixel_size_nm!r}") from e
    if not (math.isfinite(s) and MIN_PIXEL_SIZE_NM <= s <= MAX_PIXEL_SIZE_NM):
        raise InputError(f"pixel_size_nm must be in [{MIN_PIXEL_SIZE_NM}, {MAX_PIXEL_SIZE_NM}] nm, got {s!r}")
    if bias_v is not None:
        try:
            b = float(bias_v)
        except (TypeError, ValueError) as e:
            raise InputError(f"bias_v must be a number or None, got {bias_v!r}") from e
        if not math.isfinite(b) or b == 0.0:
            raise InputError(f"bias_v must be finite and non-zero, got {bias_v!r}")
    return img


def order_stats(values: np.ndarray, ks: np.ndarray | list[int]) -> np.ndarray:
    """Exact order statistics: ``np.sort(values.ravel())[ks]`` (same dtype) without sorting everything.

    Each k is bracketed between two order statistics of a strided sample (about 2000 values), only the
    values inside the bracket are sorted, and the count of values below the bracket places them; a
    bracket that misses (checked by that count) falls back to a single-k ``np.partition``. Exact for any
    input, ties included; about 0.1 ms for 65k float32 values instead of 0.5-1 ms per k for
    ``np.percentile`` / ``np.median`` (which partition for several k at once). NaNs are not supported."""
    v = np.ravel(values)
    n = v.size
    k_arr = np.asarray(ks, dtype=np.int64).reshape(-1)
    if n <= 4096:
        return np.sort(v)[k_arr]
    step = (n // 2048) | 1  # odd: a stride coprime with power-of-two row widths samples every column
    samp = np.sort(v[::step])
    m = samp.size
    out = np.empty(k_arr.size, v.dtype)
    band: np.ndarray | None = None
    below = 0
    for i in np.argsort(k_arr, kind="stable").tolist():  # ascending k: neighbouring ks share one bracket
        k = int(k_arr[i])
        if band is None or not (below <= k < below + band.size):
            q = k / (n - 1)
            j = q * (m - 1)
            margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0  # ~4 sd of the sample rank, plus slack
            j_lo, j_hi = int(math.floor(j - margin)), int(math.ceil(j + margin))
            sel = None
            below = 0
            if j_lo >= 0:
                sel = v >= samp[j_lo]
                below = n - int(np.count_nonzero(sel))
            if j_hi < m:
                le = v <= samp[j_hi]
                sel = le if sel is None else np.logical_and(sel, le, out=sel)
            band = np.compress(sel, v) if sel is not None else v
            if not (below <= k < below + band.size):  # the sample misled the bracket: exact fallback
                out[i] = np.partition(v, k)[k]
                band = None
                continue
        kk = k - below
        out[i] = np.partition(band, kk)[kk]  # one k per call: numpy's fast (SIMD) selection path
    return out


def fast_percentiles(values: np.ndarray, pcts: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(values, pcts)`` (method "linear"), bit for bit, from ``order_stats``. float64 (P,)."""
    v = np.ravel(values)
    n = v.size
    # numpy's virtual index (n - 1) * q, its floor/ceil neighbours and _lerp, in the same dtypes
    q = np.true_divide(np.asarray(pcts, dtype=np.float64), 100)
    virt = (n - 1) * q
    prev = np.floor(virt).astype(np.int64)
    nxt = np.minimum(prev + 1, n - 1)
    stats = order_stats(v, np.concatenate([prev, nxt]))
    a, b = stats[: len(prev)], stats[len(prev) :]
    gamma = virt - prev
    diff_b_a = b - a
    res = np.add(a, diff_b_a * gamma)
    np.subtract(b, diff_b_a * (1 - gamma), out=res, where=gamma >= 0.5, casting="unsafe")
    return res


def fast_median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a finite array, bit for bit (the mean of the two middle values in
    the array's dtype), from ``order_stats``."""
    v = np.ravel(values)
    n = v.size
    ks = [n // 2 - 1, n // 2] if n % 2 == 0 else [(n - 1) // 2]
    return float(np.mean(order_stats(v, ks)))


def row_medians(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=1)`` of a finite 2-D array, bit for bit: a full sort of each row (SIMD
    sort of a few hundred values is ~10x faster than numpy's multi-k partition that np.median uses)."""
    srt = np.sort(values, axis=1)
    w = srt.shape[1]
    mid = srt[:, w // 2 - 1 : w // 2 + 1] if w % 2 == 0 else srt[:, w // 2 : w // 2 + 1]
    return np.mean(mid, axis=1)


def _blur_x(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur along x only (reflect border), float32: the same numbers as
    ``cv2.GaussianBlur(img, (0, 0), sigmaX=sigma_px, sigmaY=1e-3)`` (whose y kernel is a single 1) without
    its vertical pass."""
    ksize = max(1, int(round(sigma_px * 4 * 2 + 1)) | 1)  # OpenCV's kernel size for float images
    kx = cv2.getGaussianKernel(ksize, sigma_px, cv2.CV_32F)
    return cv2.sepFilter2D(img, cv2.CV_32F, kx, _ONE_TAP, borderType=cv2.BORDER_REFLECT)


_ONE_TAP = np.ones((1, 1), np.float32)


def level_plane_lines(
    image: np.ndarray, smooth_px: float = 0.0, pixel_size_nm: float | None = None
) -> np.ndarray:
    """Remove a plane (median x/y slopes, robust to steps) and per-line offsets (median of the differences
    to the previous line, Gwyddion-style). Same units as the input (nm); float32 (H, W).

    The medians are taken on a copy blurred along x with ``smooth_px`` (px): the dimer-row lattice makes raw
    differences arcsine-distributed, whose median is ill-determined; a blur of ~0.4 nm removes the lattice.
    """
    img = image.astype(np.float32, copy=False)
    h, w = img.shape
    est = img
    if smooth_px > 0:
        est = _blur_x(img, float(smooth_px))
    # exact medians (fast_median / row_medians equal np.median bit for bit, at a fraction of its cost)
    sx = fast_median(np.diff(est, axis=1))
    sy = fast_median(np.diff(est, axis=0))
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    plane = sx * xx + sy * yy
    # per-line offsets: the median difference to the previous line is that line's jump (steps barely move it)
    lev = est - plane
    d = row_medians(lev[1:] - lev[:-1])
    offsets = np.concatenate([[0.0], np.cumsum(d)]).astype(np.float32)
    if pixel_size_nm:
        # a step edge parallel to the scan lines is a per-line offset too: keep it (a sustained jump of about
        # a step height), and the dimer-row corrugation of rows parallel to the lines (the row band)
        if KEEP_STEP_JUMPS:
            offsets = offsets - step_jumps(offsets, pixel_size_nm, img - plane)
        offsets = offsets - row_band(offsets, pixel_size_nm)
    return (img - plane - offsets[:, None]).astype(np.float32)


# Off: with the shipped NN-0 (trained on frames levelled without it) keeping the jumps did not help. Hard
# suite, `stm-feedback evaluate --suite hard --method nets --n 30`: terrace ARI 0.669 -> 0.661; seed 1200002
# (a real step along the lines, kept) still 1 terrace found, seed 1200003 (a kept jump that is no full step)
# ARI 0.998 -> 0.754. Turn on together with an NN-0 trained on frames levelled this way.
KEEP_STEP_JUMPS = False
STEP_KEEP_MIN_NM = 0.075  # line medians catch ~2/3 of a rough 0.136 nm step; offset wander rarely this
STEP_KEEP_PERSIST_NM = 1.0  # the jump must hold over this many nm of lines on both sides
STEP_KEEP_NOISE_FACTOR = 6.0  # ... and at least this many robust sigmas of the line-to-line differences
STEP_KEEP_MAX_ONE_LINE = 0.6  # ... and no single line may carry more than this fraction of it (tip change)


def step_jumps(
    offsets_nm: np.ndarray, pixel_size_nm: float, image_nm: np.ndarray | None = None
) -> np.ndarray:
    """The step-edge part of a per-line offset profile (nm, one value per scan line): sustained jumps of at
    least STEP_KEEP_MIN_NM between the medians of the STEP_KEEP_PERSIST_NM of lines before and after a line,
    as a piecewise-constant profile (0 before the first jump). A step edge running along the scan lines is
    such a jump; levelling that removed it would erase the step (NN-0 could not see it). Jumps made within
    a single line (> STEP_KEEP_MAX_ONE_LINE of it: a tip change, or an edge straighter than any real one)
    are left to the levelling. With ``image_nm`` (the frame, lines = rows of the array) a jump is kept only
    where the dimer rows turn by ~90 deg across it, as they do across a single-height step (not across a tip
    change or line-offset wander). Same shape as the input; zeros when there is no such jump."""
    n = len(offsets_nm)
    p = max(3, int(round(STEP_KEEP_PERSIST_NM / pixel_size_nm)))
    out = np.zeros_like(offsets_nm)
    if n < 2 * p + 1:
        return out
    # med[i]: lines i..i+p-1 (row_medians = np.median(..., axis=1) bit for bit, without its slow partition)
    med = row_medians(np.lib.stride_tricks.sliding_window_view(offsets_nm, p))
    jump = np.zeros(n)
    jump[p : n - p + 1] = med[p:] - med[: n - 2 * p + 1]  # after line y minus before it
    mag = np.abs(jump)
    d_all = np.diff(offsets_nm)
    # frames in other units than nm (raw DAC counts, 8-bit exports): a floor from the line-to-line noise
    noise = 1.4826 * fast_median(np.abs(d_all - fast_median(d_all)))
    thr = max(STEP_KEEP_MIN_NM, STEP_KEEP_NOISE_FACTOR * noise)
    cand = (mag >= thr) & (mag >= ndimage.maximum_filter1d(mag, 2 * p + 1))
    # a clean jump gives a plateau of equal maxima ~p lines wide: one step at the centre of each run
    runs, n_runs = ndimage.label(cand)
    d = np.abs(np.diff(offsets_nm, prepend=offsets_nm[0]))  # d[y]: line y minus line y - 1
    for sl in ndimage.find_objects(runs):
        y = (sl[0].start + sl[0].stop - 1) // 2
        # a tip change jumps within one line; a real edge is rough (kinks), so its jump spreads over lines
        if d[max(0, y - p) : y + p + 1].max() > STEP_KEEP_MAX_ONE_LINE * abs(jump[y]):
            continue
        if image_nm is not None and not rows_turn_across_line(image_nm, y, pixel_size_nm, p):
            continue
        out[y:] += jump[y]
    return out


ROW_PEAK_MIN_SNR = 8.0  # row peak power vs the median of the 0.768 nm ring: rows resolved in a strip


def row_peak_angle_deg(strip: np.ndarray, pixel_size_nm: float) -> float | None:
    """Angle (deg, [0, 180)) of the dimer-row wave vector in a strip of the frame (its 2-D Fourier peak on
    the 1/0.768 nm ring, +-20 %), or None when no peak stands ROW_PEAK_MIN_SNR above the ring's median."""
    h, w = strip.shape
    if h < 8 or w < 8:
        return None
    a = (strip - strip.mean()) * np.outer(np.hanning(h), np.hanning(w))
    spec = np.abs(np.fft.rfft2(a, s=(2 * h, w))) ** 2  # zero-padded in y: the strips are short
    fy = np.fft.fftfreq(2 * h, d=pixel_size_nm)[:, None]
    fx = np.fft.rfftfreq(w, d=pixel_size_nm)[None, :]
    fr = np.hypot(fx, fy) * ROW_SPACING_NM
    ring = (fr > 0.8) & (fr < 1.2)
    if ring.sum() < 8:
        return None
    vals = spec[ring]
    k = int(np.argmax(vals))
    if vals[k] < ROW_PEAK_MIN_SNR * float(np.median(vals)):
        return None
    ky, kx = np.broadcast_to(fy, spec.shape)[ring][k], np.broadcast_to(fx, spec.shape)[ring][k]
    return float(np.rad2deg(np.arctan2(ky, kx))) % 180.0


def rows_turn_across_line(image_nm: np.ndarray, y: int, pixel_size_nm: float, gap_px: int) -> bool:
    """True when the dimer rows in the ~3 nm of lines above line ``y`` and below it (``gap_px`` lines left
    out either side) differ in direction by 65-90 deg: the signature of a single-height step."""
    n = max(16, int(round(3.0 / pixel_size_nm)))
    above = image_nm[max(0, y - gap_px - n) : max(0, y - gap_px)]
    below = image_nm[y + gap_px : y + gap_px + n]
    a, b = row_peak_angle_deg(above, pixel_size_nm), row_peak_angle_deg(below, pixel_size_nm)
    if a is None or b is None:
        return False
    diff = abs(a - b) % 180.0
    return min(diff, 180.0 - diff) >= 65.0  # the angle between two directions is at most 90 deg


ROW_BAND_HARMONICS = 2  # corrugation across the rows: 0.768 nm period and its first harmonic
ROW_BAND_MIN_SNR = 20.0  # peak power in a band vs the median power next to it, to call the rows aligned
ROW_BAND_REL_WIDTH = 0.06  # +-6 %: piezo calibration, drift (rows > ~2 deg off the lines average out)


def row_band(offsets: np.ndarray, pixel_size_nm: float) -> np.ndarray:
    """The part of a per-line offset profile (one value per scan line, any units) at the dimer-row spatial
    frequencies across the lines (k / 0.768 nm, k = 1..2, +-6 %): for rows parallel to the scan lines, that
    part is the row corrugation, not a scan artefact, so levelling must not remove it. Same shape and units as
    ``offsets``; zeros when the lines are too few to resolve the band or the band holds no row peak (power
    < ROW_BAND_MIN_SNR x the median power of the frequencies next to it: oblique rows, only jitter there)."""
    n = len(offsets)
    if n < 16:
        return np.zeros_like(offsets)
    t = np.arange(n, dtype=np.float64)
    trend = np.polyval(np.polyfit(t, offsets, 1), t)  # a linear trend would leak into every band
    spec = np.fft.rfft(offsets - trend)
    f = np.fft.rfftfreq(n, d=pixel_size_nm)  # cycles per nm across the lines
    f_row = 1.0 / ROW_SPACING_NM
    power = np.abs(spec) ** 2
    keep = np.zeros(len(f), bool)
    for k in range(1, ROW_BAND_HARMONICS + 1):
        dist = np.abs(f - k * f_row)
        band = dist <= ROW_BAND_REL_WIDTH * k * f_row + 1.0 / (n * pixel_size_nm)
        # the noise floor next to the band (offsets often wander like 1/f noise: a global median would not do)
        near = (dist <= 0.4 * k * f_row) & ~band
        if band.any() and near.sum() >= 4:
            if power[band].max() >= ROW_BAND_MIN_SNR * max(fast_median(power[near]), 1e-30):
                keep |= band
    if not keep.any():  # no row peak: only scan-line jitter there (rows oblique to the lines average out)
        return np.zeros_like(offsets)
    return np.fft.irfft(np.where(keep, spec, 0), n).astype(offsets.dtype)


def percentile_scale(image: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Map the lo/hi percentiles to 0/1 (float32, unclipped). A flat frame maps to zeros.
    (Percentiles from ``fast_percentiles``: the same numbers as np.percentile.)"""
    lo, hi = fast_percentiles(image, (lo_pct, hi_pct))
    span = float(hi - lo)
    if span <= 1e-12:
        return np.zeros_like(image, dtype=np.float32)
    # (image - lo) / span in float64 as before (the same float32 result), one temporary instead of two
    out = np.subtract(image, lo, dtype=np.float64)
    out /= span
    return out.astype(np.float32)


LEVEL_SMOOTH_NM = 0.4  # blur (along x) of the copy the levelling estimates come from


def normalize_frame(image_nm: np.ndarray, pixel_size_nm: float | None = None) -> np.ndarray:
    """Per-frame normalisation (never per batch): plane + line levelling (estimated on a copy blurred by
    0.4 nm along x when pixel_size_nm is given), then 1-99 percentile scaling, clipped to [-0.5, 1.5] so
    spikes cannot dominate. Unitless float32 (H, W)."""
    smooth_px = LEVEL_SMOOTH_NM / pixel_size_nm if pixel_size_nm else 0.0
    return np.clip(percentile_scale(level_plane_lines(image_nm, smooth_px, pixel_size_nm)), -0.5, 1.5)


LOWPASS_EXACT_BELOW_PX = 8.0  # Gaussian low-pass widths (px) below this are computed exactly


def gaussian_lowpass(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of width sigma_px (px, reflect border), float32 (H, W).

    Wide blurs (sigma_px >= 8) are computed at half resolution: area-average 2x2, blur with the width
    that, with the variance the averaging (f^2 - 1)/12 and the bilinear upsampling (~f^2/6) add, makes up
    sigma_px, upsample bilinearly. That is ~6x cheaper (0.15 instead of 0.9 ms for sigma 10 px on 256 px) and
    differs from the exact blur by ~5e-4 on normalised frames (0..1; bound 2e-3 in tests/test_fast_paths.py),
    below the bf16 rounding of the net inputs (~4e-3). Narrower blurs are exact (cv2.GaussianBlur)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    h, w = img.shape
    if sigma_px < LOWPASS_EXACT_BELOW_PX or min(h, w) < 16:
        return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REFLECT)
    hs, ws = (h + 1) // 2, (w + 1) // 2
    fy, fx = h / hs, w / ws
    small = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
    sig_x = math.sqrt(sigma_px**2 - (fx * fx - 1) / 12 - fx * fx / 6) / fx
    sig_y = math.sqrt(sigma_px**2 - (fy * fy - 1) / 12 - fy * fy / 6) / fy
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sig_x, sigmaY=sig_y, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def highpass(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Subtract a Gaussian blur of width sigma_px (px; ``gaussian_lowpass``) and rescale by percentiles
    (removes steps and background larger than ~sigma). sigma_px <= 0 returns the image unchanged."""
    if sigma_px <= 0:
        return image
    low = gaussian_lowpass(image, sigma_px)
    return np.clip(percentile_scale(image - low), -0.5, 1.5)


def resampled_shape(shape: tuple[int, int], from_px_nm: float, to_px_nm: float) -> tuple[int, int]:
    """(H', W') covering the same area at pixel size to_px_nm (at least 1 px per side)."""
    f = from_px_nm / to_px_nm
    return max(1, int(round(shape[0] * f))), max(1, int(round(shape[1] * f)))


def resize(image: np.ndarray, shape: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """Resample a 2-D float32 array to shape (H', W') with cv2 (area averaging when shrinking and
    antialias is set, else bilinear). Grid convention: module docstring."""
    h, w = image.shape[:2]
    if (h, w) == tuple(shape):
        return image
    shrinking = shape[0] < h or shape[1] < w
    interp = cv2.INTER_AREA if (shrinking and antialias) else cv2.INTER_LINEAR
    return cv2.resize(image, (int(shape[1]), int(shape[0])), interpolation=interp)


def map_coords(xy_px: np.ndarray, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates (N, 2) as (x, y) in a (H, W) grid mapped into the resampled (H', W') grid."""
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    fx = to_shape[1] / from_shape[1]
    fy = to_shape[0] / from_shape[0]
    return np.stack([(xy[:, 0] + 0.5) * fx - 0.5, (xy[:, 1] + 0.5) * fy - 0.5], axis=1)


@dataclass(frozen=True)
class Padding:
    """Pixels added on each side by ``pad_to_multiple`` (top, bottom, left, right)."""

    top: int
    bottom: int
    left: int
    right: int


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, Padding]:
    """Reflect-pad (H, W) so both sides are multiples of ``multiple`` (and at least ``multiple``);
    the padding is split evenly on both sides. Returns the padded array and the padding."""
    if multiple < 1:
        raise InputError(f"multiple must be >= 1, got {multiple}")
    h, w = image.shape[:2]
    th = max(multiple, -(-h // multiple) * multiple)
    tw = max(multiple, -(-w // multiple) * multiple)
    ph, pw = th - h, tw - w
    pad = Padding(ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    if ph == 0 and pw == 0:
        return image, pad
    # BORDER_REFLECT_101 fails when padding exceeds the side; fall back to a symmetric numpy pad then
    if max(ph, pw) < min(h, w):
        out = cv2.copyMakeBorder(image, pad.top, pad.bottom, pad.left, pad.right, cv2.BORDER_REFLECT_101)
    else:
        out = np.pad(image, ((pad.top, pad.bottom), (pad.left, pad.right)), mode="symmetric")
    return out, pad


def crop_padding(array: np.ndarray, pad: Padding) -> np.ndarray:
    """Undo ``pad_to_multiple`` on the last two axes."""
    h, w = array.shape[-2:]
    return array[..., pad.top : h - pad.bottom, pad.left : w - pad.right]


def estimate_rows_dark(
    image_norm: np.ndarray, atom_prob: np.ndarray, threshold: float = 0.5, window_px: int = 5
) -> bool | None:
    """Polarity guess from an atom map computed on the raw (non-inverted) frame: True when the image is
    darker at atom-map peaks than its surroundings (empty states: rows dark), False when brighter (filled
    states), None when there are too few confident atom pixels to tell (keep the raw image then).
    ``window_px``: side of the box whose mean is the "surroundings" (about half a row period)."""
    sel = atom_prob > threshold
    if int(sel.sum()) < 8:
        return None
    local = cv2.blur(image_norm, (window_px, window_px), borderType=cv2.BORDER_REFLECT)
    return bool(float(np.mean(image_norm[sel] - local[sel])) < 0.0)


def net_input(image_norm: np.ndarray, highpass_sigma_px: float) -> np.ndarray:
    """Last step before a net, shared by training and inference: the (resampled, possibly augmented)
    normalised image, high-passed when highpass_sigma_px > 0, else re-scaled to 1-99 percentiles, clipped."""
    if highpass_sigma_px > 0:
        return highpass(image_norm, highpass_sigma_px)
    return np.clip(percentile_scale(image_norm), -0.5, 1.5)
