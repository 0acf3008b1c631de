"""stm_feedback/lattice.py as it was before the speed-ups of issue 6 (branch speed3): complex exponentials,
numpy 2x2 algebra, one fit per local tile. Kept only as the reference tests/test_fast_lattice.py compares the
fast implementation with; not used by the package.

The original module docstring follows.

Dimer-row lattice of one terrace: row direction and phase fitted from detected atoms, FFT cross-check.

Convention (README): rows run along u = (cos a, sin a) in the image frame (x right, y down, degrees, a in
[0, 180)); with n = (-sin a, cos a) the row centre lines are the points p (nm) with p . n == row_phase_nm
(mod 0.768 nm). The two atoms of a dimer sit at +-0.12 nm along n around their row centre line and consecutive
dimers on a row are 0.384 nm apart along u.

Method (the paper proposes atoms in place of Fourier analysis): the angle that maximises the row coherence
|mean exp(2 pi i p.n / 0.768)|^2 over the atoms: a 0.5 deg grid on <= 300 atoms (+-10 deg around the direction
of the nearest-neighbour dimer bonds when those agree and the peak found there is strong and interior, else
all of [0, 180)), then Newton steps with analytic derivatives on <= 1500 atoms; the phase from the argument
of that sum over all atoms. Only the row period enters the fit: under drift shear the along-row (0.384 nm)
direction is not perpendicular to n, and nearest-neighbour pair directions were measured 7 deg off on a
drifting simulated frame (seed 1000004), which is why the bond direction is only a search prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, SURFACE_LATTICE_NM

MIN_ATOMS_FOR_FIT = 8
PRIOR_MIN_COHERENCE = 0.5  # normalised coherence the bond-prior window must reach to be trusted


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


def _row_sums(angles_deg: np.ndarray, xy_nm: np.ndarray) -> np.ndarray:
    """mean exp(2 pi i p.n / 0.768) for each candidate angle (A,) -> complex (A,)."""
    a = np.deg2rad(np.asarray(angles_deg, float))
    n = np.stack([-np.sin(a), np.cos(a)], axis=1)  # (A, 2)
    return np.exp((2j * np.pi / ROW_SPACING_NM) * (xy_nm @ n.T)).mean(axis=0)


def _row_coherence(angles_deg: np.ndarray, xy_nm: np.ndarray) -> np.ndarray:
    """|mean exp(2 pi i p.n / 0.768)|^2 for each candidate angle (A,) -> (A,)."""
    return np.abs(_row_sums(angles_deg, xy_nm)) ** 2


def bond_prior_deg(
    bonds_nm: np.ndarray, min_bonds: int = MIN_ATOMS_FOR_FIT, min_resultant: float = 0.6
) -> float | None:
    """Row angle (deg, [0, 180)) implied by dimer bond vectors (M, 2) in nm (they run along n), or None when
    there are fewer than ``min_bonds`` or they do not agree (mean resultant length of the doubled angles <
    ``min_resultant``)."""
    v = np.asarray(bonds_nm, float).reshape(-1, 2)
    if len(v) < min_bonds:
        return None
    z = np.mean(np.exp(2j * np.arctan2(v[:, 1], v[:, 0])))
    if abs(z) < min_resultant:
        return None
    return float(np.rad2deg(np.angle(z) / 2) - 90.0) % 180.0


def nn_bonds_nm(xy_nm: np.ndarray) -> np.ndarray:
    """Vectors (M, 2) from each atom to its nearest neighbour where that is 0.24 +- 0.1 nm away (a bond)."""
    if len(xy_nm) < 2:
        return np.empty((0, 2))
    d, j = cKDTree(xy_nm).query(xy_nm, k=2, distance_upper_bound=DIMER_ATOM_SEPARATION_NM + 0.1)
    ok = np.isfinite(d[:, 1]) & (np.abs(d[:, 1] - DIMER_ATOM_SEPARATION_NM) < 0.1)
    return xy_nm[j[ok, 1]] - xy_nm[ok]


def _coherence_terms(a_deg: float, xy_c: np.ndarray) -> tuple[float, float, float]:
    """C(a) = |Z(a)|^2 and its first and second derivatives (per radian) at one angle, analytically:
    Z(a) = mean exp(i k s_j), s_j = p_j . n(a), ds/da = -p_j . u(a), d2s/da2 = -s_j, k = 2 pi / 0.768 nm."""
    k = 2 * np.pi / ROW_SPACING_NM
    a = np.deg2rad(a_deg)
    s = xy_c @ np.array([-np.sin(a), np.cos(a)])
    t = xy_c @ np.array([np.cos(a), np.sin(a)])
    e = np.exp(1j * k * s)
    z = e.mean()
    kt = k * t
    z1 = -1j * (e * kt).mean()  # dZ/da
    z2 = -(e * kt * kt).mean() - 1j * k * (e * s).mean()  # d2Z/da2
    return abs(z) ** 2, 2 * (np.conj(z) * z1).real, 2 * (abs(z1) ** 2 + (np.conj(z) * z2).real)


def _newton_refine(angle_deg: float, xy_c: np.ndarray, max_step_deg: float, iters: int = 8) -> float:
    """Maximise the row coherence near ``angle_deg`` by Newton steps (clamped to ``max_step_deg``, uphill
    only: a step that lowers C is halved up to 4 times, then the search stops)."""
    a = angle_deg
    c, c1, c2 = _coherence_terms(a, xy_c)
    lim = np.deg2rad(max_step_deg)
    for _ in range(iters):
        step = float(np.clip(-c1 / c2 if c2 < 0 else np.sign(c1) * lim, -lim, lim))
        for _ in range(4):
            c_new, c1_new, c2_new = _coherence_terms(a + np.rad2deg(step), xy_c)
            if c_new >= c:
                break
            step /= 2
        else:
            break
        a, c, c1, c2 = a + np.rad2deg(step), c_new, c1_new, c2_new
        if abs(np.rad2deg(step)) < 1e-5:
            break
    return a


def refine_wavevector(xy_c: np.ndarray, k0_per_nm: np.ndarray, iters: int = 6) -> np.ndarray:
    """Wave vector k (2,) in cycles/nm maximising |mean exp(2 pi i k.p)|^2 over points ``xy_c`` (N, 2) nm
    (centred), by 2-D Newton steps from ``k0_per_nm`` with analytic derivatives; a step is clamped to 2 % of
    |k| and halved (up to 4 times) while it lowers the coherence; the search stops when the Hessian is not
    negative definite (not at a peak), no halving helps, or the step is tiny.

    Why free |k|: under drift the image rows are not 0.768 nm apart, and on an elongated terrace the peak of
    the fixed-|k| coherence then sits off the true direction (median row-angle error vs truth on the 48
    realistic-suite terraces, truth atom positions: 0.188 deg fixed |k|, 0.169 deg free)."""
    k = np.asarray(k0_per_nm, float).copy()
    tau = 2 * np.pi
    e = np.exp(1j * tau * (xy_c @ k))
    z = e.mean()
    for _ in range(iters):
        pe = xy_c * e[:, None]  # (N, 2)
        g = 1j * tau * pe.mean(axis=0)  # dZ/dk
        h2 = -(tau**2) * (xy_c.T @ pe) / len(xy_c)  # d2Z/dk2 (2, 2)
        grad = 2 * np.real(np.conj(z) * g)
        hess = 2 * np.real(np.conj(g)[:, None] * g[None, :] + np.conj(z) * h2)
        if hess[0, 0] >= 0 or np.linalg.det(hess) <= 0:
            break
        step = -np.linalg.solve(hess, grad)
        lim = 0.02 * float(np.hypot(*k))
        nrm = float(np.hypot(*step))
        if nrm > lim:
            step *= lim / nrm
        for _ in range(4):  # uphill only: halve a step that lowers the coherence
            e_new = np.exp(1j * tau * (xy_c @ (k + step)))
            z_new = e_new.mean()
            if abs(z_new) >= abs(z):
                break
            step /= 2
        else:
            break
        k, e, z = k + step, e_new, z_new
        if nrm < 1e-6 * lim:
            break
    return k


def fit_row_lattice(
    xy_nm: np.ndarray,
    min_coherence: float = 0.1,
    max_coarse_atoms: int = 300,
    max_fit_atoms: int = 1500,
    prior_deg: float | None | str = "bonds",
    refine_k: bool = False,
    full_search: bool = True,
    refine_all: bool = False,
    coarse_step_deg: float = 0.5,
) -> LatticeFit | None:
    """Fit the row angle (deg) and phase (nm) to atom positions ``xy_nm`` (N, 2) in nm of the image frame.

    The angle maximises the row coherence: a 0.5 deg grid (+-10 deg around the direction implied by the
    nearest-neighbour bonds when they agree, else all of [0, 180)) on <= ``max_coarse_atoms`` atoms, then
    Newton steps with analytic derivatives on <= ``max_fit_atoms`` atoms (deterministic strided subsamples)
    and then on all atoms.
    The phase and the residual use all atoms. ``prior_deg``: the bond direction's row angle if already
    known (``bond_prior_deg`` of the dimer pairs; None = no prior, full search), "bonds" = measure it
    here. Returns None when there are fewer than ``MIN_ATOMS_FOR_FIT`` atoms or the best normalised row
    coherence is below ``min_coherence`` (no row lattice in these points), and with ``full_search=False``
    when a prior is known but no strong interior peak lies within +-10 deg of it (no search over [0, 180)).
    ``refine_all``: after Newton on the <= ``max_fit_atoms`` subsample, Newton on all atoms too (off: on the
    cached suite maps it changed neither dimer F1 nor the row-angle errors, and cost ~1 ms per large
    terrace). ``coarse_step_deg``: step of the +-10 deg prior window. ``refine_k``: refine the angle by
    ``refine_wavevector`` (free |k|; off by default: on the realistic suite
    it changed the median row-angle error 0.213 -> 0.218 deg, hard 1.32 -> 1.21 deg, for ~0.7 ms per terrace).
    """
    xy_nm = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2)
    if len(xy_nm) < MIN_ATOMS_FOR_FIT:
        return None
    # centre the coordinates for the angle search; the phase is taken from the raw coordinates below
    xy_c = xy_nm - xy_nm.mean(axis=0)
    sub = xy_c[:: max(1, len(xy_c) // max_coarse_atoms)]
    fit_sub = xy_c[:: max(1, -(-len(xy_c) // max_fit_atoms))]
    norm = np.cos(2 * np.pi * DIMER_ATOM_SEPARATION_NM / 2 / ROW_SPACING_NM)  # |Z| of perfect rows
    prior = bond_prior_deg(nn_bonds_nm(xy_nm)) if isinstance(prior_deg, str) else prior_deg
    best = -1
    if prior is not None:  # search near the bond direction; fall back when the peak is weak or at the edge
        coarse = prior + np.arange(-10.0, 10.0 + 1e-9, coarse_step_deg)
        coh = _row_coherence(coarse, sub)
        best = int(np.argmax(coh))
        if not (0 < best < len(coarse) - 1 and np.sqrt(coh[best]) >= PRIOR_MIN_COHERENCE * norm):
            best = -1
    if best < 0:
        if not full_search and prior is not None:
            return None
        coarse = np.arange(0.0, 180.0, 0.5)
        coh = _row_coherence(coarse, sub)
        best = int(np.argmax(coh))
    # local search on the fit subsample (0.25 deg grid +-0.5 deg), Newton there, then Newton on all atoms
    # (one unchecked step was not enough: phase shifts up to 0.015 nm on 20 simulated frames)
    medium = coarse[best] + np.arange(-coarse_step_deg, coarse_step_deg + 1e-9, 0.25)
    a1 = float(medium[int(np.argmax(_row_coherence(medium, fit_sub)))])
    angle = _newton_refine(a1, fit_sub, max_step_deg=0.1)
    if len(fit_sub) < len(xy_c) and refine_all:
        angle = _newton_refine(angle, xy_c, max_step_deg=0.05, iters=4)
    if refine_k:
        _, n0 = unit_vectors(angle)
        k = refine_wavevector(fit_sub, n0 / ROW_SPACING_NM)
        if (
            abs(np.hypot(*k) * ROW_SPACING_NM - 1.0) < 0.1
        ):  # else a neighbouring peak: keep the fixed-|k| angle
            angle = float(np.rad2deg(np.arctan2(k[1], k[0]))) - 90.0
    angle %= 180.0
    _, n = unit_vectors(angle)
    s = xy_nm @ n
    z = np.mean(np.exp(2j * np.pi * s / ROW_SPACING_NM))
    phase = float(np.angle(z) / (2 * np.pi) * ROW_SPACING_NM) % ROW_SPACING_NM
    # residual: distance of each atom from the nearer of the two atom lines of its row
    off = (s - phase + ROW_SPACING_NM / 2) % ROW_SPACING_NM - ROW_SPACING_NM / 2
    half = DIMER_ATOM_SEPARATION_NM / 2
    resid = np.minimum(np.abs(off - half), np.abs(off + half))
    coherence = float(min(1.0, abs(z) / norm))
    if coherence < min_coherence:
        return None
    return LatticeFit(
        row_angle_deg=angle,
        row_phase_nm=phase,
        residual_nm=float(np.sqrt(np.mean(resid**2))),
        n_atoms=len(xy_nm),
        coherence=coherence,
    )


def _best_on_grid(
    xy_c: np.ndarray, k0: np.ndarray, max_turn_deg: float = 2.0, max_stretch: float = 0.03, n_sub: int = 150
) -> np.ndarray:
    """The wave vector of largest coherence on a 9 x 7 grid of directions (+-``max_turn_deg``) and lengths
    (+-``max_stretch``) around ``k0`` (cycles/nm), evaluated on <= ``n_sub`` of the points."""
    sub = xy_c[:: max(1, -(-len(xy_c) // n_sub))]
    turn = np.deg2rad(np.linspace(-max_turn_deg, max_turn_deg, 9))
    scale = 1.0 + np.linspace(-max_stretch, max_stretch, 7)
    t, sc = np.meshgrid(turn, scale, indexing="ij")
    c, sn = np.cos(t.ravel()), np.sin(t.ravel())
    k = np.stack([c * k0[0] - sn * k0[1], sn * k0[0] + c * k0[1]], axis=1) * sc.ravel()[:, None]  # (63, 2)
    coh = np.abs(np.exp(2j * np.pi * (sub @ k.T)).mean(axis=0))
    return k[int(np.argmax(coh))]


def undistorted_row_angle_deg(
    xy_nm: np.ndarray,
    row_angle_deg: float,
    min_along_coherence: float = 0.3,
    min_atoms: int = 50,
    max_atoms: int = 800,
) -> float | None:
    """Row angle (deg, [0, 180)) of the lattice before the scan's drift shear, or None when it cannot be
    measured (fewer than ``min_atoms`` atoms, or the along-row period is not coherent over the atoms).

    Drift during the frame maps the sample to the image by x_img = x + a y, y_img = (1 + b) y (lines are
    recorded top to bottom; the fast axis x is not distorted), so the image rows are sheared by up to ~1 deg
    on realistic frames. A wave vector's x component is the same in both frames. With the row wave vector k1
    and the along-row one k2 (0.384 nm pitch) of the atoms (``refine_wavevector`` from the best of a small
    grid around the image-frame ``row_angle_deg``), the undistorted lattice has k1 = (p1, Y1), k2 = (p2, Y2)
    with k1 . k2 = 0 and |k2| = 2 |k1|: Y1^2 = X solves 4 X^2 + (4 p1^2 - p2^2) X - p1^2 p2^2 = 0 (sign of
    Y1 as in the image), the row angle is angle(k1) - 90 deg. Independent of the pixel-size calibration;
    assumes a drift that is linear in time over the terrace (creep bends the rows: the along-row coherence
    |mean exp(2 pi i k2.p)| must reach ``min_along_coherence``, 1 = perfect).
    """
    xy = np.asarray(xy_nm, float).reshape(-1, 2)
    if len(xy) < min_atoms:
        return None
    xy_c = xy - xy.mean(axis=0)
    xy_c = xy_c[:: max(1, -(-len(xy_c) // max_atoms))]
    u, n = unit_vectors(row_angle_deg)
    # start Newton from the best of a small grid: under drift neither wave vector is where the fixed-|k| fit
    # or the image row direction puts it (without the grid for k1: realistic p90 error 0.12 -> 0.27 deg)
    k1 = refine_wavevector(xy_c, _best_on_grid(xy_c, n / ROW_SPACING_NM), iters=4)
    k2 = refine_wavevector(xy_c, _best_on_grid(xy_c, u / SURFACE_LATTICE_NM), iters=4)
    if abs(np.exp(2j * np.pi * (xy_c @ k2)).mean()) < min_along_coherence:
        return None
    p1, q1, p2 = float(k1[0]), float(k1[1]), float(k2[0])
    b = 4 * p1 * p1 - p2 * p2
    x = (-b + np.sqrt(b * b + 16 * p1 * p1 * p2 * p2)) / 8
    y1 = np.copysign(np.sqrt(max(x, 0.0)), q1)
    return float(np.rad2deg(np.arctan2(y1, p1)) - 90.0) % 180.0


def local_fits(
    xy_nm: np.ndarray,
    tile_nm: float = 5.0,
    min_atoms: int = 40,
    min_coherence: float = 0.3,
    prior_deg: float | None = None,
) -> dict[tuple[float, float], LatticeFit]:
    """Row lattice fitted separately in square tiles of ``tile_nm`` (key = (floor(x / tile), floor(y /
    tile))) with >= ``min_atoms`` atoms and a normalised coherence >= ``min_coherence``: follows rows that
    drift or creep bends across a terrace, where one straight lattice has no coherence.

    Each tile searches +-10 deg around its own dimer-bond direction, or around ``prior_deg`` (the terrace's
    global fit) when its bonds disagree; a tile without a strong peak there has no fit (no search over all
    of [0, 180): on hard-suite frames those searches on incoherent tiles cost ~50 ms per frame). Without
    any prior a tile searches all angles."""
    xy = np.asarray(xy_nm, float).reshape(-1, 2)
    out: dict[tuple[float, float], LatticeFit] = {}
    if len(xy) < min_atoms:
        return out
    keys = np.floor(xy / tile_nm)
    uniq, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    for i in np.flatnonzero(counts >= min_atoms):
        sub = xy[inv.ravel() == i]
        prior = bond_prior_deg(nn_bonds_nm(sub))
        fit = fit_row_lattice(
            sub,
            min_coherence=min_coherence,
            prior_deg=prior if prior is not None else prior_deg,
            refine_k=False,
            full_search=False,
            coarse_step_deg=1.0,
        )
        if fit is not None:
            out[(float(uniq[i, 0]), float(uniq[i, 1]))] = fit
    return out


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


@lru_cache(maxsize=16)
def _fft_ring(n_fft: int, pixel_size_nm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fy (n, 1), fx (1, n//2+1) in cycles/nm, ring mask) of an rfft2 grid; ring = 0.8-1.2 / 0.768 nm."""
    fy = np.fft.fftfreq(n_fft, d=pixel_size_nm)[:, None]
    fx = np.fft.rfftfreq(n_fft, d=pixel_size_nm)[None, :]
    k0 = 1.0 / ROW_SPACING_NM
    fr2 = fx**2 + fy**2
    return fy, fx, (fr2 > (0.8 * k0) ** 2) & (fr2 < (1.2 * k0) ** 2)


@lru_cache(maxsize=16)
def _hann2(h: int, w: int) -> np.ndarray:
    return np.outer(np.hanning(h), np.hanning(w))


def fft_row_angle_deg(
    image: np.ndarray, pixel_size_nm: float, mask: np.ndarray | None = None, pad_to: int = 256
) -> float | None:
    """Row angle (deg, [0, 180)) from the 0.768 nm row peak of the image's 2-D Fourier transform.

    ``mask`` (bool, same shape) restricts the estimate to one terrace: the transform runs on the mask's
    bounding box, pixels outside the mask set to the masked mean, Hann window, zero-padded to at least
    ``pad_to``. The peak is searched on an annulus around 1/0.768 nm^-1 (+-20 %); its wave vector is the
    row normal n, so the row angle is angle(k) - 90 deg. Sub-bin accuracy: intensity-weighted centroid of
    the 3x3 peak neighbourhood. Returns None when the rows are not resolved (pixel size > 0.3 nm or < 64
    masked pixels).
    Cost ~1.5 ms per 256x256 terrace; block-averaging 2x first was tried for speed but aliases noise into
    the annulus (p90 angle error vs truth 4.9 -> 10.7 deg on 20 simulated frames), so the pipeline runs
    this check only when asked (``PostprocessParams.fft_check``) or when a terrace has no atom fit.
    """
    img = np.asarray(image, dtype=np.float64)
    if pixel_size_nm > 0.3:
        return None
    sub: np.ndarray | None = None
    if mask is not None:
        if mask.sum() < 64:
            return None
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        img, sub = img[sl], np.asarray(mask[sl], bool)
    if sub is not None:
        img = np.where(sub, img, img[sub].mean())
    img = img - img.mean()
    h, w = img.shape
    n_fft = max(pad_to, int(2 ** np.ceil(np.log2(max(h, w)))))
    spec = np.abs(np.fft.rfft2(img * _hann2(h, w), s=(n_fft, n_fft))) ** 2  # k and -k: the same peak
    fy, fx, ring = _fft_ring(n_fft, float(pixel_size_nm))
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
