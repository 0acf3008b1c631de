"""The lattice speed-ups of issue 6 (stm_feedback/lattice.py) give the fits of the implementation they
replaced (tests/lattice_reference.py, kept verbatim): real cos/sin instead of complex exponentials, the 2x2
Newton algebra in Python floats, the separable wave-vector grid, and all local tiles fitted at once.

Inputs: the truth atoms of seeded simulated frames (realistic and hard presets: drift shear, creep, several
terraces), jittered by 0.03 nm, and a synthetic terrace whose rows bend (local tile fits). The fast code sums
in a different order, so angles agree to 1e-6 deg (Newton stops after steps < 1e-5 deg; 7.5e-8 deg was the
largest difference on the 1757 tiles of 45 network-analysed frames), not bit for bit; the grid search of
``_best_on_grid`` picks the same wave vector exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import tests.lattice_reference as ref
from stm_feedback import lattice as fast
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, SURFACE_LATTICE_NM
from tests.test_pipeline_oracle import simulate

ANGLE_TOL_DEG = 1e-6
LENGTH_TOL_NM = 1e-7


def _terraces() -> list[np.ndarray]:
    """Atom positions (N, 2) nm of every terrace with >= 8 atoms of four simulated frames, jittered."""
    rng = np.random.default_rng(7)
    out = []
    for seed, preset in (
        (1_000_000, "realistic"),
        (1_000_001, "realistic"),
        (1_200_000, "hard"),
        (1_200_001, "hard"),
    ):
        f = simulate(seed, 256, 0.1, preset)
        t = f.truth
        xy = np.asarray(t.atoms_xy_px) * t.pixel_size_nm
        for k in np.unique(t.atom_terrace):
            sel = xy[np.asarray(t.atom_terrace) == k]
            if len(sel) >= 8:
                out.append(sel + rng.normal(scale=0.03, size=sel.shape))
    assert len(out) >= 6
    return out


def _bent_rows(seed: int, bend_nm: float = 0.6, size_nm: float = 24.0) -> np.ndarray:
    """Dimer atoms on rows at a random angle whose centre lines bend by ``bend_nm`` (sinusoid along the rows):
    no straight lattice fits the whole terrace, tiles of 5 nm do."""
    rng = np.random.default_rng(seed)
    a = np.deg2rad(rng.uniform(0, 180))
    u, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    pts = []
    for r in range(-25, 26):
        for m in range(-45, 46):
            along = m * SURFACE_LATTICE_NM
            centre = r * ROW_SPACING_NM + bend_nm * np.sin(2 * np.pi * along / size_nm)
            for side in (-0.5, 0.5):
                pts.append(along * u + (centre + side * DIMER_ATOM_SEPARATION_NM) * n)
    xy = np.array(pts) + rng.normal(scale=0.02, size=(len(pts), 2))
    xy = xy[np.all(np.abs(xy) < size_nm / 2, axis=1)]
    return xy[rng.random(len(xy)) > 0.1] + size_nm / 2


def _same_fit(a: fast.LatticeFit | None, b: ref.LatticeFit | None) -> None:
    assert (a is None) == (b is None), (a, b)
    if a is None:
        return
    assert fast.angle_diff_deg(a.row_angle_deg, b.row_angle_deg) < ANGLE_TOL_DEG, (a, b)
    assert fast.phase_diff_nm(a.row_phase_nm, b.row_phase_nm) < LENGTH_TOL_NM, (a, b)
    assert a.residual_nm == pytest.approx(b.residual_nm, abs=LENGTH_TOL_NM)
    assert a.coherence == pytest.approx(b.coherence, abs=1e-9)
    assert a.n_atoms == b.n_atoms


def test_row_fit_and_undistorted_angle_equal_the_reference() -> None:
    n_undist = 0
    for xy in _terraces():
        for prior in ("bonds", None):
            _same_fit(fast.fit_row_lattice(xy, prior_deg=prior), ref.fit_row_lattice(xy, prior_deg=prior))
        fit = ref.fit_row_lattice(xy)
        if fit is None:
            continue
        # the reference has no Newton step on all atoms after the subsample (session 6)
        u_fast = fast.undistorted_row_angle_deg(xy, fit.row_angle_deg, refine_all_iters=0)
        u_ref = ref.undistorted_row_angle_deg(xy, fit.row_angle_deg)
        assert (u_fast is None) == (u_ref is None)
        if u_ref is not None:
            n_undist += 1
            assert fast.angle_diff_deg(u_fast, u_ref) < ANGLE_TOL_DEG
    assert n_undist >= 4


def test_wavevector_grid_and_refinement_equal_the_reference() -> None:
    rng = np.random.default_rng(3)
    for xy in _terraces():
        xy_c = xy - xy.mean(axis=0)
        for k0 in (rng.normal(size=2) * 1.3, np.array([0.0, 1.0 / ROW_SPACING_NM])):
            g = fast._best_on_grid(xy_c, k0)
            assert np.array_equal(g, ref._best_on_grid(xy_c, k0))  # same grid point, same arithmetic
            k_fast, k_ref = fast.refine_wavevector(xy_c, g), ref.refine_wavevector(xy_c, g)
            assert np.allclose(k_fast, k_ref, rtol=0, atol=1e-9), (k_fast, k_ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_tile_fits_equal_one_fit_per_tile(seed: int) -> None:
    xy = _bent_rows(seed)
    assert ref.fit_row_lattice(xy) is None or ref.fit_row_lattice(xy).coherence < 0.8  # rows really bend
    for prior in (None, 30.0):
        want = ref.local_fits(xy, 5.0, 40, prior_deg=prior)
        got = fast.local_fits(xy, 5.0, 40, prior_deg=prior)
        assert list(got) == list(want) and len(want) >= 10
        for key in want:
            _same_fit(got[key], want[key])
    # the tile of each atom, as the pipeline uses it: floor(xy / tile) of the atoms of fitted tiles
    tile_of, keys, fits = fast.local_fit_tiles(xy, 5.0, 40)
    fitted = {k for k, f in zip(keys, fits, strict=True) if f is not None}
    assert fitted == set(ref.local_fits(xy, 5.0, 40))
    key_of = np.floor(xy / 5.0)
    for t, key in enumerate(keys):
        assert np.array_equal(np.flatnonzero(tile_of == t), np.flatnonzero(np.all(key_of == key, axis=1)))
    small = tile_of < 0
    _, inv, counts = np.unique(key_of, axis=0, return_inverse=True, return_counts=True)
    assert np.array_equal(small, counts[inv.ravel()] < 40)


def test_local_fits_of_few_atoms_and_tiles_without_prior() -> None:
    assert fast.local_fits(np.zeros((5, 2)), 5.0, 40) == {} == ref.local_fits(np.zeros((5, 2)), 5.0, 40)
    rng = np.random.default_rng(5)
    noise = rng.uniform(0, 20, size=(800, 2))  # no rows, no bonds: no prior, the full search per tile
    want, got = ref.local_fits(noise, 5.0, 40), fast.local_fits(noise, 5.0, 40)
    assert list(got) == list(want)
    for key in want:
        _same_fit(got[key], want[key])


@pytest.mark.parametrize("name", ["real_tile_atoms_0025", "real_tile_atoms_0043"])
def test_row_fit_on_real_tile_atoms(name: str) -> None:
    """Atoms detected on two real empty-state tiles (../shared/data/real-hsi100, MIT licence: rows along x,
    ~0.1 deg; row coherence only ~0.25), with the bond prior the pipeline passed (0025: NN-1 in bf16; 0043:
    the session-9 NN-0, prior 2.5 deg off). The prior's window has no strong peak, and the full
    search on the strided 300-atom subsample aliased onto a wrong angle: the fit was None before session 9."""
    from pathlib import Path

    d = np.load(Path(__file__).parent / "data" / f"{name}.npz")
    xy_nm = d["xy_pm"].astype(np.float64) / 1000.0
    fit = fast.fit_row_lattice(xy_nm, prior_deg=float(d["prior_deg"]))
    assert fit is not None and fit.coherence > 0.2
    assert fast.angle_diff_deg(fit.row_angle_deg, 0.1) < 0.5
