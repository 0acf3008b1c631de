"""STM imaging artefacts applied to a sampled height image (nm), pure functions on (H, W) float arrays.

Order of application (scan time, ../shared/design/hsi-physics.md section 3) is the caller's job; drift,
creep and
line jitter act on the sampling positions (simulator/scan.py), everything here acts on z.
Pixel sizes convert nm parameters to pixels; the fast axis is axis 1 (columns).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal


def tip_blur(z_nm: np.ndarray, sigma_nm: float, pixel_size_nm: float) -> np.ndarray:
    """Finite tip as a Gaussian blur of width sigma_nm (no-op below a tenth of a pixel)."""
    sigma_px = sigma_nm / pixel_size_nm
    if sigma_px < 0.1:
        return z_nm
    return ndimage.gaussian_filter(z_nm, sigma_px, mode="nearest", truncate=3.0)


def double_tip(z_nm: np.ndarray, offset_px: tuple[float, float], dz_nm: float) -> np.ndarray:
    """Two apices: constant current follows whichever is closer, z = max(z(p), z(p + offset) - dz)."""
    ghost = ndimage.shift(z_nm, (-offset_px[1], -offset_px[0]), order=1, mode="nearest")
    return np.maximum(z_nm, ghost - dz_nm)


def feedback_lag(z_nm: np.ndarray, gain: float) -> np.ndarray:
    """First-order (integral-dominated) feedback response along the fast axis: y[k] = y[k-1] + g (z[k] -
    y[k-1]).

    gain 1 tracks perfectly; lower gains smear edges in the scan direction (trace, left to right).
    """
    if gain >= 0.999:
        return z_nm
    zi = signal.lfilter_zi([gain], [1.0, gain - 1.0])[None, :] * z_nm[:, :1]
    out, _ = signal.lfilter([gain], [1.0, gain - 1.0], z_nm, axis=1, zi=zi)
    return out


def plane_tilt(
    shape: tuple[int, int], tilt_deg: float, azimuth_deg: float, pixel_size_nm: float
) -> np.ndarray:
    """Plane of slope tan(tilt) rising along the azimuth, nm, zero at the frame centre."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx -= 0.5 * (w - 1)
    yy -= 0.5 * (h - 1)
    az = np.radians(azimuth_deg)
    return np.tan(np.radians(tilt_deg)) * pixel_size_nm * (xx * np.cos(az) + yy * np.sin(az))


def background_hump(rng: np.random.Generator, shape: tuple[int, int], amp_nm: float) -> np.ndarray:
    """Broad asymmetric 2-D Gaussian (AtomAI-style background), peak amp_nm."""
    h, w = shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    sy, sx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    yy = (np.arange(h)[:, None] - cy) / sy
    xx = (np.arange(w)[None, :] - cx) / sx
    return amp_nm * np.exp(-0.5 * (yy * yy + xx * xx))


def line_offsets(rng: np.random.Generator, h: int, sigma_nm: float) -> np.ndarray:
    """Per-line z offsets (H, 1): a random walk of step sigma/3 plus occasional jumps of size ~sigma."""
    if sigma_nm <= 0:
        return np.zeros((h, 1))
    walk = np.cumsum(rng.normal(0.0, sigma_nm / 3.0, h))
    jumps = rng.normal(0.0, sigma_nm, h) * (rng.random(h) < 0.05)
    off = walk + np.cumsum(jumps)
    return (off - off.mean())[:, None]


def pink_noise(
    rng: np.random.Generator, shape: tuple[int, int], rms_nm: float, alpha: float = 1.0
) -> np.ndarray:
    """1/f^alpha noise in acquisition time (the serial pixel stream, fast axis first), scaled to rms_nm."""
    if rms_nm <= 0:
        return np.zeros(shape)
    n = shape[0] * shape[1]
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec /= f ** (alpha / 2.0)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return (x / (x.std() + 1e-12) * rms_nm).reshape(shape)


def spikes(rng: np.random.Generator, z_nm: np.ndarray, fraction: float, amp_nm: float) -> np.ndarray:
    """Salt-and-pepper spikes: a fraction of pixels jumps by +-amp_nm (copy)."""
    if fraction <= 0:
        return z_nm
    out = z_nm.copy()
    hit = rng.random(z_nm.shape) < fraction
    out[hit] += rng.choice([-1.0, 1.0], int(hit.sum())) * amp_nm * rng.uniform(0.5, 1.5, int(hit.sum()))
    return out


def scars(rng: np.random.Generator, z_nm: np.ndarray, n: int, amp_nm: float) -> tuple[np.ndarray, list[int]]:
    """n short horizontal streaks of wrong z (copy) and the lines they sit on."""
    out = z_nm.copy()
    h, w = z_nm.shape
    lines = []
    for _ in range(n):
        y = int(rng.integers(0, h))
        x0 = int(rng.integers(0, w))
        x1 = min(w, x0 + int(rng.integers(w // 16 + 1, w // 3 + 2)))
        out[y, x0:x1] += amp_nm * rng.uniform(0.5, 1.5) * float(rng.choice([-1.0, 1.0]))
        lines.append(y)
    return out, lines


BLOB_RHO_CUT = 4.0  # random_blobs_mask: ellipse radii beyond which the soft mask is taken as 0


def random_blobs_mask(
    rng: np.random.Generator, shape: tuple[int, int], n: int, radius_px: tuple[float, float]
) -> np.ndarray:
    """Smooth soft mask (0..1) made of n irregular ellipses of the given radius range, pixels."""
    h, w = shape
    mask = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(*radius_px), rng.uniform(*radius_px)
        th = rng.uniform(0, np.pi)
        # evaluated in the box where the ellipse radius rho <= BLOB_RHO_CUT; outside, the sigmoid is
        # < 1 / (1 + exp(8 (BLOB_RHO_CUT - 1))) = 4e-11 (was computed over the whole frame)
        half = BLOB_RHO_CUT * max(rx, ry)
        y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)) + 1, h)
        x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
        dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
        u = (dx * np.cos(th) + dy * np.sin(th)) / rx
        v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
        sub = mask[y0:y1, x0:x1]
        np.maximum(sub, 1.0 / (1.0 + np.exp(8.0 * (np.sqrt(u * u + v * v) - 1.0))), out=sub)
    return mask
