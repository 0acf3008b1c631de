"""Planner rules: every rule on synthetic maps; zero false-safe sites on simulated frames (oracle maps).

Run as a script for the measurement quoted in docs/analysis-schema.md:
    .venv/bin/python -m tests.test_planner --n 100 --preset realistic
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from stm_feedback.config import PlannerSettings, Settings
from stm_feedback.errors import InputError
from stm_feedback.physics import ROW_SPACING_NM, SURFACE_LATTICE_NM
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner import clearance_maps, defect_rule, distance_px, parse_pattern, propose_sites
from tests.test_pipeline_oracle import oracle_maps, simulate

TOUCH_NM = 0.3  # a dimer (0.5 x 0.38 nm) centred closer than this to a footprint pixel touches it


# ---------------------------------------------------------------------------------------- synthetic rules
def _grid_dimers(shape: tuple[int, int], s: float, angle_deg: float = 0.0) -> np.ndarray:
    """Dimer centres (x_px, y_px) of an ideal lattice (rows along angle_deg) covering the frame."""
    a = np.radians(angle_deg)
    u, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    h, w = shape
    m = int(max(h, w) * s / SURFACE_LATTICE_NM) + 2
    i, j = np.meshgrid(np.arange(-m, m), np.arange(-m, m))
    c = np.array([w, h]) * s / 2
    pts = c + i.reshape(-1, 1) * SURFACE_LATTICE_NM * u + j.reshape(-1, 1) * ROW_SPACING_NM * n
    pts /= s
    ok = (pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1)
    return pts[ok]


def _plan(
    avoid: dict,
    step: np.ndarray | None = None,
    unres: np.ndarray | None = None,
    settings: PlannerSettings | None = None,
    shape: tuple[int, int] = (100, 100),
    s: float = 0.1,
    angle_deg: float = 0.0,
):  # noqa: ANN202
    ps = settings or PlannerSettings(max_sites=1000)
    labels = np.zeros(shape, np.int32)
    step = np.zeros(shape, bool) if step is None else step
    labels[step] = -1
    unres = np.zeros(shape, bool) if unres is None else unres
    clear = clearance_maps(labels, step, unres, avoid, s, ps)
    dimers = _grid_dimers(shape, s, angle_deg)
    sites = propose_sites(dimers, np.zeros(len(dimers), int), {0: angle_deg}, clear, s, ps)
    return clear, sites


def _min_dist_nm(sites, mask: np.ndarray, s: float) -> float:  # noqa: ANN001
    d = distance_px(mask) * s
    pts = np.array([p for site in sites for p in site.dimers])
    return float(d[np.rint(pts[:, 1]).astype(int), np.rint(pts[:, 0]).astype(int)].min())


def test_clean_terrace_gives_sites_on_rows() -> None:
    clear, sites = _plan({})
    assert clear.safe.sum() > 0 and len(sites) > 10
    for site in sites:
        pts = np.array(site.dimers) * 0.1
        assert len(pts) == 3
        steps = np.diff(pts, axis=0)
        np.testing.assert_allclose(np.hypot(steps[:, 0], steps[:, 1]), SURFACE_LATTICE_NM, atol=1e-6)
        np.testing.assert_allclose(steps[:, 1], 0.0, atol=1e-6)  # along the rows (angle 0)
        assert site.clearance_nm > 0


def test_rotated_rows_and_3x2_pattern() -> None:
    ps = PlannerSettings(pattern="3x2", max_sites=1000)
    _, sites = _plan({}, settings=ps, angle_deg=63.0)
    assert sites and all(len(s.dimers) == 6 and s.pattern == "3x2" for s in sites)
    pts = np.array(sites[0].dimers) * 0.1
    u = np.array([np.cos(np.radians(63.0)), np.sin(np.radians(63.0))])
    np.testing.assert_allclose((pts[1] - pts[0]) @ u, SURFACE_LATTICE_NM, atol=1e-6)


def test_depression_margin_respected() -> None:
    s, ps = 0.1, PlannerSettings(max_sites=1000)
    mask = np.zeros((100, 100), bool)
    mask[45:52, 45:52] = True
    _, sites = _plan({ps.depression_margin_nm: mask}, settings=ps)
    assert sites
    assert _min_dist_nm(sites, mask, s) >= ps.depression_margin_nm
    assert min(site.clearance_nm for site in sites) >= ps.depression_margin_nm - 0.1


def test_step_margin_and_step_split() -> None:
    s, ps = 0.1, PlannerSettings(max_sites=1000)
    step = np.zeros((100, 100), bool)
    step[:, 48:51] = True
    _, sites = _plan({}, step=step, settings=ps)
    assert sites
    assert _min_dist_nm(sites, step, s) >= ps.step_margin_nm


def test_unresolved_region_and_border_margin() -> None:
    s, ps = 0.1, PlannerSettings(max_sites=1000)
    unres = np.zeros((100, 100), bool)
    unres[:50] = True
    clear, sites = _plan({}, unres=unres, settings=ps)
    assert sites
    assert _min_dist_nm(sites, unres, s) >= ps.unknown_margin_nm
    pts = np.array([p for site in sites for p in site.dimers])
    assert pts.min() * s >= ps.border_margin_nm - 1e-9
    assert (99 - pts.max()) * s >= ps.border_margin_nm - 1e-9
    assert not clear.safe[:59].any() and clear.safe[59:90, 20:80].all()


def test_fully_blocked_frame_has_no_sites() -> None:
    _, sites = _plan({0.8: np.ones((100, 100), bool)})
    assert sites == []


def test_defect_rules() -> None:
    ps = PlannerSettings()
    assert defect_rule("depression", "depression-0", -2.0, 1.0, ps) == (True, ps.depression_margin_nm)
    assert defect_rule("protrusion", "db_single", 5.0, 3.0, ps) == (False, 0.0)
    assert defect_rule("protrusion", "litho_patch", 5.0, 3.0, ps) == (False, 0.0)
    assert defect_rule("protrusion", "adatom_cluster", 5.0, 1.0, ps) == (True, ps.adatom_margin_nm)
    assert defect_rule("depression", "dihydride", -1.0, 1.0, ps) == (True, ps.dihydride_margin_nm)
    # unlabelled protrusions: small and low = writable DB-like; large or high = adatom-like
    assert defect_rule("protrusion", "protrusion-0", 3.0, 1.0, ps)[0] is False
    assert defect_rule("protrusion", "protrusion-0", 3.0, 5.0, ps)[0] is True
    assert defect_rule("protrusion", "protrusion-0", 50.0, 1.0, ps)[0] is True
    assert defect_rule("protrusion", "protrusion-0", float("nan"), 1.0, ps)[0] is True
    assert defect_rule("mystery", "x", 0.0, 1.0, ps) == (True, ps.unknown_margin_nm)


def test_pattern_parsing() -> None:
    assert parse_pattern("3x1") == (3, 1) and parse_pattern("3x2") == (3, 2)
    with pytest.raises(InputError):
        parse_pattern("three")


def test_writable_defect_can_be_written_over() -> None:
    """A DB-like footprint imposes nothing: sites may sit on it."""
    _, sites_clean = _plan({})
    _, sites_db = _plan({})  # writable defects are simply not in avoid masks
    assert len(sites_db) == len(sites_clean)


# ---------------------------------------------------------------------------------------- simulated frames
def false_safe_count(sites, truth) -> tuple[int, int]:  # noqa: ANN001
    """(site dimers touching a must-avoid truth footprint / step edge / unresolved region, dimers violating
    2 nm step rule w.r.t. the truth step mask)."""
    s = truth.pixel_size_nm
    inst = np.asarray(truth.defect_instances)
    avoid_ids = [d.id for d in truth.defects if d.must_avoid]
    bad = np.isin(inst, avoid_ids) | np.asarray(truth.step_mask) | np.asarray(truth.unresolved_mask)
    bad |= np.asarray(truth.terrace_labels) < 0
    d_bad = distance_px(bad) * s
    d_step = distance_px(np.asarray(truth.step_mask) | (np.asarray(truth.terrace_labels) < 0)) * s
    pts = np.array([p for site in sites for p in site.dimers]).reshape(-1, 2)
    if len(pts) == 0:
        return 0, 0
    r, c = np.rint(pts[:, 1]).astype(int), np.rint(pts[:, 0]).astype(int)
    return int((d_bad[r, c] < TOUCH_NM).sum()), int((d_step[r, c] < 2.0 - s).sum())


def truth_has_window(truth, ps: PlannerSettings) -> bool:  # noqa: ANN001
    """Does the truth contain a clean window of the pattern (same rules, truth masks and truth dimers)?"""
    s = truth.pixel_size_nm
    inst = np.asarray(truth.defect_instances)
    avoid: dict[float, np.ndarray] = {}
    for d in truth.defects:
        if d.must_avoid:
            margin = {"adatom_cluster": ps.adatom_margin_nm, "dihydride": ps.dihydride_margin_nm}.get(
                d.cls, ps.depression_margin_nm
            )
            m = avoid.setdefault(margin, np.zeros(inst.shape, bool))
            m |= inst == d.id
    labels = np.asarray(truth.terrace_labels)
    clear = clearance_maps(
        labels, np.asarray(truth.step_mask), np.asarray(truth.unresolved_mask), avoid, s, ps
    )
    angles = {t.id: t.row_angle_deg for t in truth.terraces}
    sites = propose_sites(truth.dimers_xy_px, truth.dimer_terrace, angles, clear, s, ps)
    return len(sites) > 0


def run_frames(seeds, size_px: int = 192, preset: str = "realistic") -> dict:  # noqa: ANN001
    pipe = Pipeline(Settings())
    ps = pipe.settings.planner
    out = {"frames": 0, "sites": 0, "false_safe": 0, "step_rule": 0, "window_frames": 0, "found": 0}
    for seed in seeds:
        f = simulate(seed, size_px, None, preset)
        a = pipe.analyze_maps(
            f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), f.pixel_size_nm, f.bias_v
        )
        fs, st = false_safe_count(a.sites, f.truth)
        out["frames"] += 1
        out["sites"] += len(a.sites)
        out["false_safe"] += fs
        out["step_rule"] += st
        if truth_has_window(f.truth, ps):
            out["window_frames"] += 1
            out["found"] += bool(a.sites)
    return out


@pytest.mark.parametrize("preset", ["realistic", "hard"])
def test_zero_false_safe_on_simulated_frames(preset: str) -> None:
    r = run_frames(range(1_000_100, 1_000_106), size_px=160, preset=preset)
    assert r["false_safe"] == 0 and r["step_rule"] == 0, r
    if preset == "realistic":
        assert r["sites"] > 0


if __name__ == "__main__":  # measurement for the docs
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=1_000_000)
    ap.add_argument("--size-px", type=int, default=256)
    ap.add_argument("--preset", default="realistic")
    a = ap.parse_args()
    res = run_frames(range(a.first_seed, a.first_seed + a.n), a.size_px, a.preset)
    res["found_rate"] = res["found"] / max(1, res["window_frames"])
    print(res)
