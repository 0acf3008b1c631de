"""Mean-shift defect classes: determinism, tiny inputs, separable clusters, features on synthetic blobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stm_feedback.classify import (
    FEATURE_NAMES,
    ClusterModel,
    cluster_defects,
    defect_features,
    row_aligned_patch,
)
from stm_feedback.errors import InputError
from stm_feedback.physics import UNIT_CELL_AREA_NM2

F = len(FEATURE_NAMES)


def _blobs(rng: np.random.Generator, centres: list[list[float]], n: list[int], sd: float) -> np.ndarray:
    """Gaussian clouds around centres; peak_nm and fill (last two columns) scatter sd / 8 (they are nm and
    fractions, the others corrugations, cells and nm extents)."""
    sds = np.array([sd] * (F - 2) + [sd / 8] * 2)
    return np.vstack([rng.normal(c, sds, (k, F)) for c, k in zip(centres, n, strict=True)])


def _three_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well separated synthetic depressions (3 classes) and protrusions (2 classes), physical-ish units."""
    rng = np.random.default_rng(seed)
    dep = _blobs(
        rng,
        [
            [-1, 1, 0.7, 0.4, 0.6, -0.05, 0.6],
            [-4, 3, 0.6, 1.2, 0.7, -0.1, 0.7],
            [-1.5, 8, 0.5, 2.5, 1.4, -0.12, 0.8],
        ],
        [40, 25, 15],
        0.04,
    )
    pro = _blobs(rng, [[6, 2, 0.9, 0.8, 0.8, 0.2, 0.8], [3, 1, 0.6, 0.4, 0.6, 0.1, 0.5]], [30, 20], 0.04)
    x = np.vstack([dep, pro])
    kinds = np.array(["depression"] * len(dep) + ["protrusion"] * len(pro), dtype=object)
    truth = np.array([0] * 40 + [1] * 25 + [2] * 15 + [3] * 30 + [4] * 20)
    return x, kinds, truth


def test_separable_clusters_recovered_per_kind_with_size_ordered_ids() -> None:
    x, kinds, truth = _three_clusters()
    cl = cluster_defects(x, kinds)
    for kind in ("depression", "protrusion"):
        sel = kinds == kind
        assert adjusted_rand_score(truth[sel], cl[sel]) == pytest.approx(1.0)
    # id 0 = biggest cluster of its kind
    assert np.all(cl[:40] == 0) and np.all(cl[40:65] == 1) and np.all(cl[65:80] == 2)
    assert np.all(cl[80:110] == 0) and np.all(cl[110:] == 1)


def test_deterministic_and_independent_of_input_order() -> None:
    x, kinds, _ = _three_clusters()
    a = cluster_defects(x, kinds)
    assert np.array_equal(a, cluster_defects(x.copy(), kinds.copy()))
    perm = np.random.default_rng(1).permutation(len(x))
    b = cluster_defects(x[perm], kinds[perm])
    assert np.array_equal(b, a[perm])  # numbering by size then centre, not by input order


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(n: int) -> None:
    x = np.array([[-1.0, 1.0, 0.7, 0.4, 0.6, -0.05, 0.6], [-1.02, 1.01, 0.71, 0.4, 0.6, -0.051, 0.61]])[:n]
    cl = cluster_defects(x, ["depression"] * n)
    assert cl.shape == (n,) and cl.dtype.kind == "i"
    if n:
        assert np.all(cl == 0)  # two near-identical defects share a cluster (scale floors)


def test_mixed_kinds_are_clustered_separately() -> None:
    # identical features, different kinds: each kind has its own cluster 0
    x = np.tile([[1.0, 2.0, 0.8, 0.5, 0.5, 0.1, 0.5]], (4, 1))
    cl = cluster_defects(x, ["depression", "protrusion", "depression", "protrusion"])
    assert np.array_equal(cl, [0, 0, 0, 0])


def test_bad_inputs_raise_input_error() -> None:
    with pytest.raises(InputError):
        cluster_defects(np.zeros((2, F)), ["depression"])
    with pytest.raises(InputError):
        cluster_defects(np.full((1, F), np.nan), ["depression"])
    with pytest.raises(InputError):
        cluster_defects(np.zeros((1, F)), ["bump"])


def test_cluster_model_predicts_nearest_centre_and_round_trips() -> None:
    x, kinds, _ = _three_clusters()
    model = ClusterModel()
    fitted = model.fit(x, kinds)
    assert np.array_equal(model.predict(x, kinds), fitted)
    again = ClusterModel.from_dict(model.to_dict())
    assert np.array_equal(again.predict(x, kinds), fitted)
    assert again.n_clusters("depression") == 3 and again.n_clusters("protrusion") == 2
    empty = ClusterModel()
    empty.fit(x[kinds == "depression"], kinds[kinds == "depression"])
    assert np.all(empty.predict(x[-2:], kinds[-2:]) == -1)  # protrusions never fitted


def _synthetic_pit(
    size_px: int = 64, pixel_size_nm: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of bright atoms along x (row period 0.768 nm) with a rectangular 1.2 x 0.6 nm pit at the
    centre."""
    yy, xx = np.mgrid[:size_px, :size_px] * pixel_size_nm
    image = 0.03 * np.cos(2 * np.pi * yy / 0.768) + 0.002 * xx  # rows + a tilt the features must ignore
    mask = np.zeros((size_px, size_px), bool)
    mask[29:36, 26:39] = True  # 13 px along x, 7 px along y
    image[mask] -= 0.08
    atoms_y = np.arange(0.0, size_px * pixel_size_nm, 0.768)
    atoms = np.array(
        [(x / pixel_size_nm, y / pixel_size_nm) for y in atoms_y for x in np.arange(0, 6.4, 0.384)]
    )
    return image, mask, atoms


def test_defect_features_units_on_a_synthetic_pit() -> None:
    image, mask, atoms = _synthetic_pit()
    f = dict(zip(FEATURE_NAMES, defect_features(image, mask, 0.1, atoms, row_angle_deg=0.0), strict=True))
    assert f["area_cells"] == pytest.approx(mask.sum() * 0.01 / UNIT_CELL_AREA_NM2)
    assert f["extent_along_nm"] == pytest.approx(1.3, abs=1e-9)  # 13 px along x
    assert f["extent_across_nm"] == pytest.approx(0.7, abs=1e-9)  # 7 px along y
    assert f["height_rel"] < -1.0  # deeper than the row corrugation
    assert 0.5 < f["circularity"] < 0.8  # a 2:1 rectangle: pi/4 * 8/9 = 0.70
    # 0.08 nm pit on rows of +-0.03 nm around the level (the ring's median): the floor is 0.05-0.11 nm down
    assert -0.115 < f["peak_nm"] < -0.05
    assert 0.5 < f["fill"] <= 1.0  # a flat floor with the row modulation on it
    # rotating the row frame by 90 degrees swaps the extents
    g = dict(zip(FEATURE_NAMES, defect_features(image, mask, 0.1, atoms, row_angle_deg=90.0), strict=True))
    assert g["extent_along_nm"] == pytest.approx(f["extent_across_nm"])
    with pytest.raises(InputError):
        defect_features(image, np.zeros_like(mask), 0.1)


def test_row_aligned_patch_rotates_rows_onto_x() -> None:
    # stripes along direction 30 deg: after alignment they must run along the patch's x axis
    a = math.radians(30.0)
    yy, xx = np.mgrid[:128, :128] * 0.1
    across = -xx * math.sin(a) + yy * math.cos(a)
    image = np.cos(2 * np.pi * across / 0.768).astype(np.float32)
    patch = row_aligned_patch(image, 64, 64, 0.1, row_angle_deg=30.0, size_px=24, patch_pixel_size_nm=0.1)
    assert patch.shape == (24, 24) and patch.dtype == np.float32
    assert (
        np.std(patch, axis=1).mean() < 0.1 * np.std(patch, axis=0).mean()
    )  # constant along x, varies along y


def test_big_sets_use_bin_seeding_and_still_recover_clusters() -> None:
    from stm_feedback.classify import BIN_SEEDING_ABOVE

    rng = np.random.default_rng(3)
    centres = np.array(
        [
            [-1, 1, 0.7, 0.4, 0.6, -0.05, 0.6],
            [-4, 3, 0.6, 1.2, 0.7, -0.1, 0.7],
            [-1.5, 8, 0.5, 2.5, 1.4, -0.12, 0.8],
        ]
    )
    truth = rng.integers(0, 3, BIN_SEEDING_ABOVE + 200)
    x = centres[truth] + rng.normal(0, [0.04] * (F - 2) + [0.005] * 2, (len(truth), F))
    cl = cluster_defects(x, ["depression"] * len(truth))
    assert adjusted_rand_score(truth, cl) == pytest.approx(1.0)


def test_kind_features_select_the_clustered_columns_and_old_models_use_all() -> None:
    from stm_feedback.classify import KIND_FEATURES

    rng = np.random.default_rng(5)
    # two protrusion groups differing only in area_cells (not a protrusion clustering column): one cluster
    base = np.array([4.0, 2.0, 0.8, 0.8, 0.8, 0.18, 0.8])
    x = np.vstack([base + rng.normal(0, 0.005, (20, F)) for _ in range(2)])
    x[20:, FEATURE_NAMES.index("area_cells")] += 5.0
    kinds = ["protrusion"] * 40
    assert "area_cells" not in KIND_FEATURES["protrusion"]
    assert np.all(cluster_defects(x, kinds) == 0)
    # a model without per-kind columns (stored before they existed) clusters on every column
    d = ClusterModel().to_dict()
    del d["kind_features"]
    old = ClusterModel.from_dict(d)
    assert old.columns("protrusion") == list(range(F))
    assert len(set(old.fit(x, kinds))) == 2


def test_truth_features_see_a_two_row_pit_as_one_object() -> None:
    from stm_feedback.classify import _close_gaps

    mask = np.zeros((30, 30), bool)
    mask[8:14, 5:20] = True  # row 0: 0.6 nm across at 0.1 nm/px
    mask[16:22, 9:16] = True  # next row, 0.168 nm gap -> 2 px
    closed = _close_gaps(mask, 0.1)
    assert (closed & ~mask).any() and closed[8:22, 9:16].all()
    image = np.zeros((30, 30)) + 0.01 * np.cos(np.arange(30) * 2.0)[:, None]
    image[mask] -= 0.1
    f = dict(zip(FEATURE_NAMES, defect_features(image, closed, 0.1), strict=True))
    assert f["extent_across_nm"] == pytest.approx(1.4)  # both rows, not the bigger one only


def test_standardised_is_the_space_mean_shift_ran_in() -> None:
    """The nearest fitted centre in ``standardised`` space is the cluster ``predict`` gives (dendrogram)."""
    x, kinds, _ = _three_clusters()
    model = ClusterModel()
    fitted = model.fit(x, kinds)
    for kind in ("depression", "protrusion"):
        sel = kinds == kind
        z = model.standardised(x[sel], kind)
        assert z.shape == (sel.sum(), len(model.columns(kind)))
        assert np.allclose(z.mean(axis=0), 0.0, atol=1e-9)  # z-scored with the fitted mean
        d2 = ((z[:, None, :] - model.kinds[kind].centres[None]) ** 2).sum(axis=2)
        assert np.array_equal(d2.argmin(axis=1), fitted[sel])
    with pytest.raises(InputError):
        ClusterModel().standardised(x, "protrusion")
