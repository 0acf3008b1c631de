"""Classical (no deep learning) analyzer of H-Si(100)-2x1 frames: the bar the networks must beat.

``analyze_baseline(image_nm, pixel_size_nm, bias_v) -> Analysis``, same contract as the pipeline. Steps:

1. levelling: plane from the median x/y slopes (robust to steps), then per-line offsets by the median of
   differences to the previous line (Gwyddion's "median of differences");
2. terraces: gradient magnitude of the levelled image smoothed at ``terrace_sigma_nm`` (rows vanish at that
   scale, 0.136 nm steps do not); low-gradient connected components are terraces, everything else is given the
   nearest terrace label and a thin band along label boundaries is set to -1 (step edge);
3. row angle and phase per terrace: coarse peak of the zero-padded 2-D FFT in the annulus near 1/0.768 nm^-1,
   refined by maximising the DFT magnitude at continuous wave vectors; the phase is the argument of that DFT;
4. defects: residual = (image low-passed at ``defect_sigma_nm``, which removes the row lattice's Fourier
   components) - (per-terrace background: normalised Gaussian blur at ``background_sigma_nm`` inside the
   terrace, so steps do not leak in); connected regions above/below a noise-scaled threshold are protrusions /
   depressions by sign;
5. atoms: peaks (``scipy.ndimage.maximum_filter``) of the polarity-corrected (rows bright) image filtered by a
   negative Laplacian of Gaussian, sub-pixel by a 3-point parabola per axis; dropped where the local
   corrugation is weak (unresolved), inside defects and at the frame border; dimers = mutually nearest
   atom pairs 0.24 nm apart.

Polarity: bias_v > 0 (empty states) inverts the row contrast for atom/lattice finding; bias_v None is taken as
filled states (the baseline does not guess polarity). Defect kinds use the raw sign in both polarities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.optimize import minimize
from scipy.spatial import cKDTree

from stm_feedback.errors import InputError
from stm_feedback.maps import bias_polarity
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, UNIT_CELL_AREA_NM2
from stm_feedback.schema import Analysis, Atom, Defect, Dimer, ImageInfo, Quality, Terrace


@dataclass(frozen=True)
class BaselineParams:
    """Tunables of the classical analyzer (lengths in nm, heights in nm, gradients in nm/nm)."""

    terrace_sigma_nm: float = 0.4
    step_gradient_nm_per_nm: float = 0.04
    step_close_nm: float = 0.3
    min_terrace_area_nm2: float = 3.0
    step_band_nm: float = 0.3
    defect_sigma_nm: float = 0.25
    background_sigma_nm: float = 1.5
    defect_threshold_nm: float = 0.03
    defect_noise_factor: float = 5.0
    min_defect_area_nm2: float = 0.15
    atom_log_sigma_nm: float = 0.07
    atom_threshold_rms: float = 0.6
    atom_highpass_sigma_nm: float = 0.35
    min_atom_distance_nm: float = 0.16
    resolved_window_nm: float = 1.0
    resolved_fraction_of_median: float = 0.45
    border_nm: float = 0.2
    dimer_pair_tol_nm: float = 0.08


# ------------------------------------------------------------------------------------------------------------
# levelling


def level(image_nm: np.ndarray) -> np.ndarray:
    """Plane (median slopes) and per-line offsets (median of line differences) removed; (H, W) float64 nm."""
    z = np.asarray(image_nm, np.float64)
    h, w = z.shape
    sx = np.median(np.diff(z, axis=1)) if w > 1 else 0.0
    sy = np.median(np.diff(z, axis=0)) if h > 1 else 0.0
    yy, xx = np.mgrid[0:h, 0:w]
    z = z - sx * xx - sy * yy
    # line offsets: the median difference to the previous line is a per-line jump, robust to local features
    d = np.median(np.diff(z, axis=0), axis=1)
    z = z - np.concatenate([[0.0], np.cumsum(d)])[:, None]
    return z - np.median(z)


# ------------------------------------------------------------------------------------------------------------
# terraces


def segment_terraces(z_nm: np.ndarray, pixel_size_nm: float, p: BaselineParams) -> np.ndarray:
    """(H, W) int32 terrace labels 0.. from the smoothed gradient magnitude; -1 on a thin step-edge band."""
    sigma_px = p.terrace_sigma_nm / pixel_size_nm
    grad = ndimage.gaussian_gradient_magnitude(z_nm, sigma_px, mode="nearest") / pixel_size_nm
    # widen the step mask so that short weak stretches of a step (kinks, S_A segments) do not connect terraces
    close_px = max(1, int(round(p.step_close_nm / pixel_size_nm)))
    flat = ~ndimage.binary_dilation(grad >= p.step_gradient_nm_per_nm, iterations=close_px)
    comp, n = ndimage.label(flat)
    if n == 0:
        return np.zeros(z_nm.shape, np.int32)
    areas = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1)) * pixel_size_nm**2
    keep = np.flatnonzero(areas >= p.min_terrace_area_nm2) + 1
    if len(keep) == 0:
        return np.zeros(z_nm.shape, np.int32)
    remap = np.full(n + 1, -1, np.int64)
    remap[keep] = np.arange(len(keep))
    labels = remap[comp]
    # every other pixel (step band, defect rings) gets the nearest terrace's label
    _, (ri, ci) = ndimage.distance_transform_edt(labels < 0, return_indices=True)
    labels = labels[ri, ci]
    # then a thin band along terrace boundaries is "step edge"
    boundary = np.zeros(labels.shape, bool)
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    boundary[1:, :] |= labels[1:, :] != labels[:-1, :]
    band = ndimage.distance_transform_edt(~boundary) * pixel_size_nm < p.step_band_nm
    return np.where(band, -1, labels).astype(np.int32)


# ------------------------------------------------------------------------------------------------------------
# row lattice by Fourier analysis


def _dft(z: np.ndarray, xx_nm: np.ndarray, yy_nm: np.ndarray, k: np.ndarray) -> complex:
    """sum z exp(-2 pi i k.p) over the given samples (k in cycles/nm)."""
    return complex(np.sum(z * np.exp(-2j * np.pi * (k[0] * xx_nm + k[1] * yy_nm))))


def row_lattice_fft(
    z_rows_bright_nm: np.ndarray, mask: np.ndarray, pixel_size_nm: float
) -> tuple[float, float, float] | None:
    """(row_angle_deg in [0, 180), row_phase_nm in [0, 0.768), relative peak strength) of the masked region,
    or None if the region is too small. Rows bright = row centre lines are maxima."""
    if mask.sum() < 64:
        return None
    rows, cols = np.nonzero(mask)
    z = z_rows_bright_nm[rows, cols]
    z = z - z.mean()
    xx_nm, yy_nm = cols * pixel_size_nm, rows * pixel_size_nm
    # coarse: zero-padded FFT of the masked image
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    patch = np.zeros((r1 - r0, c1 - c0))
    patch[rows - r0, cols - c0] = z
    n_fft = int(2 ** np.ceil(np.log2(max(patch.shape) * 2)))
    spec = np.abs(np.fft.fft2(patch, s=(n_fft, n_fft)))
    f = np.fft.fftfreq(n_fft, d=pixel_size_nm)
    ky, kx = np.meshgrid(f, f, indexing="ij")
    kr = np.hypot(kx, ky)
    k0 = 1.0 / ROW_SPACING_NM
    ring = (kr > 0.8 * k0) & (kr < 1.2 * k0)
    if not ring.any():
        return None
    i = np.argmax(np.where(ring, spec, -1.0))
    k_start = np.array([kx.flat[i], ky.flat[i]])

    def neg_power(k: np.ndarray) -> float:
        return -abs(_dft(z, xx_nm, yy_nm, k))

    res = minimize(
        neg_power, k_start, method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-9, "maxiter": 200}
    )
    k = res.x
    amp = _dft(z, xx_nm, yy_nm, k)
    angle_k = np.degrees(np.arctan2(k[1], k[0]))
    row_angle = (angle_k - 90.0) % 180.0
    # z ~ cos(2 pi k.p - theta), theta = -arg(amp); maxima at k.p = theta / 2 pi (mod 1)
    a = np.radians(row_angle)
    n = np.array([-np.sin(a), np.cos(a)])
    k_abs = float(np.hypot(*k))
    sign = 1.0 if float(np.dot(k, n)) > 0 else -1.0
    phase = (sign * (-np.angle(amp)) / (2 * np.pi * k_abs)) % ROW_SPACING_NM
    strength = abs(amp) / (np.sqrt(np.sum(z**2) * len(z)) + 1e-12)
    return float(row_angle), float(phase), float(strength)


# ------------------------------------------------------------------------------------------------------------
# defects


def _terrace_background(z: np.ndarray, labels: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Normalised Gaussian convolution of z within each terrace (weights 0 where excluded)."""
    bg = np.zeros_like(z)
    filled = labels.copy()
    if (labels < 0).any() and (labels >= 0).any():
        _, (ri, ci) = ndimage.distance_transform_edt(labels < 0, return_indices=True)
        filled = labels[ri, ci]
    for t in np.unique(filled):
        m = (filled == t).astype(np.float64) * weight
        num = ndimage.gaussian_filter(z * m, sigma_px, mode="nearest")
        den = ndimage.gaussian_filter(m, sigma_px, mode="nearest")
        sel = filled == t
        bg[sel] = (num[sel] / np.maximum(den[sel], 1e-6)) if den[sel].max() > 0 else 0.0
    return bg


def _circularity(region: np.ndarray) -> float:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    c = max(contours, key=cv2.contourArea)
    perim = cv2.arcLength(c, True)
    area = float(region.sum())
    return float(min(1.0, 4 * np.pi * area / perim**2)) if perim > 0 else 1.0


def find_defects(
    z_nm: np.ndarray, labels: np.ndarray, pixel_size_nm: float, p: BaselineParams
) -> tuple[list[Defect], np.ndarray]:
    """Defects (kind by residual sign) and the (H, W) bool mask of all defect pixels."""
    smooth = ndimage.gaussian_filter(z_nm, p.defect_sigma_nm / pixel_size_nm, mode="nearest")
    sigma_bg = p.background_sigma_nm / pixel_size_nm
    weight = np.ones_like(z_nm)
    residual = smooth - _terrace_background(smooth, labels, weight, sigma_bg)
    # second pass: background without the candidate defects (large defects would bias it)
    mad = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    thr = max(p.defect_threshold_nm, p.defect_noise_factor * mad)
    weight = (np.abs(residual) < thr).astype(np.float64)
    residual = smooth - _terrace_background(smooth, labels, weight, sigma_bg)
    band = ndimage.binary_dilation(labels < 0, iterations=max(1, int(round(0.3 / pixel_size_nm))))
    defects: list[Defect] = []
    all_mask = np.zeros(z_nm.shape, bool)
    min_px = p.min_defect_area_nm2 / pixel_size_nm**2
    for kind, sel in (("protrusion", residual > thr), ("depression", residual < -thr)):
        comp, n = ndimage.label(sel & ~band)
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            region = comp[sl] == i
            if region.sum() < min_px:
                continue
            all_mask[sl] |= region
            r = np.abs(residual[sl]) * region
            rr, cc = np.nonzero(region)
            wts = r[rr, cc]
            y = float(np.sum(rr * wts) / wts.sum()) + sl[0].start
            x = float(np.sum(cc * wts) / wts.sum()) + sl[1].start
            area_nm2 = float(region.sum()) * pixel_size_nm**2
            peak = float(wts.max())
            t = int(labels[int(round(y)), int(round(x))])
            big_protrusion = kind == "protrusion" and area_nm2 > 1.0
            defects.append(
                Defect(
                    x_px=x,
                    y_px=y,
                    kind=kind,
                    cluster=-1,
                    label=f"{kind}-baseline",
                    area_nm2=area_nm2,
                    height_rel=peak / thr,
                    circularity=_circularity(region),
                    must_avoid=kind == "depression" or big_protrusion,
                    terrace=t,
                    area_cells=area_nm2 / UNIT_CELL_AREA_NM2,
                    score=float(min(1.0, peak / (2 * thr))),
                )
            )
    return defects, all_mask


# ------------------------------------------------------------------------------------------------------------
# atoms and dimers


def _subpixel(img: np.ndarray, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3-point parabola offsets per axis around integer peaks (clipped to +-0.5 px)."""
    h, w = img.shape
    r1, c1 = np.clip(r, 1, h - 2), np.clip(c, 1, w - 2)

    def off(m: np.ndarray, zero: np.ndarray, p: np.ndarray) -> np.ndarray:
        den = m - 2 * zero + p
        return np.clip(np.where(den < 0, 0.5 * (m - p) / np.where(den == 0, -1, den), 0.0), -0.5, 0.5)

    z0 = img[r1, c1]
    dy = off(img[r1 - 1, c1], z0, img[r1 + 1, c1])
    dx = off(img[r1, c1 - 1], z0, img[r1, c1 + 1])
    return c1 + dx, r1 + dy


def find_atoms(
    z_rows_bright_nm: np.ndarray, pixel_size_nm: float, exclude: np.ndarray, p: BaselineParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom positions (N, 2) (x_px, y_px), scores (N,) in 0..1, and the (H, W) bool 'resolved' map."""
    # negative Laplacian of Gaussian at about the atom size: separates the two atoms of a dimer (0.24 nm
    # apart, each ~0.2 nm wide), which a plain smoothed image barely shows as two maxima
    det = -ndimage.gaussian_laplace(z_rows_bright_nm, p.atom_log_sigma_nm / pixel_size_nm, mode="nearest")
    win = p.resolved_window_nm / pixel_size_nm
    local_rms = np.sqrt(ndimage.gaussian_filter(det**2, win, mode="nearest"))
    resolved = local_rms > p.resolved_fraction_of_median * np.median(local_rms)
    size = max(3, int(round(2 * p.min_atom_distance_nm / pixel_size_nm)) | 1)
    peaks = det == ndimage.maximum_filter(det, size=size, mode="nearest")
    peaks &= det > p.atom_threshold_rms * local_rms
    peaks &= resolved & ~exclude
    b = int(np.ceil(p.border_nm / pixel_size_nm))
    peaks[:b, :] = peaks[-b:, :] = False
    peaks[:, :b] = peaks[:, -b:] = False
    r, c = np.nonzero(peaks)
    x, y = _subpixel(det, r, c)
    score = np.clip(det[r, c] / (2 * local_rms[r, c] + 1e-12), 0, 1)
    return np.stack([x, y], 1) if len(x) else np.zeros((0, 2)), score, resolved


def pair_dimers(atoms_xy_px: np.ndarray, pixel_size_nm: float, tol_nm: float) -> np.ndarray:
    """(M, 2) dimer centres (px): midpoints of mutually nearest atom pairs DIMER_ATOM_SEPARATION_NM apart."""
    if len(atoms_xy_px) < 2:
        return np.zeros((0, 2))
    xy_nm = atoms_xy_px * pixel_size_nm
    d, j = cKDTree(xy_nm).query(xy_nm, k=2)
    nn, dist = j[:, 1], d[:, 1]
    i = np.arange(len(xy_nm))
    mutual = (nn[nn] == i) & (i < nn) & (np.abs(dist - DIMER_ATOM_SEPARATION_NM) < tol_nm)
    return 0.5 * (atoms_xy_px[i[mutual]] + atoms_xy_px[nn[mutual]])


# ------------------------------------------------------------------------------------------------------------
# the analyzer


def analyze_baseline(
    image_nm: np.ndarray,
    pixel_size_nm: float,
    bias_v: float | None = None,
    params: BaselineParams | None = None,
) -> Analysis:
    """Classical analysis of one frame (heights in nm) into the public ``Analysis`` contract."""
    p = params or BaselineParams()
    img = np.asarray(image_nm)
    if img.ndim != 2 or min(img.shape) < 16:
        raise InputError(f"image must be 2-D and at least 16x16 pixels; got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise InputError("image contains non-finite values")
    if not (np.isfinite(pixel_size_nm) and 0.005 <= pixel_size_nm <= 2.0):
        raise InputError(f"pixel_size_nm must be in [0.005, 2] nm; got {pixel_size_nm!r}")
    t0 = time.perf_counter()
    z = level(img)
    polarity, polarity_source = bias_polarity(bias_v)  # a missing bias is taken as filled states
    sign = -1.0 if polarity == "empty" else 1.0
    labels = segment_terraces(z, pixel_size_nm, p)
    t1 = time.perf_counter()
    defects, defect_mask = find_defects(z, labels, pixel_size_nm, p)
    t2 = time.perf_counter()
    near_defect = ndimage.binary_dilation(defect_mask, iterations=max(1, int(round(0.1 / pixel_size_nm))))
    atoms_xy, scores, resolved = find_atoms(sign * z, pixel_size_nm, near_defect, p)
    dimers_xy = pair_dimers(atoms_xy, pixel_size_nm, p.dimer_pair_tol_nm)
    t3 = time.perf_counter()

    def terrace_at(xy: np.ndarray) -> np.ndarray:
        if len(xy) == 0:
            return np.zeros(0, int)
        r = np.clip(np.rint(xy[:, 1]).astype(int), 0, labels.shape[0] - 1)
        c = np.clip(np.rint(xy[:, 0]).astype(int), 0, labels.shape[1] - 1)
        return labels[r, c]

    atom_t = terrace_at(atoms_xy)
    terraces: list[Terrace] = []
    hp = sign * (z - ndimage.gaussian_filter(z, p.atom_highpass_sigma_nm / pixel_size_nm, mode="nearest"))
    for tid in np.unique(labels[labels >= 0]):
        mask = (labels == tid) & ~near_defect
        fit = row_lattice_fft(hp, mask, pixel_size_nm)
        angle, phase = (fit[0], fit[1]) if fit else (float("nan"), float("nan"))
        terraces.append(
            Terrace(
                id=int(tid),
                row_angle_deg=angle,
                row_phase_nm=phase,
                area_nm2=float((labels == tid).sum()) * pixel_size_nm**2,
                n_atoms=int(np.sum(atom_t == tid)),
                fft_row_angle_deg=angle,
            )
        )
    t4 = time.perf_counter()
    h, w = img.shape
    frac = float(resolved.mean())
    return Analysis(
        image=ImageInfo(h, w, float(pixel_size_nm), bias_v),
        atoms=[
            Atom(float(x), float(y), int(t), float(s))
            for (x, y), t, s in zip(atoms_xy, atom_t, scores, strict=True)
        ],
        dimers=[
            Dimer(float(x), float(y), int(t))
            for (x, y), t in zip(dimers_xy, terrace_at(dimers_xy), strict=True)
        ],
        defects=defects,
        terraces=terraces,
        quality=Quality(
            atomically_resolved=frac > 0.5,
            resolved_fraction=frac,
            polarity=polarity,
            polarity_source=polarity_source,
        ),
        terrace_labels=labels,
        timings_ms={
            "level_terraces": 1e3 * (t1 - t0),
            "defects": 1e3 * (t2 - t1),
            "atoms": 1e3 * (t3 - t2),
            "lattice": 1e3 * (t4 - t3),
        },
        models={"baseline": "classical-1"},
    )
