"""Ground truth -> per-network target maps (training) and "oracle" NetworkMaps (post-processing tests).

Targets at a working pixel size are on the grid obtained by resampling the frame with
``stm_feedback.preprocess.resize`` to ``resampled_shape`` (same cv2 grid convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.truth import GroundTruth
from stm_feedback.maps import NetworkMaps, bias_polarity
from stm_feedback.preprocess import map_coords, normalize_frame, resampled_shape, resize

ATOM_SIGMA_NM = 0.07  # width of the atom Gaussians: the two atoms of a dimer (0.24 nm) stay 3.4 sigma apart
DEFECT_CLASS_INDEX: dict[str, int] = {"background": 0, "protrusion": 1, "depression": 2}


@dataclass
class Targets:
    """Target maps on one grid, all (H, W): ``step`` float32 0..1 (NN-0), ``atoms`` float32 0..1 Gaussians
    at resolved atoms (NN-1; zero in unresolved regions = abstain), ``defect_class`` int64 0 background /
    1 protrusion / 2 depression (NN-2)."""

    step: np.ndarray
    atoms: np.ndarray
    defect_class: np.ndarray
    pixel_size_nm: float


def gaussian_peaks(
    shape: tuple[int, int], xy_px: np.ndarray, sigma_px: float, radius_sigmas: float = 3.0
) -> np.ndarray:
    """float32 (H, W) map: the maximum of unit-height Gaussians (width sigma_px) centred at xy_px (N, 2)."""
    h, w = shape
    out = np.zeros((h, w), np.float32)
    xy = np.asarray(xy_px, np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return out
    r = max(1, int(np.ceil(radius_sigmas * sigma_px)))
    d = np.arange(-r, r + 1)
    cx = np.rint(xy[:, 0]).astype(np.int64)
    cy = np.rint(xy[:, 1]).astype(np.int64)
    px = cx[:, None, None] + d[None, None, :]  # (N, 1, K)
    py = cy[:, None, None] + d[None, :, None]  # (N, K, 1)
    g = np.exp(
        -((px - xy[:, 0, None, None]) ** 2 + (py - xy[:, 1, None, None]) ** 2) / (2.0 * sigma_px**2)
    ).astype(np.float32)
    px_b, py_b = np.broadcast_to(px, g.shape), np.broadcast_to(py, g.shape)
    ok = (px_b >= 0) & (px_b < w) & (py_b >= 0) & (py_b < h)
    np.maximum.at(out, (py_b[ok], px_b[ok]), g[ok])
    return out


def defect_kind_masks(truth: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """(protrusion, depression) bool (H, W) footprints on the truth grid."""
    inst = np.asarray(truth.defect_instances)
    lut = np.zeros(int(inst.max(initial=0)) + 1, np.int64)
    for d in truth.defects:
        if d.id < len(lut):
            lut[d.id] = DEFECT_CLASS_INDEX[d.kind]
    cls = lut[inst]
    return cls == 1, cls == 2


def truth_to_targets(
    truth: GroundTruth, pixel_size_nm: float | None = None, atom_sigma_nm: float = ATOM_SIGMA_NM
) -> Targets:
    """Target maps of ``truth`` at ``pixel_size_nm`` (None = the truth's own grid)."""
    src = (truth.height_px, truth.width_px)
    s = truth.pixel_size_nm if pixel_size_nm is None else float(pixel_size_nm)
    shape = src if pixel_size_nm is None else resampled_shape(src, truth.pixel_size_nm, s)
    step = resize(np.asarray(truth.step_mask, np.float32), shape)
    prot, dep = defect_kind_masks(truth)
    p = resize(prot.astype(np.float32), shape)
    d = resize(dep.astype(np.float32), shape)
    cls = np.zeros(shape, np.int64)
    cls[(p >= 0.5) & (p >= d)] = 1
    cls[(d >= 0.5) & (d > p)] = 2
    ok = np.asarray(truth.atom_resolved, bool)
    xy = map_coords(np.asarray(truth.atoms_xy_px)[ok], src, shape)
    atoms = gaussian_peaks(shape, xy, atom_sigma_nm / s)
    return Targets(step=step, atoms=atoms, defect_class=cls, pixel_size_nm=s)


def oracle_maps(image_nm: np.ndarray, truth: GroundTruth, bias_v: float | None = None) -> NetworkMaps:
    """Perfect NetworkMaps from the truth on the image's own grid (for post-processing tests).
    ``image_norm`` is the normalised, rows-bright image (inverted when the bias (or truth's bias) > 0); the
    polarity is the bias' (source "bias")."""
    t = truth_to_targets(truth)
    b = truth.bias_v if bias_v is None else bias_v
    norm = normalize_frame(image_nm, truth.pixel_size_nm)
    if b is not None and b > 0:
        norm = (1.0 - norm).astype(np.float32)
    polarity, source = bias_polarity(b)
    return NetworkMaps(
        step_prob=t.step.astype(np.float32),
        atom_prob=t.atoms,
        protrusion_prob=(t.defect_class == 1).astype(np.float32),
        depression_prob=(t.defect_class == 2).astype(np.float32),
        image_norm=norm,
        pixel_size_nm=float(truth.pixel_size_nm),
        polarity=polarity,
        polarity_source=source,
    )
