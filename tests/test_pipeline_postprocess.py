"""The fast post-processing agrees with the straightforward per-object reference computations.

Each vectorised function of postprocess.py / planner.py / lattice.py is compared with the simple (slow)
definition it replaces, on simulated frames with oracle maps and on synthetic worst cases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from stm_feedback import postprocess as pp
from stm_feedback.classify import FEATURE_NAMES, defect_features
from tests.test_pipeline_oracle import oracle_maps, simulate


def _reference_features(img, bl, s, atoms_xy, ring_nm, angles):  # noqa: ANN001, ANN202
    """classify.defect_features per blob on a crop (the pre-vectorisation implementation, except that atoms
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
        out[k] = defect_features(img[y0:y1, x0:x1], mask, s, atoms_xy[near] - [x0, y0], angles[k], ring_nm)
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
