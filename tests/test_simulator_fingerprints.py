"""Performance work must not change what the simulator renders: seeded frames are compared with fingerprints
stored before the optimisation (tests/data/simulator_fingerprints.json; tests/simulator_fingerprints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.simulator_fingerprints import (
    CASES,
    _fingerprint,
    render_case,
    render_instrument,
    render_instrument_moves,
)

STORED = json.loads((Path(__file__).parent / "data" / "simulator_fingerprints.json").read_text())
# image values are float32 nm of magnitude < ~2 nm: float32 rounding is ~1e-7 nm; allow reordered float64 sums
PIXEL_ATOL_NM = 2e-6
POSITION_ATOL_PX = 1e-6
EXACT_KEYS = (
    "n_atoms",
    "n_dimers",
    "n_defects",
    "n_atom_resolved",
    "n_dimer_bare",
    "dimer_row_sum",
    "defect_pixels",
    "defect_instance_sum",
    "terrace_label_sum",
    "step_pixels",
    "unresolved_pixels",
    "tip_state",
    "tip_change_lines",
)


def _compare(name: str, got: dict) -> None:
    want = STORED[name]
    for key in EXACT_KEYS:
        assert got[key] == want[key], f"{name}: {key} {got[key]} != {want[key]}"
    for key in ("image_mean", "image_std", "image_min", "image_max"):
        assert got[key] == pytest.approx(want[key], abs=PIXEL_ATOL_NM), f"{name}: {key}"
    for key in ("block_means", "pixels"):
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=PIXEL_ATOL_NM, err_msg=f"{name}: {key}")
    for key in ("atoms_xy_sum", "dimers_xy_sum"):
        # sums over ~10^3-10^4 positions: relative float64 reordering error only
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=POSITION_ATOL_PX, err_msg=name)
    assert [d[0] for d in got["defects"]] == [d[0] for d in want["defects"]], name
    assert [d[3:] for d in got["defects"]] == [d[3:] for d in want["defects"]], name
    np.testing.assert_allclose(
        np.array([d[1:3] for d in got["defects"]], dtype=float).reshape(-1, 2),
        np.array([d[1:3] for d in want["defects"]], dtype=float).reshape(-1, 2),
        rtol=0,
        atol=POSITION_ATOL_PX,
        err_msg=name,
    )
    np.testing.assert_allclose(
        np.array(got["terraces"], dtype=float).reshape(-1, 3),
        np.array(want["terraces"], dtype=float).reshape(-1, 3),
        rtol=0,
        atol=1e-9,
        err_msg=name,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_frame_matches_stored_fingerprint(case) -> None:
    _compare(case.name, _fingerprint(render_case(case)))


def test_instrument_scan_matches_stored_fingerprint() -> None:
    _compare("instrument", _fingerprint(render_instrument()))


def test_instrument_after_moves_matches_stored_fingerprint() -> None:
    _compare("instrument_moves", _fingerprint(render_instrument_moves()))


def test_fingerprint_detects_a_change() -> None:
    """The comparison is sensitive: a 1e-4 nm bump on a few pixels of a frame must fail it."""
    frame = render_case(CASES[0])
    frame.image_nm[60:64, 60:64] += 1e-4
    with pytest.raises(AssertionError):
        _compare(CASES[0].name, _fingerprint(frame))


def test_may_be_inside_never_drops_a_point_that_maps_inside() -> None:
    """The conservative pre-filter of lattice_truth: strong drift, creep and jitter, points all around."""
    from simulator.scan import Drift, ScanGeometry

    rng = np.random.default_rng(0)
    drift = Drift(velocity_nm_per_s=np.array([0.05, -0.03]))  # 3 nm/min
    drift.add_creep(0.0, np.array([1.5, 0.8]), 10.0)
    geom = ScanGeometry(
        centre_nm=np.array([3.0, -2.0]),
        angle_deg=37.0,
        pixel_size_nm=0.1,
        height_px=96,
        width_px=80,
        t0_s=0.0,
        line_time_s=0.4,
        jitter_px=rng.poisson(2.0, 96) * rng.choice([-1.0, 1.0], 96),
        drift=drift,
    )
    xy = rng.uniform(-12.0, 12.0, (20000, 2)) + geom.centre_nm
    px = geom.to_pixels(xy)
    inside = (px[:, 0] >= -0.5) & (px[:, 0] <= 79.5) & (px[:, 1] >= -0.5) & (px[:, 1] <= 95.5)
    keep = geom.may_be_inside(xy)
    assert inside.sum() > 1000 and (~keep).sum() > 1000  # both sides exercised
    assert not np.any(inside & ~keep)
