"""Scan-line jitter (stm_feedback/jitter.py): estimate, line shifts, and the pipeline's corrected analysis."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stm_feedback import jitter
from stm_feedback.errors import InputError
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, SURFACE_LATTICE_NM

S_NM = 0.1  # px size of the synthetic frames
SIZE = 192


def _atoms_nm(angle_deg: float, extent_nm: float) -> np.ndarray:
    """Atom centres (nm) of a 2x1 lattice with rows at angle_deg covering [-1, extent + 1]^2."""
    a = np.radians(angle_deg)
    u, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    m = int(extent_nm * 2 / SURFACE_LATTICE_NM) + 4
    i, j = (g.reshape(-1, 1) for g in np.meshgrid(np.arange(-m, m), np.arange(-m, m)))
    c = np.array([extent_nm / 2, extent_nm / 2])
    d = c + i * SURFACE_LATTICE_NM * u + j * ROW_SPACING_NM * n
    pts = np.concatenate([d + n * DIMER_ATOM_SEPARATION_NM / 2, d - n * DIMER_ATOM_SEPARATION_NM / 2])
    return pts[np.all((pts > -1) & (pts < extent_nm + 1), axis=1)]


def _render(
    angle_deg: float, offsets_px: np.ndarray, seed: int = 0, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """(image (SIZE, SIZE), recorded atom positions (N, 2) px): Gaussian atoms, line r sampled at x + o_r
    (its content moved left by o_r, as simulator/scan.py records a jittered line), white noise; an atom is
    recorded at its nearest line's offset."""
    atoms_px = _atoms_nm(angle_deg, SIZE * S_NM) / S_NM
    sigma_px = 0.08 / S_NM
    xs = np.arange(SIZE)[None, :]
    img = np.zeros((SIZE, SIZE))
    for r in range(SIZE):
        near = np.abs(atoms_px[:, 1] - r) < 4 * sigma_px
        a = atoms_px[near]
        dx = xs + offsets_px[r] - a[:, 0:1]
        img[r] = np.exp(-(dx**2 + (r - a[:, 1:2]) ** 2) / (2 * sigma_px**2)).sum(axis=0)
    img += np.random.default_rng(seed).normal(0, noise, img.shape)
    inside = (atoms_px >= 0).all(axis=1) & (atoms_px <= SIZE - 1).all(axis=1)
    rec = atoms_px[inside].copy()
    rec[:, 0] -= offsets_px[np.rint(rec[:, 1]).astype(int)]
    return img, rec


def _poisson_jitter(seed: int, lam: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(lam, SIZE) * rng.choice([-1.0, 1.0], SIZE)


def _estimate(img: np.ndarray, atoms: np.ndarray, angle_deg: float, **kw: float) -> jitter.LineJitter:
    labels = np.zeros(img.shape, np.int32)
    ter = np.zeros(len(atoms), int)
    return jitter.estimate_line_jitter(img, labels, atoms, ter, {0: angle_deg}, S_NM, **kw)


@pytest.mark.parametrize("angle_deg", [30.0, 100.0])
def test_jitter_of_each_line_is_recovered(angle_deg: float) -> None:
    j = _poisson_jitter(1)
    img, atoms = _render(angle_deg, j)
    est = _estimate(img, atoms, angle_deg)
    err = est.offsets_px - (j - np.median(j))
    assert np.mean(np.abs(err) < 0.25) >= 0.9, np.round(err, 2)
    assert est.gain > 0.1
    assert est.rms_px == pytest.approx(np.sqrt(np.mean(est.offsets_px**2)))


def test_jitter_free_lines_stay_put() -> None:
    img, atoms = _render(30.0, np.zeros(SIZE))
    est = _estimate(img, atoms, 30.0, stop_below_gain=0.03)
    assert est.gain < 0.03
    assert not est.offsets_px.any()
    free = _estimate(img, atoms, 30.0)  # without the stop: every line's best offset, still ~0
    assert np.mean(np.abs(free.offsets_px) < 0.25) >= 0.95


def test_shift_lines_removes_the_jitter() -> None:
    j = _poisson_jitter(2)
    img, atoms = _render(30.0, j, noise=0.0)
    clean, _ = _render(30.0, np.zeros(SIZE), noise=0.0)
    fixed = jitter.shift_lines(img, j)
    inner = np.s_[:, 8:-8]  # lines moved in from outside the frame repeat their edge pixel
    assert np.allclose(fixed[inner], clean[inner], atol=1e-5)  # whole-pixel shifts: exact
    assert np.corrcoef(img[inner].ravel(), clean[inner].ravel())[0, 1] < 0.6


def test_unshift_returns_points_and_maps_to_the_recorded_lines() -> None:
    o = np.zeros(8)
    o[3] = 2.0
    o[5] = -1.4
    x = np.array([4.0, 4.0, 4.0])
    y = np.array([3.2, 4.9, 2.4])  # nearest lines 3, 5, 2
    # at 1 nm/px an atom-sized profile (0.09 px) covers its nearest line only
    assert jitter.unshift_x(x, y, o, 1.0) == pytest.approx([2.0, 5.4, 4.0], abs=1e-4)
    labels = np.arange(64, dtype=np.int32).reshape(8, 8)
    back = jitter.unshift_map(labels, o, -1)
    assert back.dtype == labels.dtype
    assert back[3].tolist() == [26, 27, 28, 29, 30, 31, -1, -1]  # out[3, x] = labels[3, x + 2]
    assert back[5].tolist() == [-1, 40, 41, 42, 43, 44, 45, 46]  # round(x - 1.4)
    assert (back[[0, 1, 2, 4, 6, 7]] == labels[[0, 1, 2, 4, 6, 7]]).all()
    mask = jitter.unshift_map(labels % 2 == 0, o, False)
    assert mask.dtype == bool and not mask[3, 6:].any()


def test_feature_offset_is_the_centre_of_the_recorded_blob() -> None:
    """A Gaussian atom (sigma 0.09 nm at 0.1 nm/px) recorded on lines with different offsets: the centroid
    of its recorded blob sits at x0 - feature_offset_px, not at x0 minus the nearest line's offset."""
    s_nm, h, w = 0.1, 32, 48
    rng = np.random.default_rng(4)
    o = rng.integers(-2, 3, h).astype(float)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    for y0 in (14.5, 15.3, 15.6):
        x0 = 24.0
        blob = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / (jitter.FEATURE_SIGMA_NM / s_nm) ** 2)
        rec = jitter.shift_lines(blob, -o)  # line r records at x what lies at x + o_r
        cx = float((rec * xx).sum() / rec.sum())
        want = x0 - float(jitter.feature_offset_px(o, np.array([y0]), s_nm)[0])
        assert cx == pytest.approx(want, abs=0.02)
        assert abs(cx - (x0 - o[int(np.rint(y0))])) > 0.3  # the nearest line's offset is not where it shows
    # it moves smoothly through a half row; the nearest line's offset jumps there
    o2 = np.zeros(8)
    o2[3], o2[4] = 2.0, -1.0
    f = jitter.feature_offset_px(o2, np.array([3.45, 3.5, 3.55]), s_nm)
    assert 0.0 < f[1] < 0.5 and abs(f[0] - f[2]) < 0.4  # lines 2 and 5 (offset 0) weigh in too
    assert jitter.feature_offset_px(np.zeros(8), np.array([3.5]), s_nm).tolist() == [0.0]


def test_bad_offsets_and_shapes_are_input_errors() -> None:
    img = np.zeros((8, 8))
    with pytest.raises(InputError):
        jitter.shift_lines(img, np.zeros(7))
    with pytest.raises(InputError):
        jitter.unshift_map(img, np.full(8, np.nan), 0.0)
    with pytest.raises(InputError):
        jitter.estimate_line_jitter(img, np.zeros((8, 9)), np.zeros((0, 2)), np.zeros(0), {}, S_NM)
    with pytest.raises(InputError):
        jitter.estimate_line_jitter(img, np.zeros((8, 8)), np.zeros((3, 2)), np.zeros(2), {}, S_NM)
    est = jitter.estimate_line_jitter(img, np.zeros((8, 8)), np.zeros((0, 2)), np.zeros(0), {0: 10.0}, S_NM)
    assert est.gain == 0.0 and not est.offsets_px.any()  # no terrace with enough atoms: nothing to measure


@pytest.fixture(scope="module")
def pipes():  # noqa: ANN201
    from stm_feedback.config import load_settings
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.postprocess import PostprocessParams

    on = Pipeline(load_settings())
    off = Pipeline(
        on.settings, runner=on.runner, params=dataclasses.replace(on.params, line_jitter_correction=False)
    )
    assert on.params.line_jitter_correction and isinstance(on.params, PostprocessParams)
    return on, off


def _jittered_frame():  # noqa: ANN202
    from tests.test_pipeline_oracle import NO_DRIFT, simulate

    return simulate(
        5, 256, 0.1, "realistic", p_jitter=1.0, jitter_lambda_px=(1.3, 1.3), p_double=0.0, **NO_DRIFT
    )


def test_pipeline_corrects_a_jittered_frame(pipes) -> None:  # noqa: ANN001
    from stm_feedback.metrics import score_frame

    on, off = pipes
    f = _jittered_frame()
    a_on = on.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    a_off = off.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    assert a_on.quality.line_jitter_rms_px > 0.5
    assert any("jitter" in n for n in a_on.quality.notes)
    assert "line_jitter" in a_on.timings_ms and "line_jitter" not in a_off.timings_ms
    assert a_off.quality.line_jitter_rms_px == 0.0
    f1_on, f1_off = score_frame(f.truth, a_on).atoms.f1, score_frame(f.truth, a_off).atoms.f1
    assert f1_on > f1_off + 0.05, (f1_on, f1_off)
    # the maps are on the recorded image's pixels: every proposed dimer sits on a safe pixel
    for site in a_on.sites:
        for x, y in site.dimers:
            assert a_on.safe_mask[int(round(y)), int(round(x))]
    assert a_on.terrace_labels.shape == f.image_nm.shape and a_on.terrace_labels.dtype == np.int32


def test_pipeline_leaves_a_jitter_free_frame_alone(pipes) -> None:  # noqa: ANN001
    from tests.test_pipeline_oracle import NO_DRIFT, simulate

    on, off = pipes
    f = simulate(6, 192, 0.1, "realistic", p_jitter=0.0, **NO_DRIFT)
    a_on = on.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    a_off = off.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
    assert a_on.quality.line_jitter_rms_px == 0.0
    assert a_on.timings_ms["line_jitter"] >= 0.0
    d_on, d_off = a_on.to_json_dict(), a_off.to_json_dict()
    for d in (d_on, d_off):
        d.pop("timings_ms")
    assert d_on == d_off
    assert np.array_equal(a_on.safe_mask, a_off.safe_mask)


def _analysis(defects=(), sites=(), double=False, labels_value=0):  # noqa: ANN001, ANN202
    from stm_feedback.schema import Analysis, ImageInfo, Quality

    n = 100
    return Analysis.with_lazy_rows(
        atoms=(np.array([10.0]), np.array([12.0]), np.array([labels_value]), np.array([0.9])),
        dimers=(np.array([10.0]), np.array([12.0]), np.array([labels_value]), np.array([0])),
        image=ImageInfo(n, n, 0.1, -1.5),
        defects=list(defects),
        sites=list(sites),
        quality=Quality(double_tip_suspected=double, notes=["double"] if double else []),
        terrace_labels=np.full((n, n), labels_value, np.int32),
        safe_mask=np.ones((n, n), bool),
        defect_features=np.zeros((len(defects), 3)),
    )


def test_merge_keeps_the_recorded_defects_and_avoids_them() -> None:
    from stm_feedback.config import PlannerSettings
    from stm_feedback.pipeline import merge_jitter_corrected
    from stm_feedback.schema import Defect, Site

    pit = Defect(50.0, 50.0, "depression", 0, "depression-0", 1.0, -0.5, 0.9, True, terrace=7)
    db = Defect(20.0, 80.0, "protrusion", 0, "db", 0.3, 0.5, 0.9, False, terrace=7)
    near = Site(50.0, 62.0, [[46.2, 62.0], [50.0, 62.0], [53.8, 62.0]], 3, 1.0)  # 1.2 nm from the pit
    far = Site(50.0, 85.0, [[46.2, 85.0], [50.0, 85.0], [53.8, 85.0]], 3, 1.0)
    planner = PlannerSettings()
    rec = _analysis([pit, db])
    cor = _analysis([], [near, far], labels_value=3)
    m = merge_jitter_corrected(rec, cor, planner)
    assert [(d.x_px, d.kind) for d in m.defects] == [(50.0, "depression"), (20.0, "protrusion")]
    assert [d.terrace for d in m.defects] == [3, 3]  # ids of the corrected (reported) terraces
    assert m.defect_features is rec.defect_features
    assert m.atoms == cor.atoms and m.terrace_labels is cor.terrace_labels
    r_px = (np.sqrt(1.0 / np.pi) + planner.depression_margin_nm + planner.detection_pad_nm) / 0.1
    yy, xx = np.mgrid[0:100, 0:100]
    d = np.hypot(xx - 50, yy - 50)
    assert not m.safe_mask[d < r_px - 1].any() and m.safe_mask[d > r_px + 1].all()  # db: not must-avoid
    assert m.sites == [far]
    # a double tip seen by either pass withholds every site
    m2 = merge_jitter_corrected(_analysis([], double=True), cor, planner)
    assert m2.quality.double_tip_suspected and not m2.safe_mask.any() and m2.sites == []
    assert "double" in m2.quality.notes


def test_the_correction_is_switched_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from stm_feedback.config import load_settings
    from stm_feedback.pipeline import Pipeline

    overrides = '{"line_jitter_correction": false, "line_jitter_max_px": 3}'
    monkeypatch.setenv("STM_FEEDBACK_POSTPROCESS", overrides)
    p = Pipeline(load_settings(), runner=object()).params
    assert p.line_jitter_correction is False and p.line_jitter_max_px == 3
    assert p.line_jitter_min_gain == 0.03  # the others keep their defaults
    monkeypatch.setenv("STM_FEEDBACK_POSTPROCESS", '{"no_such_parameter": 1}')
    with pytest.raises(InputError, match="no_such_parameter"):
        Pipeline(load_settings(), runner=object())


def test_unshift_analysis_moves_every_position_by_its_feature_offset() -> None:
    from stm_feedback.pipeline import unshift_analysis
    from stm_feedback.schema import Defect, Site

    o = np.zeros(100)
    o[40:60] = 2.0
    s_nm = 0.1
    pit = Defect(30.0, 50.0, "depression", 0, "depression-0", 1.0, -0.5, 0.9, True, terrace=0)
    far = Defect(30.0, 10.0, "protrusion", 0, "db", 0.3, 0.5, 0.9, False, terrace=0)
    site = Site(50.0, 59.6, [[46.2, 59.2], [50.0, 59.6], [53.8, 60.4]], 3, 1.0)
    a = _analysis([pit, far], [site])
    b = unshift_analysis(a, o, s_nm)

    def want(x: float, y: float) -> float:
        return round(x - float(jitter.feature_offset_px(o, np.array([y]), s_nm)[0]), 3)

    assert [(d.x_px, d.y_px) for d in b.defects] == [(28.0, 50.0), (30.0, 10.0)]
    (st,) = b.sites
    assert st.center_x_px == want(50.0, 59.6) and st.center_y_px == 59.6
    assert st.dimers == [[want(x, y), y] for x, y in site.dimers]
    assert 0.0 < 53.8 - st.dimers[2][0] < 0.5  # 0.4 px past the moved band: a fraction of its offset
    assert b.atoms == a.atoms  # row 12: an unmoved line
