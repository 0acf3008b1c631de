"""The fast post-processing agrees with the straightforward per-object reference computations.

Each vectorised function of postprocess.py / planner.py / lattice.py is compared with the simple (slow)
definition it replaces, on simulated frames with oracle maps and on synthetic worst cases.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback import postprocess as pp
from stm_feedback.classify import FEATURE_NAMES
from stm_feedback.errors import InputError
from stm_feedback.physics import UNIT_CELL_AREA_NM2
from tests.test_pipeline_oracle import oracle_maps, simulate


# --------------------------------------------------------------------- per-defect reference (straightforward)
def _ref_local_levels(
    image_nm: np.ndarray,
    mask: np.ndarray,
    atoms_xy_px: np.ndarray | None,
    centre_xy_px: tuple[float, float],
    pixel_size_nm: float,
    ring_nm: float,
) -> tuple[float, float]:
    """(lattice mean level, atom-centre level) in nm around a defect, from a ring outside its footprint."""
    h, w = image_nm.shape
    cx, cy = centre_xy_px
    dist_px = ndimage.distance_transform_edt(~mask)
    ring = (dist_px > 1.0) & (dist_px <= max(2.0, ring_nm / pixel_size_nm))
    values = image_nm[ring]
    if values.size < 4:  # footprint fills the frame: fall back to everything outside it
        values = image_nm[~mask] if (~mask).any() else image_nm.ravel()
    level_nm = float(np.median(values))
    atom_level_nm = float("nan")
    if atoms_xy_px is not None and len(atoms_xy_px):
        atoms = np.asarray(atoms_xy_px, float).reshape(-1, 2)
        d_nm = np.hypot(atoms[:, 0] - cx, atoms[:, 1] - cy) * pixel_size_nm
        cols = np.clip(np.rint(atoms[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.rint(atoms[:, 1]).astype(int), 0, h - 1)
        near = (d_nm <= ring_nm + 1.0) & ~mask[rows, cols]
        if near.sum() >= 3:
            atom_level_nm = float(np.mean(image_nm[rows[near], cols[near]]))
    if not math.isfinite(atom_level_nm) or atom_level_nm - level_nm <= 1e-6:
        # no usable atoms nearby: the bright end of the ring stands in for the atom centres
        atom_level_nm = float(np.percentile(values, 90))
    return level_nm, atom_level_nm


def _reference_defect_features(
    image_nm: np.ndarray,
    mask: np.ndarray,
    pixel_size_nm: float,
    atoms_xy_px: np.ndarray | None = None,
    row_angle_deg: float | None = None,
    ring_nm: float = 1.2,
) -> np.ndarray:
    """The per-defect implementation of classify.defect_features that blob_features replaced, kept here as
    the straightforward reference: feature vector (``FEATURE_NAMES`` order, float64) of one defect.

    image_nm: (H, W) apparent height in nm; mask: (H, W) bool footprint of this one defect (its
    largest connected component is used); pixel_size_nm: nm per pixel; atoms_xy_px: (N, 2) detected atom
    centres (x_px, y_px) of the frame, optional; row_angle_deg: dimer-row direction of the terrace in
    degrees (image frame), None = 0 (then the extents are along x / along y).

    ``height_rel`` = (z_centre - z_level) / (z_atoms - z_level): z_centre is the mean height within
    0.15 nm of the footprint's centre of mass, z_level the median of a ``ring_nm`` ring around the
    footprint (the local lattice mean, so offsets and tilt cancel), z_atoms the mean height at atom
    centres near the defect (the 90th percentile of the ring if none are given). An intact atom centre
    scores 1, the lattice mean 0; depressions go negative, protrusions well above 1; NaN when the
    surroundings are flat (no height reference).
    """
    image_nm = np.asarray(image_nm, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if image_nm.ndim != 2 or mask.shape != image_nm.shape:
        raise InputError(f"image {image_nm.shape} and mask {mask.shape} must be the same 2-D shape")
    if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise InputError(f"pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    labels, n = ndimage.label(mask)
    if n == 0:
        raise InputError("defect mask is empty")
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    cy, cx = ndimage.center_of_mass(mask)
    area_px = float(mask.sum())
    area_nm2 = area_px * pixel_size_nm**2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    perimeter_px = cv2.arcLength(contour, closed=True)
    # pixel-centre contours shrink the blob by half a pixel all round: use the contour's own area so that
    # A and P describe the same polygon (a 1-pixel blob has no polygon: call it a disc)
    contour_area_px = cv2.contourArea(contour)
    circularity = 1.0 if perimeter_px <= 0 else min(1.0, 4.0 * math.pi * contour_area_px / perimeter_px**2)

    level_nm, atom_level_nm = _ref_local_levels(image_nm, mask, atoms_xy_px, (cx, cy), pixel_size_nm, ring_nm)
    yy, xx = np.ogrid[: image_nm.shape[0], : image_nm.shape[1]]
    r_px = max(1.0, 0.15 / pixel_size_nm)
    core = (xx - cx) ** 2 + (yy - cy) ** 2 <= r_px**2
    z_centre_nm = (
        float(image_nm[core].mean()) if core.any() else float(image_nm[int(round(cy)), int(round(cx))])
    )
    corrugation_nm = atom_level_nm - level_nm
    # flat surroundings (no atoms, no texture): no height reference, NaN rather than a huge ratio
    height_rel = (z_centre_nm - level_nm) / corrugation_nm if corrugation_nm > 1e-9 else float("nan")

    # extents of the pixel footprint along / across the rows (each pixel counts its own width once)
    a = math.radians(row_angle_deg or 0.0)
    ys, xs = np.nonzero(mask)
    along = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
    across = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
    extent_along_nm = (float(np.ptp(along)) + 1.0) * pixel_size_nm
    extent_across_nm = (float(np.ptp(across)) + 1.0) * pixel_size_nm

    # peak and fill of the footprint relative to the local level (sign from the footprint's mean)
    z_rel_nm = image_nm[mask] - level_nm
    mean_rel_nm = float(z_rel_nm.mean())
    peak_nm = float(z_rel_nm.max() if mean_rel_nm >= 0 else z_rel_nm.min())
    fill = mean_rel_nm / peak_nm if peak_nm != 0 else float("nan")

    values = {
        "peak_nm": peak_nm,
        "fill": fill,
        "extent_along_nm": extent_along_nm,
        "extent_across_nm": extent_across_nm,
        "height_rel": height_rel,
        "area_cells": area_nm2 / UNIT_CELL_AREA_NM2,
        "circularity": circularity,
    }
    return np.array([values[name] for name in FEATURE_NAMES], dtype=np.float64)




def _reference_features(img, bl, s, atoms_xy, ring_nm, angles):  # noqa: ANN001, ANN202
    """_reference_defect_features per blob on a crop (the pre-vectorisation implementation, except that atoms
    refined to just outside the frame (x or y in [-0.5, 0)) count like those at the far edges: the old crop
    filter dropped them at the top/left border only)."""
    h, w = img.shape
    pad = int(math.ceil((ring_nm + 1.5) / s))
    out = np.empty((len(bl.slices), len(FEATURE_NAMES)))
    for k, (sy, sx) in enumerate(bl.slices):
        y0, y1 = max(0, sy.start - pad), min(h, sy.stop + pad)
        x0, x1 = max(0, sx.start - pad), min(w, sx.stop + pad)
        mask = bl.labels[y0:y1, x0:x1] == k + 1
        ax, ay = atoms_xy[:, 0], atoms_xy[:, 1]
        near = (ax >= x0 - 0.5) & (ax < x1 + 0.5) & (ay >= y0 - 0.5) & (ay < y1 + 0.5)
        out[k] = _reference_defect_features(
            img[y0:y1, x0:x1], mask, s, atoms_xy[near] - [x0, y0], angles[k], ring_nm
        )
    return out


@pytest.mark.parametrize(("seed", "preset"), [(1_000_003, "realistic"), (1_000_005, "hard")])
def test_blob_features_match_classify_defect_features(seed: int, preset: str) -> None:
    f = simulate(seed, 160, None, preset)
    m = oracle_maps(f.image_nm, f.truth, f.bias_v)
    s = f.pixel_size_nm
    atoms, _ = pp.find_atoms(m.atom_prob, s)
    rng = np.random.default_rng(seed)
    checked = 0
    for prob in (m.protrusion_prob, m.depression_prob):
        bl = pp.find_blobs(prob, s)
        angles = [float(a) if a > 30 else None for a in rng.uniform(0, 180, len(bl.slices))]
        got = pp.blob_features(f.image_nm, bl, s, atoms, 1.2, angles)
        ref = _reference_features(f.image_nm, bl, s, atoms, 1.2, angles)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
        checked += len(bl.slices)
    assert checked > 3


def test_blob_features_worst_cases() -> None:
    """Blobs split into several 4-connected parts, touching the border, nested in another's hole, no atoms."""
    h, w, s = 60, 70, 0.1
    rng = np.random.default_rng(3)
    img = rng.normal(0, 0.02, (h, w)).astype(np.float32)
    prob = np.zeros((h, w), np.float32)
    prob[10:14, 10:14] = 1
    prob[14, 14] = prob[15, 15:18] = 1  # diagonal link: one 8-blob, two 4-components
    yy, xx = np.mgrid[:h, :w]
    r2 = (xx - 40) ** 2 + (yy - 30) ** 2
    prob[(r2 >= 36) & (r2 <= 100)] = 1  # an annulus ...
    prob[29:32, 39:42] = 1  # ... with a blob inside its hole
    prob[0:5, 60:70] = 1  # at the corner
    bl = pp.find_blobs(prob, s, min_area_nm2=0.0)
    assert len(bl.slices) == 4
    for atoms in (np.empty((0, 2)), rng.uniform(0, [w - 1, h - 1], (200, 2))):
        got = pp.blob_features(img, bl, s, atoms, 1.2, [None, 20.0, 95.0, None])
        ref = _reference_features(img, bl, s, atoms, 1.2, [None, 20.0, 95.0, None])
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_find_blobs_centres_and_scores() -> None:
    rng = np.random.default_rng(0)
    prob = ndimage.gaussian_filter(rng.random((80, 90)), 2).astype(np.float32)
    prob = (prob - prob.min()) / np.ptp(prob)
    bl = pp.find_blobs(prob, 0.1, 0.6, 0.0)
    idx = np.arange(1, len(bl.slices) + 1)
    assert len(idx) > 3
    com = np.asarray(ndimage.center_of_mass(prob, bl.labels, idx))[:, ::-1]
    np.testing.assert_allclose(bl.centre_xy_px, com, atol=1e-9)
    np.testing.assert_allclose(bl.score, ndimage.maximum(prob, bl.labels, idx), atol=0)
    np.testing.assert_array_equal(bl.area_px, ndimage.sum_labels(np.ones_like(prob), bl.labels, idx))
    ter = np.where(np.arange(90)[None, :] < 45, 0, 1) * np.ones((80, 1), int)
    ter[:, 44:47] = -1
    want = [pp.majority_label(ter, bl.labels, k + 1, sl) for k, sl in enumerate(bl.slices)]
    assert pp.blob_terraces(ter, bl).tolist() == want


@pytest.mark.parametrize("s", [0.1, 0.0733, 0.05, 0.2])
def test_near_mask_equals_thresholded_distance_transform(s: float) -> None:
    from stm_feedback.planner import distance_px, near_mask

    rng = np.random.default_rng(int(s * 1e4))
    mask = rng.random((90, 110)) > 0.995
    mask[40:46, 50:58] = True
    mask[0, :5] = True  # at the border
    for radius_nm in (0.6, 0.8, 1.0, 1.5, 2.0):
        d_nm = distance_px(mask) * s
        np.testing.assert_array_equal(near_mask(mask, radius_nm, s), d_nm - radius_nm < 0)
        np.testing.assert_array_equal(near_mask(mask, radius_nm, s, inclusive=True), d_nm <= radius_nm)
    assert not near_mask(np.zeros((5, 5), bool), 1.0, s).any()


def test_clearance_at_points_equals_full_maps() -> None:
    from stm_feedback.config import PlannerSettings
    from stm_feedback.planner import clearance_maps

    rng = np.random.default_rng(5)
    h, w, s = 120, 100, 0.1
    labels = np.zeros((h, w), np.int32)
    labels[:, 60:63] = -1
    step = labels < 0
    unres = np.zeros((h, w), bool)
    unres[100:, :30] = True
    avoid = {0.8: rng.random((h, w)) > 0.998, 1.5: np.zeros((h, w), bool)}
    avoid[1.5][20:24, 20:26] = True
    clear = clearance_maps(labels, step, unres, avoid, s, PlannerSettings())
    rows, cols = rng.integers(0, h, 500), rng.integers(0, w, 500)
    raw, slack = clear.at(rows, cols)
    # cv2's distances of multi-pixel masks are not always the correctly rounded float32 sqrt: 1 ulp
    np.testing.assert_allclose(raw, clear.raw_nm[rows, cols], rtol=3e-7, atol=0)
    np.testing.assert_allclose(slack, clear.slack_nm[rows, cols], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clear.safe, (clear.slack_nm >= 0) & (labels >= 0))


def test_partner_of_a_one_atom_dimer_is_mirrored_through_its_centre() -> None:
    """A dimer seen by one atom reports the other at the mirror position, where the atom map supports it."""
    from stm_feedback.pipeline import _with_partners

    atoms = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 1.0]])
    score = np.array([0.9, 0.8, 0.7])
    ter = np.array([0, 1, 1], np.int32)
    prob = np.zeros((32, 40), np.float32)
    prob[12, 10] = 0.5  # supports the partner of atom 0 (mirror of (10, 10) through (10, 11.2) = (10, 12.4))
    prob[22, 20] = 0.1  # too weak for the partner of atom 1
    single = np.array([0, 1, 2])
    centres = np.array([[10.0, 11.2], [20.0, 21.2], [30.0, 0.2]])  # atom 2's partner lies above the frame
    xy, sc, tr = _with_partners(atoms, score, ter, single, centres, prob, 0.2)
    assert len(xy) == 4
    np.testing.assert_allclose(xy[3], [10.0, 12.4])
    assert sc[3] == pytest.approx(0.5) and tr[3] == 0
    np.testing.assert_array_equal(xy[:3], atoms)  # detected atoms unchanged, first
    assert len(_with_partners(atoms, score, ter, single, centres, prob, 0.6)[0]) == 3


def test_atoms_inside_a_detected_depression_are_not_reported() -> None:
    """A depression footprint painted over part of the lattice removes the atoms in it from the output (and
    only those); with drop_atoms_in_depressions off they stay."""
    from dataclasses import replace as dc_replace

    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline

    f = simulate(1_000_311, 160, 0.1, "clean")
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    dep = np.zeros_like(maps.depression_prob)
    dep[60:90, 60:90] = 1.0  # 3 x 3 nm "vacancy" the net reports
    maps = dc_replace(maps, depression_prob=np.maximum(maps.depression_prob, dep))
    keep = Pipeline(Settings(), params=pp.PostprocessParams(drop_atoms_in_depressions=False))
    drop = Pipeline(Settings(), params=pp.PostprocessParams(drop_atoms_in_depressions=True))
    a_keep = keep.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    a_drop = drop.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)

    def inside(a):  # noqa: ANN001, ANN202
        return [p for p in a.atoms if 60 <= round(p.y_px) < 90 and 60 <= round(p.x_px) < 90]

    assert len(inside(a_keep)) > 20 and inside(a_drop) == []
    assert len(a_keep.atoms) - len(a_drop.atoms) >= len(inside(a_keep))
    assert len(a_drop.atoms) > 0.6 * len(a_keep.atoms)


def test_nearest_label_reaches_the_closest_terrace_pixel() -> None:
    """Step-band pixels (-1) get the label of the nearest labelled pixel within the radius, else -1."""
    labels = np.full((20, 30), -1, np.int32)
    labels[:, :10] = 0
    labels[:, 16:] = 1  # a 6 px band of -1 at columns 10..15
    rows = np.array([5, 5, 5, 5, 5])
    cols = np.array([3, 10, 12, 15, 20])
    np.testing.assert_array_equal(pp.nearest_label(labels, rows, cols, 3.0), [0, 0, 0, 1, 1])
    assert pp.nearest_label(labels, np.array([5]), np.array([13]), 2.0)[0] == -1  # 3 px from both
    assert pp.nearest_label(labels, np.array([5]), np.array([13]), 3.0)[0] in (0, 1)
    assert len(pp.nearest_label(labels, np.array([], int), np.array([], int), 3.0)) == 0


def test_atoms_in_a_wide_step_band_are_reported_but_not_planned_on() -> None:
    """The segmented step band is wider than the edge: atoms in it are reported (on their nearest terrace)
    when atom_step_max_prob allows, and the lattice fits and the planner see only terrace atoms."""
    from dataclasses import replace as dc_replace

    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline

    f = simulate(1_000_412, 192, 0.1, "clean", n_steps=(1, 1))
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    band = cv2.dilate(f.truth.step_mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # +-3 px
    maps = dc_replace(maps, step_prob=np.where(band, 0.6, 0.0).astype(np.float32))
    off = Pipeline(Settings(), params=pp.PostprocessParams(atom_step_max_prob=None))
    on = Pipeline(Settings(), params=pp.PostprocessParams(atom_step_max_prob=1.0))
    a_off = off.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    a_on = on.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)

    core = cv2.erode(band.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # 1 px inside the band's edge

    def in_band(a):  # noqa: ANN001, ANN202
        return [p for p in a.atoms if core[min(round(p.y_px), 191), min(round(p.x_px), 191)]]

    assert in_band(a_off) == []
    assert len(in_band(a_on)) > 10
    assert all(p.terrace >= 0 for p in in_band(a_on))
    assert len(a_on.dimers) > len(a_off.dimers)
    # the fits and the plan are those of the terrace atoms alone
    assert [(t.row_angle_deg, t.row_phase_nm) for t in a_on.terraces] == [
        (t.row_angle_deg, t.row_phase_nm) for t in a_off.terraces
    ]
    assert [s.dimers for s in a_on.sites] == [s.dimers for s in a_off.sites]
    np.testing.assert_array_equal(a_on.safe_mask, a_off.safe_mask)
    assert a_on.safe_mask.any()


def test_faint_depressions_are_not_reported_but_stay_must_avoid() -> None:
    """A depression blob whose peak probability is below depression_report_min_score is not in the defect
    list, but the safe mask keeps clear of it exactly as when it is reported."""
    from dataclasses import replace as dc_replace

    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline

    f = simulate(1_000_311, 160, 0.1, "clean")
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    dep = np.zeros_like(maps.depression_prob)
    dep[70:76, 70:76] = 0.8  # a faint "vacancy" on the lattice
    maps = dc_replace(maps, depression_prob=np.maximum(maps.depression_prob, dep))
    shown = Pipeline(Settings(), params=pp.PostprocessParams(depression_report_min_score=0.0))
    hidden = Pipeline(Settings(), params=pp.PostprocessParams(depression_report_min_score=0.85))
    a_shown = shown.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    a_hidden = hidden.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)

    def at_patch(a):  # noqa: ANN001, ANN202
        return [d for d in a.defects if 68 <= d.y_px <= 78 and 68 <= d.x_px <= 78]

    assert len(at_patch(a_shown)) == 1 and at_patch(a_hidden) == []
    assert len(a_hidden.defects) == len(a_shown.defects) - 1
    assert len(a_hidden.defect_features) == len(a_hidden.defects)
    np.testing.assert_array_equal(a_hidden.safe_mask, a_shown.safe_mask)
    assert not a_hidden.safe_mask[70:76, 70:76].any()


@pytest.mark.parametrize("pixel_size_nm, reported", [(0.1, True), (0.2, False)])
def test_coarse_frames_report_depressions_from_a_higher_score(pixel_size_nm: float, reported: bool) -> None:
    """A depression of peak probability 0.9 is reported on a 0.1 nm/px frame (>= depression_report_min_score
    0.85) and not on a 0.2 nm/px frame (< depression_report_min_score_coarse 0.95, from 0.18 nm/px on)."""
    from dataclasses import replace as dc_replace

    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline

    f = simulate(1_000_311, 160, pixel_size_nm, "clean")
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    dep = np.zeros_like(maps.depression_prob)
    dep[70:76, 70:76] = 0.9
    maps = dc_replace(maps, depression_prob=np.maximum(maps.depression_prob, dep))
    a = Pipeline(Settings(), params=pp.PostprocessParams()).analyze_maps(
        f.image_nm, maps, pixel_size_nm, f.bias_v
    )
    at_patch = [d for d in a.defects if 68 <= d.y_px <= 78 and 68 <= d.x_px <= 78]
    assert len(at_patch) == int(reported)
    assert not a.safe_mask[70:76, 70:76].any()  # must-avoid either way


def test_atoms_of_a_coarse_frame_are_found_on_the_net_grid() -> None:
    """A 0.2 nm/px frame: a dimer's two atoms (0.24 nm apart) are 1.2 px apart and merge into one peak of
    the frame-grid map; on the 2x finer net grid both are found, at their positions in frame pixels."""
    s_net, f = 0.1, 2
    hn, wn = 96, 120
    cy, cx = np.mgrid[6:hn - 6:8, 6:wn - 6:8]  # dimer centres on the net grid, rows along y
    cx, cy = cx.ravel() + 0.3, cy.ravel() + 0.2
    atoms_net = np.concatenate([np.stack([cx - 1.2, cy], 1), np.stack([cx + 1.2, cy], 1)])
    yy, xx = np.mgrid[:hn, :wn]
    prob = np.zeros((hn, wn), np.float32)
    for x, y in atoms_net:
        prob = np.maximum(prob, 0.9 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.6**2)))
    prob = prob.astype(np.float32)
    shape = (hn // f, wn // f)
    truth = (atoms_net + 0.5) / f - 0.5  # frame pixels (preprocess.resize's pixel-centre mapping)
    coarse = cv2.resize(prob, shape[::-1], interpolation=cv2.INTER_AREA)
    merged, _ = pp.find_atoms(coarse, s_net * f, threshold=0.2)
    assert len(merged) < 0.7 * len(truth)  # the reason for the net grid
    xy, score = pp.find_atoms_on_net_grid(prob, shape, s_net * f, threshold=0.2)
    assert len(xy) == len(truth) and (score > 0.5).all()
    d, _ = cKDTree(truth).query(xy)
    assert d.max() < 0.05  # frame px
    valid = np.zeros(shape, bool)
    valid[:, : shape[1] // 2] = True  # the left half only
    xy_v, _ = pp.find_atoms_on_net_grid(prob, shape, s_net * f, valid, threshold=0.2)
    assert len(xy_v) and (np.rint(xy_v[:, 0]) < shape[1] // 2).all()
    assert len(xy_v) == int((np.rint(truth[:, 0]) < shape[1] // 2).sum())


def test_small_terrace_inside_a_defect_is_not_a_terrace() -> None:
    """A region ringed by false step pixels around a big defect is dropped (-1) and the ids renumbered; a
    small terrace away from defects and a big one next to a defect stay."""
    from stm_feedback.postprocess import drop_defect_terraces

    s = 0.1
    labels = np.zeros((120, 120), np.int32)
    labels[10:30, 10:30] = -1  # step ring
    labels[14:26, 14:26] = 1  # inside the ring, 1.44 nm^2, on the defect
    labels[80:100, 80:100] = -1
    labels[84:96, 84:96] = 2  # a small terrace with no defect
    prot = np.zeros((120, 120), np.float32)
    prot[15:25, 15:25] = 0.9
    dep = np.zeros_like(prot)
    out = drop_defect_terraces(labels, prot, dep, s, max_area_nm2=15.0, min_fraction=0.8)
    assert (out[14:26, 14:26] == -1).all()
    assert set(np.unique(out).tolist()) == {-1, 0, 1} and (out[84:96, 84:96] == 1).all()
    assert (labels[14:26, 14:26] == 1).all()  # input untouched
    # the main terrace is next to the defect too, but large: kept; nothing dropped -> the same labels
    assert drop_defect_terraces(labels, prot, dep, s, max_area_nm2=1.0, min_fraction=0.8) is labels
    # depressions count as well
    out2 = drop_defect_terraces(labels, dep, prot, s, max_area_nm2=15.0, min_fraction=0.8)
    assert (out2[14:26, 14:26] == -1).all()


def test_lattice_smoothing_moves_reported_atoms_but_not_the_plan() -> None:
    """PostprocessParams.atom_smooth_sigma_nm: the reported atoms and dimers move onto the local lattice, the
    plan (safe mask, sites) is that of the detected peaks either way."""
    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline

    f = simulate(1_000_517, 160, 0.1, "realistic")
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    noisy = maps.atom_prob + np.random.default_rng(2).normal(0.0, 0.08, maps.atom_prob.shape)
    maps = dataclasses.replace(maps, atom_prob=np.clip(noisy, 0.0, 1.0).astype(np.float32))
    a = {
        sig: Pipeline(Settings(), params=pp.PostprocessParams(atom_smooth_sigma_nm=sig)).analyze_maps(
            f.image_nm, maps, 0.1, f.bias_v
        )
        for sig in (0.0, 0.6)
    }
    xy = {k: np.array([[p.x_px, p.y_px] for p in v.atoms]) for k, v in a.items()}
    # (partner atoms follow the dimers, so the counts may differ by a few)
    assert len(xy[0.6]) > 500 and abs(len(xy[0.6]) - len(xy[0.0])) < 0.02 * len(xy[0.0])
    moved, _ = cKDTree(xy[0.0]).query(xy[0.6])  # px, to the nearest peak
    assert np.median(moved) > 0.05 and np.percentile(moved, 95) <= 0.16 / 0.1 + 1e-3
    np.testing.assert_array_equal(a[0.0].safe_mask, a[0.6].safe_mask)
    assert [s.dimers for s in a[0.0].sites] == [s.dimers for s in a[0.6].sites]
    # no two reported atoms on one site (PostprocessParams.atom_min_separation_nm, 0.1 nm = 1 px here)
    assert cKDTree(xy[0.6]).query(xy[0.6], k=2)[0][:, 1].min() >= 1.0 - 1e-6
