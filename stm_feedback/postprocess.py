"""Post-processing of network maps into objects: terraces, atoms, dimers, defect blobs and their features.

Pure functions on numpy arrays (pixel coordinates of the input frame: x = column, y = row, (0, 0) = centre of
the top-left pixel). The Pipeline (pipeline.py) strings them together; planner.py uses the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback.classify import FEATURE_NAMES, defect_features, row_aligned_patch
from stm_feedback.errors import InputError
from stm_feedback.lattice import row_offset_nm, unit_vectors
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, UNIT_CELL_AREA_NM2


@dataclass(frozen=True)
class PostprocessParams:
    """Thresholds of the post-processing (probabilities 0..1, lengths in nm, areas in nm^2)."""

    step_threshold: float = 0.5  # step_prob above this is step edge
    min_terrace_area_nm2: float = 4.0  # smaller non-step components become -1 (unknown)
    atom_threshold: float = 0.5  # atom_prob peaks below this are dropped (the network abstains)
    atom_peak_radius_nm: float = (
        0.09  # local-maximum window half-width (< half the 0.24 nm dimer-atom distance)
    )
    dimer_tol_nm: float = 0.08  # partner atom at 0.24 +- tol nm
    dimer_max_bond_tilt_deg: float = 30.0  # bond direction vs the row normal, when a lattice is known
    dimer_max_row_offset_nm: float = 0.2  # dimer midpoint vs the fitted row centre line
    defect_threshold: float = 0.5  # protrusion/depression prob above this is defect footprint
    min_defect_area_nm2: float = 0.05  # smaller blobs are noise
    feature_ring_nm: float = 1.2  # ring around a footprint for the local level (classify.defect_features)
    frame_clustering: bool = (
        False  # mean shift on each frame's own defects (~1 s with sklearn: off in real time)
    )
    patch_size_px: int = 24  # row-aligned library patch
    patch_pixel_size_nm: float = 0.125


def check_map(name: str, a: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate one (H, W) finite map; raise InputError naming it otherwise. Returns it as float32."""
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name} must be a 2-D array of at least 2x2, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or inf")
    return arr


# ------------------------------------------------------------------------------------------------ terraces
def segment_terraces(
    step_prob: np.ndarray, pixel_size_nm: float, threshold: float = 0.5, min_area_nm2: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """Terrace labels (H, W) int32 (0..K-1, -1 = step edge or unknown) and the step mask (H, W) bool.

    Terraces are the 4-connected components of the non-step pixels (step_prob <= threshold); components
    smaller than ``min_area_nm2`` are set to -1. Ids in raster order of first appearance.
    """
    step = step_prob > threshold
    lab, n = ndimage.label(~step)
    if n == 0:
        return np.full(step.shape, -1, np.int32), step
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes * pixel_size_nm**2 >= min_area_nm2
    keep[0] = False
    remap = np.full(n + 1, -1, np.int32)
    remap[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    return remap[lab], step


# ------------------------------------------------------------------------------------------------ atoms
def find_atoms(
    atom_prob: np.ndarray,
    pixel_size_nm: float,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
    peak_radius_nm: float = 0.09,
) -> tuple[np.ndarray, np.ndarray]:
    """Atom centres (N, 2) (x_px, y_px) float64 and scores (N,) = peak probability.

    Peaks = local maxima of ``atom_prob`` in a (2r+1)^2 window (r = peak_radius_nm, >= 1 px) above
    ``threshold``; flat-topped maxima (several equal pixels) are merged with scipy.ndimage.label. Sub-pixel
    position = Gaussian 3-point fit (parabola through log prob) along x and y at each peak (plateau centre
    from scipy.ndimage.center_of_mass), clipped to +-0.5 px. ``valid`` (bool) restricts peaks to those
    pixels (one terrace or all
    terraces: the paper's per-terrace sub-images).
    """
    r = max(1, int(round(peak_radius_nm / pixel_size_nm)))
    size = 2 * r + 1
    peak = (atom_prob == ndimage.maximum_filter(atom_prob, size=size, mode="nearest")) & (
        atom_prob > threshold
    )
    if valid is not None:
        peak &= valid
    lab, n = ndimage.label(peak, structure=np.ones((3, 3)))
    if n == 0:
        return np.empty((0, 2)), np.empty(0)
    idx = np.arange(1, n + 1)
    seeds = np.asarray(ndimage.center_of_mass(peak, lab, idx))  # (n, 2) row, col of the plateau
    rows = np.clip(np.rint(seeds[:, 0]).astype(np.int64), 0, atom_prob.shape[0] - 1)
    cols = np.clip(np.rint(seeds[:, 1]).astype(np.int64), 0, atom_prob.shape[1] - 1)
    # Gaussian 3-point refinement per axis (exact for Gaussian peaks), vectorised with edge padding
    lp = np.log(np.maximum(np.pad(atom_prob.astype(np.float64), 1, mode="edge"), 1e-6))
    r1, c1 = rows + 1, cols + 1

    def _offset(m: np.ndarray, z0: np.ndarray, p: np.ndarray) -> np.ndarray:
        den = m - 2 * z0 + p
        return np.clip(np.where(den < 0, 0.5 * (m - p) / np.where(den < 0, den, -1.0), 0.0), -0.5, 0.5)

    x = cols + _offset(lp[r1, c1 - 1], lp[r1, c1], lp[r1, c1 + 1])
    y = rows + _offset(lp[r1 - 1, c1], lp[r1, c1], lp[r1 + 1, c1])
    score = atom_prob[rows, cols].astype(np.float64)
    return np.stack([x, y], axis=1), score


def pair_dimers(atoms_xy_nm: np.ndarray, tol_nm: float = 0.08) -> np.ndarray:
    """Index pairs (M, 2) of atoms that are mutual nearest neighbours at 0.24 +- tol nm (one dimer)."""
    if len(atoms_xy_nm) < 2:
        return np.empty((0, 2), np.int64)
    tree = cKDTree(atoms_xy_nm)
    d, j = tree.query(atoms_xy_nm, k=2)
    nn, dist = j[:, 1], d[:, 1]
    i = np.arange(len(atoms_xy_nm))
    ok = (nn[nn] == i) & (i < nn) & (np.abs(dist - DIMER_ATOM_SEPARATION_NM) < tol_nm)
    return np.stack([i[ok], nn[ok]], axis=1)


def dimers_on_lattice(
    atoms_xy_nm: np.ndarray,
    pairs: np.ndarray,
    row_angle_deg: float,
    row_phase_nm: float,
    max_bond_tilt_deg: float = 30.0,
    max_row_offset_nm: float = 0.2,
) -> np.ndarray:
    """Bool (M,): pairs whose bond runs across the rows (within ``max_bond_tilt_deg`` of n) and whose midpoint
    lies within ``max_row_offset_nm`` of a fitted row centre line."""
    if len(pairs) == 0:
        return np.zeros(0, bool)
    a, b = atoms_xy_nm[pairs[:, 0]], atoms_xy_nm[pairs[:, 1]]
    bond = b - a
    _, n = unit_vectors(row_angle_deg)
    cos_t = np.abs(bond @ n) / np.maximum(np.hypot(bond[:, 0], bond[:, 1]), 1e-12)
    mid = (a + b) / 2
    off = np.abs(row_offset_nm(mid, row_angle_deg, row_phase_nm))
    return (cos_t >= math.cos(math.radians(max_bond_tilt_deg))) & (off <= max_row_offset_nm)


# ------------------------------------------------------------------------------------------------ defects
@dataclass
class Blobs:
    """Footprints of one defect kind: labels (H, W) int32 (0 = none, k = blob k) + per-blob arrays."""

    labels: np.ndarray
    slices: list[tuple[slice, slice]]
    centre_xy_px: np.ndarray  # (K, 2) probability-weighted centre of mass
    score: np.ndarray  # (K,) max probability in the blob
    area_px: np.ndarray  # (K,)


def find_blobs(
    prob: np.ndarray, pixel_size_nm: float, threshold: float = 0.5, min_area_nm2: float = 0.05
) -> Blobs:
    """Blobs of ``prob > threshold`` (8-connected) of at least ``min_area_nm2``; centres by
    scipy.ndimage.center_of_mass of the probability inside each blob."""
    mask = prob > threshold
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return Blobs(lab.astype(np.int32), [], np.empty((0, 2)), np.empty(0), np.empty(0))
    idx = np.arange(1, n + 1)
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = area * pixel_size_nm**2 >= min_area_nm2
    if not keep.all():
        remap = np.zeros(n + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        lab = remap[lab]
        n = int(keep.sum())
        idx = np.arange(1, n + 1)
        area = area[keep]
    if n == 0:
        return Blobs(lab.astype(np.int32), [], np.empty((0, 2)), np.empty(0), np.empty(0))
    com = np.asarray(ndimage.center_of_mass(prob, lab, idx)).reshape(-1, 2)
    slices = [s for s in ndimage.find_objects(lab) if s is not None]
    # per-slice max: ndimage.maximum sorts the whole frame (measured ~25 ms at 256x256)
    score = np.array([float(prob[sl][lab[sl] == k + 1].max()) for k, sl in enumerate(slices)])
    return Blobs(lab.astype(np.int32), slices, com[:, ::-1].copy(), score, area.astype(np.float64))


def blob_features(
    height_nm: np.ndarray,
    blobs: Blobs,
    pixel_size_nm: float,
    atoms_xy_px: np.ndarray,
    ring_nm: float = 1.2,
    row_angle_deg: list[float | None] | None = None,
) -> np.ndarray:
    """Features (K, F) in ``classify.FEATURE_NAMES`` order per blob (``row_angle_deg[k]``: the blob's terrace
    row direction for the row-aligned extents, None if unknown),
    computed with ``classify.defect_features`` on a crop around the blob (ring + margin) so the cost is per
    blob, not per frame. ``height_nm``: apparent height with its true sign (raw image, nm)."""
    h, w = height_nm.shape
    out = np.empty((len(blobs.slices), len(FEATURE_NAMES)))
    pad = int(math.ceil((ring_nm + 1.5) / pixel_size_nm))
    atoms = np.asarray(atoms_xy_px, float).reshape(-1, 2)
    for k, (sy, sx) in enumerate(blobs.slices):
        y0, y1 = max(0, sy.start - pad), min(h, sy.stop + pad)
        x0, x1 = max(0, sx.start - pad), min(w, sx.stop + pad)
        mask = blobs.labels[y0:y1, x0:x1] == k + 1
        near = (atoms[:, 0] >= x0) & (atoms[:, 0] < x1) & (atoms[:, 1] >= y0) & (atoms[:, 1] < y1)
        try:
            out[k] = defect_features(
                height_nm[y0:y1, x0:x1],
                mask,
                pixel_size_nm,
                atoms[near] - [x0, y0],
                row_angle_deg=None if row_angle_deg is None else row_angle_deg[k],
                ring_nm=ring_nm,
            )
        except ZeroDivisionError:  # flat surroundings: no height reference; the planner treats NaN as unknown
            out[k] = np.nan
            out[k, FEATURE_NAMES.index("area_cells")] = area_cells(mask.sum() * pixel_size_nm**2)
    return out


def area_cells(area_nm2: float) -> float:
    """Area in 2x1 unit cells (0.295 nm^2 each)."""
    return area_nm2 / UNIT_CELL_AREA_NM2


def defect_patch(
    height_nm: np.ndarray,
    x_px: float,
    y_px: float,
    pixel_size_nm: float,
    row_angle_deg: float,
    size_px: int = 24,
    patch_pixel_size_nm: float = 0.125,
) -> np.ndarray:
    """Row-aligned (rows horizontal) float32 patch around a defect (cv2.warpAffine)."""
    return row_aligned_patch(
        height_nm, x_px, y_px, pixel_size_nm, row_angle_deg, size_px, patch_pixel_size_nm
    )


def majority_label(labels: np.ndarray, blob_labels: np.ndarray, k: int, sl: tuple[slice, slice]) -> int:
    """Most common terrace label (>= 0) under blob k, -1 if it lies only on step/unknown pixels."""
    sub = labels[sl][blob_labels[sl] == k]
    sub = sub[sub >= 0]
    if sub.size == 0:
        return -1
    vals, counts = np.unique(sub, return_counts=True)
    return int(vals[np.argmax(counts)])
