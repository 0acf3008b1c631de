"""Metrics on synthetic data: matching optimality, exclusion rules, ARI conventions, angle wrap-around."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from simulator.truth import DefectTruth, GroundTruth, TerraceTruth
from stm_feedback.errors import InputError
from stm_feedback.metrics import (
    MatchCounts,
    angle_diff_deg,
    match_defects,
    match_points,
    score_frame,
    score_matching,
    terrace_ari,
)
from stm_feedback.schema import Analysis, Atom, Defect, Dimer, ImageInfo, Terrace


def _brute_force_matches(t: np.ndarray, p: np.ndarray, tol: float) -> tuple[int, float]:
    """(number of matches, summed distance) from one dense assignment over all points."""
    d = np.hypot(*(t[:, None, :] - p[None, :, :]).transpose(2, 0, 1))
    big = 1e6
    cost = np.where(d <= tol, d, big)
    a, b = linear_sum_assignment(cost)
    ok = cost[a, b] < big
    return int(ok.sum()), float(d[a[ok], b[ok]].sum())


def test_match_points_beats_greedy() -> None:
    # greedy nearest-first would pair 0.55 with 1.0 and leave 1.5 unmatched; the optimum matches both
    t = np.array([[0.0, 0.0], [1.0, 0.0]])
    p = np.array([[0.55, 0.0], [1.5, 0.0]])
    ti, pi = match_points(t, p, tol=0.6)
    assert sorted(zip(ti.tolist(), pi.tolist(), strict=True)) == [(0, 0), (1, 1)]


@pytest.mark.parametrize("seed", range(5))
def test_match_points_equals_dense_assignment(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 10, (60, 2))
    p = np.concatenate([t[:45] + rng.normal(0, 0.3, (45, 2)), rng.uniform(0, 10, (20, 2))])
    ti, pi = match_points(t, p, tol=0.5)
    assert len(set(ti.tolist())) == len(ti) and len(set(pi.tolist())) == len(pi)
    d = np.hypot(*(t[ti] - p[pi]).T)
    assert np.all(d <= 0.5)
    n_ref, sum_ref = _brute_force_matches(t, p, 0.5)
    assert len(ti) == n_ref
    assert d.sum() == pytest.approx(sum_ref, rel=1e-9, abs=1e-9)


def test_match_points_many_atoms_and_empty() -> None:
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(80) * 2.4, np.arange(80) * 3.84), -1).reshape(-1, 2)  # 6400 points
    p = g + rng.normal(0, 0.2, g.shape)
    ti, pi = match_points(g, p, tol=1.0)
    assert len(ti) == len(g)
    assert match_points(g, np.zeros((0, 2)), 1.0)[0].size == 0
    with pytest.raises(InputError):
        match_points(g, p[:, :1], 1.0)
    with pytest.raises(InputError):
        match_points(g, p, -1.0)


def test_score_matching_counts_and_rmse() -> None:
    t = np.array([[10.0, 10.0], [20.0, 10.0], [30.0, 10.0]])
    p = np.array([[10.3, 10.0], [20.0, 10.4], [50.0, 50.0]])  # 2 TP (0.3 px and 0.4 px off), 1 FP, 1 FN
    c, ti, pi = score_matching(t, p, tol_nm=0.1, pixel_size_nm=0.2)
    assert (c.tp, c.fp, c.fn) == (2, 1, 1)
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 3)
    assert c.rmse_nm == pytest.approx(np.sqrt((0.06**2 + 0.08**2) / 2))


def test_score_matching_exclusions() -> None:
    t = np.array([[10.0, 10.0], [20.0, 10.0]])
    t_ex = np.array([False, True])
    # p0 matches an included atom; p1 matches the excluded one (ignored); p2 is an excluded stray (ignored)
    p = np.array([[10.0, 10.0], [20.2, 10.0], [40.0, 40.0]])
    p_ex = np.array([False, False, True])
    c, _, _ = score_matching(t, p, 0.1, 0.1, t_ex, p_ex)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)
    # an excluded truth atom that is missed is not a false negative; an included one is
    c, _, _ = score_matching(t, np.zeros((0, 2)), 0.1, 0.1, t_ex, None)
    assert (c.tp, c.fp, c.fn) == (0, 0, 1)


def test_match_counts_sum_and_edge_cases() -> None:
    total = MatchCounts(1, 0, 1, 0.01) + MatchCounts(3, 1, 0, 0.03)
    assert (total.tp, total.fp, total.fn) == (4, 1, 1)
    assert total.f1 == pytest.approx(8 / 10)
    assert MatchCounts().f1 == 1.0 and np.isnan(MatchCounts().rmse_nm)
    assert MatchCounts(fp=2).f1 == 0.0


def test_terrace_ari_conventions() -> None:
    truth = np.zeros((20, 20), np.int64)
    truth[:, 10:] = 1
    truth[:, 9:11] = -1  # truth step band: not scored
    pred = np.where(np.arange(20)[None, :] < 10, 7, 3) * np.ones((20, 1), np.int64)  # relabelled, perfect
    assert terrace_ari(truth, pred)[0] == pytest.approx(1.0)
    pred_unknown = pred.copy()
    pred_unknown[:, 8:12] = -1  # predicted step band: reassigned to nearest terrace
    ari, unknown = terrace_ari(truth, pred_unknown)
    assert ari == pytest.approx(1.0) and unknown == pytest.approx(2 / 18)
    assert terrace_ari(truth, np.full((20, 20), 5))[0] == pytest.approx(0.0)
    single = np.zeros((20, 20), np.int64)
    spurious = np.zeros((20, 20), np.int64)
    spurious[:2, :] = 1
    assert terrace_ari(single, spurious)[0] == pytest.approx(0.9)  # majority fraction
    assert terrace_ari(single, np.full((20, 20), -1))[0] == pytest.approx(1.0)
    with pytest.raises(InputError):
        terrace_ari(single, spurious[:5])
    sliver = np.zeros((20, 20), np.int64)
    sliver[:, :1] = 1  # a 20-pixel truth sliver: merging it gives ARI 0 unless slivers are unscored
    assert terrace_ari(sliver, np.zeros((20, 20)))[0] == pytest.approx(0.0)
    assert terrace_ari(sliver, np.zeros((20, 20)), min_pixels=21)[0] == pytest.approx(1.0)


def test_angle_diff_wraps_modulo_180() -> None:
    assert angle_diff_deg(179.5, 0.3) == pytest.approx(0.8)
    assert angle_diff_deg(10.0, 100.0) == pytest.approx(90.0)
    assert angle_diff_deg(-5.0, 5.0) == pytest.approx(10.0)


# ----------------------------------------------------------------------------------------------------------
# a whole synthetic frame


def _synthetic_truth(pixel_size_nm: float = 0.1, size_px: int = 64) -> GroundTruth:
    rng = np.random.default_rng(1)
    labels = np.zeros((size_px, size_px), np.int32)
    labels[:, size_px // 2 :] = 1
    labels[:, size_px // 2 - 2 : size_px // 2 + 2] = -1
    dimers = rng.uniform(0, size_px - 1, (40, 2))
    atoms = np.concatenate([dimers + [1.2, 0], dimers - [1.2, 0]])
    unresolved = np.zeros((size_px, size_px), bool)
    unresolved[:10, :10] = True
    resolved = ~unresolved[
        np.rint(atoms[:, 1]).astype(int).clip(0, size_px - 1), np.rint(atoms[:, 0]).astype(int)
    ]
    resolved &= (atoms >= 0).all(1) & (atoms <= size_px - 1).all(1)
    defects = [
        DefectTruth(1, "dv1", "depression", True, 20.0, 20.0, 0, 1),
        DefectTruth(2, "db_single", "protrusion", False, 45.0, 40.0, 1, 1),
    ]
    return GroundTruth(
        pixel_size_nm=pixel_size_nm,
        height_px=size_px,
        width_px=size_px,
        atoms_xy_px=atoms,
        atom_terrace=(atoms[:, 0] > size_px // 2).astype(int),
        atom_resolved=resolved,
        dimers_xy_px=dimers,
        dimer_terrace=(dimers[:, 0] > size_px // 2).astype(int),
        dimer_row=np.zeros(len(dimers), int),
        dimer_bare=np.zeros(len(dimers), bool),
        defects=defects,
        defect_instances=np.zeros((size_px, size_px), np.int32),
        terrace_labels=labels,
        step_mask=labels < 0,
        unresolved_mask=unresolved,
        terraces=[TerraceTruth(0, 10.0, 0.1, 0.0), TerraceTruth(1, 100.0, 0.2, 0.1358)],
        tip_state="sharp",
    )


def _analysis_from(truth: GroundTruth, shift_px: float = 0.0) -> Analysis:
    return Analysis(
        image=ImageInfo(truth.height_px, truth.width_px, truth.pixel_size_nm),
        atoms=[Atom(x + shift_px, y, 0, 1.0) for x, y in truth.atoms_xy_px],
        dimers=[Dimer(x + shift_px, y, 0) for x, y in truth.dimers_xy_px],
        defects=[
            Defect(d.x_px, d.y_px, d.kind, 0, d.cls, 0.3, 1.0, 1.0, d.must_avoid) for d in truth.defects
        ],
        terraces=[Terrace(t.id + 5, t.row_angle_deg + 180.2, t.row_phase_nm) for t in truth.terraces],
        terrace_labels=np.where(truth.terrace_labels >= 0, truth.terrace_labels + 5, -1).astype(np.int32),
    )


def test_score_frame_oracle_and_shift() -> None:
    truth = _synthetic_truth()
    s = score_frame(truth, _analysis_from(truth))
    assert s.atoms.f1 == 1.0 and s.dimers.f1 == 1.0 and s.defects.f1 == 1.0
    assert s.atoms.rmse_nm == pytest.approx(0.0, abs=1e-12)
    assert s.kind_correct == s.kind_total == 2
    assert s.defect_class_found == {"dv1": [1, 1], "db_single": [1, 1]}
    assert s.terrace_ari == pytest.approx(1.0)
    assert s.angle_errors_deg == pytest.approx([0.2, 0.2]) and s.angles_missing == 0
    # excluded atoms exist (unresolved corner + border), so scored counts are below the truth count
    assert s.atoms.tp < len(truth.atoms_xy_px)
    # a constant 0.05 nm shift keeps atoms matched at 0.10 nm, with RMSE = the shift
    s = score_frame(truth, _analysis_from(truth, shift_px=0.5))
    assert s.atoms.f1 == 1.0 and s.atoms.rmse_nm == pytest.approx(0.05)
    # a 0.12 nm shift exceeds the atom tolerance but not the dimer tolerance
    s = score_frame(truth, _analysis_from(truth, shift_px=1.2))
    assert s.atoms.tp < 0.5 * len(truth.atoms_xy_px) and s.dimers.f1 == 1.0


def test_match_defects_matches_all_and_flags_the_border() -> None:
    """The error-analysis matching: every truth defect against every reported one within 0.40 nm, with
    border flags on both sides (no scoring exclusions)."""
    truth = _synthetic_truth()
    a = _analysis_from(truth)
    n = len(truth.defects)
    ti, pi, t_border, p_border = match_defects(truth, a)
    assert sorted(ti.tolist()) == list(range(n)) and sorted(pi.tolist()) == list(range(n))
    assert not t_border.any() and not p_border.any()
    # a reported defect 0.5 nm off its truth is not matched; one on the frame's edge pixel is flagged
    first = truth.defects[0]
    a.defects = [dataclasses.replace(a.defects[0], x_px=first.x_px + 5.0), a.defects[1]]
    a.defects.append(Defect(0.0, 10.0, "depression", 0, "x", 0.3, 1.0, 1.0, True))
    ti, pi, t_border, p_border = match_defects(truth, a)
    assert 0 not in ti.tolist() and 1 in ti.tolist()
    assert p_border.tolist() == [False, False, True]


def test_score_frame_missing_terraces_and_wrong_kinds() -> None:
    truth = _synthetic_truth()
    a = _analysis_from(truth)
    a.terraces = []
    a.defects = [Defect(d.x_px, d.y_px, "protrusion", 0, "x", 0.3, 1.0, 1.0, False) for d in truth.defects]
    s = score_frame(truth, a)
    assert s.angle_errors_deg == [90.0, 90.0] and s.angles_missing == 2
    assert (s.kind_correct, s.kind_total) == (1, 2)
    bad = _analysis_from(truth)
    bad.image = ImageInfo(32, 32, 0.1)
    with pytest.raises(InputError):
        score_frame(truth, bad)


def test_dihydrides_in_unresolved_regions_are_not_scored() -> None:
    """A dihydride's signature is atomic-scale (blurred away in an unresolved patch): missing it there is
    not a false negative and a prediction on it is not a false positive; other classes there still count."""
    truth = _synthetic_truth()
    truth.defects += [
        DefectTruth(3, "dihydride", "depression", True, 5.0, 5.0, 0, 1),  # in the unresolved corner
        DefectTruth(4, "dv1", "depression", True, 9.0, 8.0, 0, 1),  # in the corner too, still scored
        DefectTruth(5, "dihydride", "depression", True, 25.0, 50.0, 0, 1),  # resolved: scored
    ]
    full = _analysis_from(truth)
    s = score_frame(truth, full)
    assert (s.defects.tp, s.defects.fp, s.defects.fn) == (4, 0, 0)
    assert s.defect_class_found["dihydride"] == [1, 1]
    keep = [d for d in full.defects if (d.x_px, d.y_px) != (5.0, 5.0)]
    s = score_frame(truth, dataclasses.replace(full, defects=keep))
    assert (s.defects.tp, s.defects.fp, s.defects.fn) == (4, 0, 0)  # the unresolved dihydride is not missed
    keep = [d for d in full.defects if (d.x_px, d.y_px) not in ((9.0, 8.0), (25.0, 50.0))]
    s = score_frame(truth, dataclasses.replace(full, defects=keep))
    assert (s.defects.tp, s.defects.fn) == (2, 2)  # unresolved dv1 and resolved dihydride are
