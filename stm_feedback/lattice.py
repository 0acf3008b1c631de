"""Dimer-row lattice of one terrace: row direction and phase fitted from detected atoms, FFT cross-check.

Convention (README): rows run along u = (cos a, sin a) in the image frame (x right, y down, degrees, a in
[0, 180)); with n = (-sin a, cos a) the row centre lines are the points p (nm) with p . n == row_phase_nm
(mod 0.768 nm). The two atoms of a dimer sit at +-0.12 nm along n around their row centre line and consecutive
dimers on a row are 0.384 nm apart along u.

Method (the paper proposes atoms in place of Fourier analysis): the angle that maximises the row coherence
|mean exp(2 pi i p.n / 0.768)|^2 over the atoms (0.5 deg grid over [0, 180) on <= 300 atoms, 0.1 deg grid
+-0.75 deg on all atoms, then a bounded 1-D refinement), then the phase from the argument of that sum. Only
the row period enters: under drift shear the along-row (0.384 nm) direction is not perpendicular to n, and
nearest-neighbour pair directions were measured 7 deg off on a drifting simulated frame (seed 1000004).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM

MIN_ATOMS_FOR_FIT = 8


@dataclass(frozen=True)
class LatticeFit:
    """Fitted row lattice of one terrace (angles in degrees in [0, 180), lengths in nm)."""

    row_angle_deg: float
    row_phase_nm: float
    residual_nm: float  # RMS distance of the atoms from the nearest ideal atom line (p.n = phase +- 0.12 nm)
    n_atoms: int
    coherence: float  # 0..1, |mean exp(2 pi i p.n / 0.768)| / cos(2 pi 0.12 / 0.768): 1 = perfect rows


def unit_vectors(row_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, n): unit vector along the rows and the row normal n = (-sin a, cos a), both (2,) in (x, y)."""
    a = np.deg2rad(row_angle_deg)
    return np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])


def _row_coherence(angles_deg: np.ndarray, xy_nm: np.ndarray) -> np.ndarray:
    """|mean exp(2 pi i p.n / 0.768)|^2 for each candidate angle (A,) -> (A,)."""
    a = np.deg2rad(np.asarray(angles_deg, float))
    n = np.stack([-np.sin(a), np.cos(a)], axis=1)  # (A, 2)
    z = np.exp(2j * np.pi * (xy_nm @ n.T) / ROW_SPACING_NM).mean(axis=0)
    return np.abs(z) ** 2


def _coherence_cost(angle_deg: float, xy_nm: np.ndarray) -> float:
    return -float(_row_coherence(np.array([angle_deg]), xy_nm)[0])


def fit_row_lattice(
    xy_nm: np.ndarray, min_coherence: float = 0.1, max_coarse_atoms: int = 300
) -> LatticeFit | None:
    """Fit the row angle (deg) and phase (nm) to atom positions ``xy_nm`` (N, 2) in nm of the image frame.

    Returns None when there are fewer than ``MIN_ATOMS_FOR_FIT`` atoms or the best normalised row coherence is
    below ``min_coherence`` (no row lattice in these points).
    """
    xy_nm = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2)
    if len(xy_nm) < MIN_ATOMS_FOR_FIT:
        return None
    # centre the coordinates for the angle search; the phase is taken from the raw coordinates below
    xy_c = xy_nm - xy_nm.mean(axis=0)
    # coarse search over all directions on a deterministic subsample (peak width ~ 0.768 nm / extent rad)
    sub = xy_c[:: max(1, len(xy_c) // max_coarse_atoms)]
    coarse = np.arange(0.0, 180.0, 0.5)
    a0 = float(coarse[int(np.argmax(_row_coherence(coarse, sub)))])
    fine = a0 + np.arange(-0.75, 0.75 + 1e-9, 0.05)
    best = float(fine[int(np.argmax(_row_coherence(fine, xy_c)))])
    res = minimize_scalar(
        _coherence_cost,
        bounds=(best - 0.05, best + 0.05),
        args=(xy_c,),
        method="bounded",
        options={"xatol": 1e-4},
    )
    angle = float(res.x) % 180.0
    _, n = unit_vectors(angle)
    s = xy_nm @ n
    z = np.mean(np.exp(2j * np.pi * s / ROW_SPACING_NM))
    phase = float(np.angle(z) / (2 * np.pi) * ROW_SPACING_NM) % ROW_SPACING_NM
    # residual: distance of each atom from the nearer of the two atom lines of its row
    off = (s - phase + ROW_SPACING_NM / 2) % ROW_SPACING_NM - ROW_SPACING_NM / 2
    half = DIMER_ATOM_SEPARATION_NM / 2
    resid = np.minimum(np.abs(off - half), np.abs(off + half))
    coherence = float(min(1.0, abs(z) / np.cos(2 * np.pi * DIMER_ATOM_SEPARATION_NM / 2 / ROW_SPACING_NM)))
    if coherence < min_coherence:
        return None
    return LatticeFit(
        row_angle_deg=angle,
        row_phase_nm=phase,
        residual_nm=float(np.sqrt(np.mean(resid**2))),
        n_atoms=len(xy_nm),
        coherence=coherence,
    )


def row_offset_nm(xy_nm: np.ndarray, row_angle_deg: float, row_phase_nm: float) -> np.ndarray:
    """Signed distance (nm, in [-0.384, 0.384)) of points (N, 2) from the nearest row centre line."""
    _, n = unit_vectors(row_angle_deg)
    s = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2) @ n
    return (s - row_phase_nm + ROW_SPACING_NM / 2) % ROW_SPACING_NM - ROW_SPACING_NM / 2


def row_index(xy_nm: np.ndarray, row_angle_deg: float, row_phase_nm: float) -> np.ndarray:
    """Integer row index (N,) of points: round((p.n - phase) / 0.768 nm)."""
    _, n = unit_vectors(row_angle_deg)
    s = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2) @ n
    return np.round((s - row_phase_nm) / ROW_SPACING_NM).astype(np.int64)


def angle_diff_deg(a_deg: float, b_deg: float) -> float:
    """Smallest absolute difference of two axial angles (mod 180), degrees in [0, 90]."""
    d = (a_deg - b_deg) % 180.0
    return float(min(d, 180.0 - d))


def phase_diff_nm(
    a_nm: float, b_nm: float, a_angle_deg: float | None = None, b_angle_deg: float | None = None
) -> float:
    """Smallest absolute difference of two row phases (mod 0.768 nm).

    With both angles given, b's phase is first expressed for a's orientation: the same rows described with the
    angle a + 180 have n -> -n and so phase -> -phase (this matters for angles near 0/180 deg).
    """
    if a_angle_deg is not None and b_angle_deg is not None:
        d_deg = (a_angle_deg - b_angle_deg + 90.0) % 360.0 - 90.0
        if d_deg > 90.0:
            b_nm = -b_nm
    d = (a_nm - b_nm) % ROW_SPACING_NM
    return float(min(d, ROW_SPACING_NM - d))


def fft_row_angle_deg(
    image: np.ndarray, pixel_size_nm: float, mask: np.ndarray | None = None, pad_to: int = 256
) -> float | None:
    """Row angle (deg, [0, 180)) from the 0.768 nm row peak of the image's 2-D Fourier transform.

    ``mask`` (bool, same shape) restricts the estimate to one terrace: the transform runs on the mask's
    bounding box, pixels outside the mask set to the masked mean, Hann window, zero-padded to
    at least ``pad_to``. The
    peak is searched on an annulus around 1/0.768 nm^-1 (+-20 %); its wave vector is the row normal n, so the
    row angle is angle(k) - 90 deg. Sub-bin accuracy: intensity-weighted centroid of the 3x3 peak
    neighbourhood. Returns None when the rows are not resolved (pixel size > 0.3 nm or < 64 masked pixels).
    """
    img = np.asarray(image, dtype=np.float64)
    if pixel_size_nm > 0.3:
        return None
    if mask is not None:
        if mask.sum() < 64:
            return None
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        img, sub = img[sl], mask[sl]
        img = np.where(sub, img, img[sub].mean())
    img = img - img.mean()
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    n_fft = max(pad_to, int(2 ** np.ceil(np.log2(max(h, w)))))
    spec = np.abs(np.fft.rfft2(img * win, s=(n_fft, n_fft))) ** 2  # (n, n//2+1); k and -k are the same peak
    fy = np.fft.fftfreq(n_fft, d=pixel_size_nm)[:, None]  # cycles per nm
    fx = np.fft.rfftfreq(n_fft, d=pixel_size_nm)[None, :]
    k0 = 1.0 / ROW_SPACING_NM
    fr2 = fx**2 + fy**2
    ring = (fr2 > (0.8 * k0) ** 2) & (fr2 < (1.2 * k0) ** 2)
    masked = np.where(ring, spec, 0.0)
    if not masked.any():
        return None
    iy, ix = np.unravel_index(int(np.argmax(masked)), masked.shape)
    # 3x3 neighbourhood with wrap-around in y (fftfreq order) and clipping in x
    ys = np.arange(iy - 1, iy + 2) % n_fft
    xs = np.clip(np.arange(ix - 1, ix + 2), 0, masked.shape[1] - 1)
    wgt = masked[np.ix_(ys, xs)]
    kx = float(np.sum(wgt * fx[0, xs][None, :]) / wgt.sum())
    ky = float(np.sum(wgt * fy[ys, 0][:, None]) / wgt.sum())
    return float(np.rad2deg(np.arctan2(ky, kx)) - 90.0) % 180.0
