"""Terraces (step-gap bridging, orientation split), dimers on the lattice and the drift-corrected row angle:
seeded synthetic lattices with known answers, and simulator frames with oracle maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stm_feedback import postprocess as pp
from stm_feedback.config import Settings
from stm_feedback.lattice import angle_diff_deg, fit_row_lattice, undistorted_row_angle_deg
from stm_feedback.metrics import lattice_angle_deg
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, SURFACE_LATTICE_NM
from stm_feedback.pipeline import Pipeline
from stm_feedback.schema import Terrace
from tests.test_pipeline_oracle import oracle_maps, simulate

S_NM = 0.1  # pixel size of the synthetic maps


def lattice_atoms(
    angle_deg: float, phase_nm: float, extent_nm: float, origin_nm: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Atoms (N, 2) nm of an ideal 2x1 lattice (rows along angle_deg, row centre lines at p.n = phase) and
    their dimer centres (N/2, 2), covering [0, extent)^2 + origin."""
    a = math.radians(angle_deg)
    u, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    k = int(extent_nm / SURFACE_LATTICE_NM) * 2 + 4
    i, j = np.meshgrid(np.arange(-k, k), np.arange(-k, k), indexing="ij")
    c = (i.ravel()[:, None] * SURFACE_LATTICE_NM) * u + (j.ravel()[:, None] * ROW_SPACING_NM + phase_nm) * n
    c = c + np.asarray(origin_nm)
    inside = np.all((c >= origin_nm) & (c < np.asarray(origin_nm) + extent_nm), axis=1)
    c = c[inside]
    half = DIMER_ATOM_SEPARATION_NM / 2
    atoms = np.concatenate([c + half * n, c - half * n])
    return atoms, c


# ------------------------------------------------------------------------------------------- step gaps
def _band(shape: tuple[int, int], row: int, x0: int, x1: int, half_width: int = 2) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[row - half_width : row + half_width + 1, x0:x1] = True
    return m


def test_small_border_sliver_is_a_terrace_but_a_small_inner_ring_is_not() -> None:
    """Components of 2-4 nm^2 stay terraces only where the frame border cuts them off."""
    s = 0.1  # nm/px: 4 nm^2 = 400 px
    prob = np.zeros((150, 100), np.float32)
    prob[:, 88:97] = 1.0  # a step band 3 px from the right border: beyond its grown edge a 150 x 2 px sliver
    prob[30:52, 30] = prob[30:52, 51] = prob[30, 30:52] = prob[51, 30:52] = 1.0  # a ring round 20 x 20 px
    without, _ = pp.segment_terraces(prob, s, 0.5, 4.0)
    with_border, _ = pp.segment_terraces(prob, s, 0.5, 4.0, min_border_area_nm2=2.0)
    sliver = np.s_[50, 98]
    assert without[sliver] == -1 and with_border[sliver] >= 0
    assert with_border[sliver] != with_border[50, 10]  # its own terrace
    assert without[40, 40] == with_border[40, 40] == -1  # the 3.2 nm^2 inside the ring: not a terrace
    assert (with_border == with_border[sliver]).sum() >= 300  # the sliver's 3 nm^2, the grown edge back on


def test_unfitted_terrace_turns_by_90_deg_from_its_fitted_neighbours() -> None:
    """A terrace with only the FFT's angle, next to fitted terraces across a step band, takes their angle + 90
    when its FFT angle is theirs (leaked rows); an FFT angle already turned, disagreeing neighbours, or no
    fitted neighbour within reach leave it as it is."""
    s = 0.1
    labels = np.full((100, 160), -1, np.int32)
    labels[:, :60] = 0  # fitted
    labels[:, 66:100] = 1  # FFT only, 6 px (0.6 nm) of step band from terrace 0
    labels[:, 106:] = 2  # fitted
    alt = pp.alternate_across_steps
    assert alt(labels, {0: 10.0, 1: 12.0, 2: 170.0}, {0, 2}, s) == {1: 100.0}
    assert alt(labels, {0: 10.0, 1: 95.0, 2: 170.0}, {0, 2}, s) == {}  # already turned
    assert alt(labels, {0: 10.0, 1: 12.0, 2: 100.0}, {0, 2}, s) == {}  # the neighbours disagree
    assert alt(labels, {0: 10.0, 1: 12.0, 2: 170.0}, {0, 2}, s, reach_nm=0.3) == {}  # none within reach
    assert alt(labels, {0: 10.0, 1: 12.0}, set(), s) == {}  # nothing fitted


def test_gap_in_step_is_bridged_and_splits_the_terraces() -> None:
    step = _band((160, 200), 80, 0, 90) | _band((160, 200), 80, 115, 200)  # 2.5 nm gap in the middle
    prob = step.astype(np.float32)
    labels_open, _ = pp.segment_terraces(prob, S_NM, 0.5, 4.0, close_gaps_nm=0.0)
    labels, step_out = pp.segment_terraces(prob, S_NM, 0.5, 4.0, close_gaps_nm=6.0)
    assert labels_open.max() == 0  # one terrace through the gap
    assert labels.max() == 1
    assert labels[20, 100] != labels[140, 100] and min(labels[20, 100], labels[140, 100]) >= 0
    assert step_out[80, 100]  # the bridge is step edge


def test_step_ending_short_of_the_border_is_extended_to_it() -> None:
    step = _band((160, 200), 60, 0, 180)  # ends 2 nm before the right border
    labels, _ = pp.segment_terraces(step.astype(np.float32), S_NM, 0.5, 4.0, close_gaps_nm=6.0)
    assert labels.max() == 1 and labels[10, 195] != labels[150, 195]


def test_compact_blobs_and_long_gaps_are_not_bridged() -> None:
    step = np.zeros((160, 200), bool)
    step[40:52, 40:50] = True  # a defect rim, not elongated
    step |= _band((160, 200), 120, 0, 40)  # a 4 nm piece pointing into a 16 nm gap
    step |= _band((160, 200), 120, 200 - 40, 200)
    out = pp.close_step_gaps(step, S_NM, reach_nm=6.0)
    assert np.array_equal(out, step)


def test_bridging_restores_a_simulated_step_with_a_gap() -> None:
    f = simulate(1_000_003, size_px=192, preset="hard", n_steps=(1, 1))
    truth = f.truth
    step = truth.step_mask.copy()
    rows, cols = np.nonzero(step)
    # cut a 2 nm gap across the step band at its middle column
    c0 = int(np.median(cols))
    gap = np.abs(np.arange(step.shape[1]) - c0) <= 10
    step[:, gap] = False
    labels_cut, _ = pp.segment_terraces(step.astype(np.float32), truth.pixel_size_nm, 0.5, 4.0, 0.0)
    labels, _ = pp.segment_terraces(step.astype(np.float32), truth.pixel_size_nm, 0.5, 4.0, 6.0)
    big = [t.id for t in truth.terraces if (truth.terrace_labels == t.id).sum() * truth.pixel_size_nm**2 > 20]
    assert len(big) == 2
    assert labels_cut.max() == 0  # the gap merged them
    centres = [np.argwhere(truth.terrace_labels == t).mean(axis=0).round().astype(int) for t in big]
    got = [labels[r, c] for r, c in centres]
    assert got[0] >= 0 and got[1] >= 0 and got[0] != got[1]


# ------------------------------------------------------------------------------------------- orientation
def _bonds(atoms: np.ndarray, tol: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    pairs = pp.pair_dimers(atoms, tol)
    a, b = atoms[pairs[:, 0]], atoms[pairs[:, 1]]
    return (a + b) / 2 / S_NM, (b - a) / S_NM


def test_terrace_with_rows_turning_by_90_deg_is_split() -> None:
    left, _ = lattice_atoms(10.0, 0.2, 10.0, (0.0, 0.0))
    right, _ = lattice_atoms(100.0, 0.1, 10.0, (10.0, 0.0))
    atoms = np.concatenate([left, right])
    labels = np.zeros((100, 200), np.int32)  # one terrace: NN-0 saw no step
    mids, vec = _bonds(atoms)
    out = pp.split_by_orientation(labels, S_NM, mids, vec)
    assert out.max() == 1
    assert out[50, 20] == 0 and out[50, 180] == 1  # ids in raster order
    # the boundary lies near x = 10 nm (100 px), within two 1.5 nm cells
    row = out[50]
    assert abs(int(np.argmax(row == 1)) - 100) <= 30


def test_one_lattice_with_false_bonds_is_not_split() -> None:
    rng = np.random.default_rng(5)
    atoms, _ = lattice_atoms(30.0, 0.0, 20.0)
    labels = np.zeros((200, 200), np.int32)
    mids, vec = _bonds(atoms)
    # 20 % false bonds of random direction scattered over the terrace
    k = len(mids) // 5
    mids = np.concatenate([mids, rng.uniform(0, 200, (k, 2))])
    phi = rng.uniform(0, np.pi, k)
    vec = np.concatenate([vec, 2.4 * np.stack([np.cos(phi), np.sin(phi)], 1)])
    out = pp.split_by_orientation(labels, S_NM, mids, vec)
    assert out is labels


# ------------------------------------------------------------------------------------------- dimers
def test_lattice_dimers_recovers_dimers_with_one_atom_missing() -> None:
    rng = np.random.default_rng(2)
    angle, phase = 25.0, 0.3
    atoms, centres = lattice_atoms(angle, phase, 8.0)
    n_d = len(centres)
    atoms = atoms + rng.normal(0, 0.01, atoms.shape)
    drop = rng.random(n_d) < 0.3  # one atom of 30 % of the dimers is missed by the network
    keep = np.concatenate([np.ones(n_d, bool), ~drop])
    # plus false atoms in the troughs between rows (offset 0.384 nm from a row centre line)
    a = math.radians(angle)
    n = np.array([-math.sin(a), math.cos(a)])
    trough = centres[:10] + (ROW_SPACING_NM / 2) * n
    xy = np.concatenate([atoms[keep], trough])
    score = np.full(len(xy), 0.9)
    pairs, got = pp.lattice_dimers(
        xy, score, np.full(len(xy), angle), np.full(len(xy), phase), bond_pairs=pp.pair_dimers(xy, 0.08)
    )
    d = np.linalg.norm(got[:, None, :] - centres[None, :, :], axis=2)
    assert len(got) == n_d  # every dimer once, no trough atom
    assert np.all(d.min(axis=1) < 0.05)
    assert len(np.unique(d.argmin(axis=1))) == n_d
    assert (pairs[:, 1] < 0).sum() == drop.sum()  # the one-atom dimers


def test_lattice_dimers_low_score_singles_and_unknown_lattice() -> None:
    atoms, centres = lattice_atoms(0.0, 0.0, 3.0)
    one = atoms[: len(centres)]  # one atom per dimer
    nan = np.full(len(one), np.nan)
    assert len(pp.lattice_dimers(one, np.full(len(one), 0.9), nan, nan)[0]) == 0  # no lattice, no dimers
    low = pp.lattice_dimers(one, np.full(len(one), 0.1), np.zeros(len(one)), np.zeros(len(one)))[0]
    assert len(low) == 0  # single atoms below the score threshold are not dimers


# ------------------------------------------------------------------------------------------- angle
@pytest.mark.parametrize(
    ("angle", "shear", "stretch"), [(12.0, 0.02, 0.01), (70.0, -0.015, -0.02), (135.0, 0.02, 0.0)]
)
def test_undistorted_angle_removes_a_drift_shear(angle: float, shear: float, stretch: float) -> None:
    rng = np.random.default_rng(int(angle))
    atoms, _ = lattice_atoms(angle, 0.1, 20.0)
    atoms = atoms + rng.normal(0, 0.015, atoms.shape)
    img = np.stack([atoms[:, 0] + shear * atoms[:, 1], (1 + stretch) * atoms[:, 1]], 1)  # slow axis = y
    fit = fit_row_lattice(img)
    assert fit is not None
    und = undistorted_row_angle_deg(img, fit.row_angle_deg)
    assert und is not None
    img_err = angle_diff_deg(fit.row_angle_deg, angle)  # the shear turns the image rows (least near 0 deg)
    assert img_err > (0.05 if angle < 45 else 0.3)
    assert angle_diff_deg(und, angle) < min(0.05, img_err / 2)


def test_undistorted_angle_uses_all_atoms() -> None:
    """Atoms in raster order, as find_atoms returns them, on a terrace with 5x more atoms than the grid's
    strided subsample (which then aliases with the lattice): the final Newton step on all atoms makes the
    angle several times more precise."""
    errs: dict[int, list[float]] = {0: [], 1: []}
    for seed, angle in enumerate((8.0, 33.0, 61.0, 104.0, 152.0)):
        rng = np.random.default_rng(seed)
        atoms, _ = lattice_atoms(angle, 0.37, 25.0)
        xy = atoms + rng.normal(0, 0.03, atoms.shape)
        px = np.rint(xy / 0.1)  # 0.1 nm pixels
        xy = xy[np.lexsort((px[:, 0], px[:, 1]))]  # rows top to bottom, left to right in each
        assert len(xy) > 4 * 800
        fit = fit_row_lattice(xy)
        assert fit is not None
        for it in errs:
            und = undistorted_row_angle_deg(xy, fit.row_angle_deg, refine_all_iters=it)
            assert und is not None
            errs[it].append(angle_diff_deg(und, angle))
    assert np.median(errs[1]) < 0.5 * np.median(errs[0])
    assert max(errs[1]) < 0.02


def test_undistorted_angle_needs_coherent_rows() -> None:
    rng = np.random.default_rng(0)
    assert undistorted_row_angle_deg(rng.uniform(0, 20, (400, 2)), 30.0) is None
    assert undistorted_row_angle_deg(np.zeros((10, 2)), 30.0) is None


def test_metric_scores_the_undistorted_angle_when_given() -> None:
    assert lattice_angle_deg(Terrace(0, 10.0, 0.0)) == 10.0
    assert lattice_angle_deg(Terrace(0, 10.0, 0.0, row_angle_undistorted_deg=9.5)) == 9.5


@pytest.mark.parametrize("seed", [1_000_002, 1_000_004])
def test_oracle_undistorted_angle_is_closer_to_truth(seed: int) -> None:
    """Drifted simulated frames, perfect atom maps: the drift-corrected angle is within 0.15 deg of the
    (drift-free) truth on every large terrace, and closer to it than the image-frame angle on average."""
    f = simulate(seed, size_px=256)
    a = Pipeline(Settings()).analyze_maps(
        f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), f.pixel_size_nm, f.bias_v
    )
    img_err, und_err = [], []
    for t in a.terraces:
        if t.n_atoms < 500 or t.row_angle_undistorted_deg is None:
            continue
        tl = f.truth.terrace_labels[a.terrace_labels == t.id]
        tt = {x.id: x for x in f.truth.terraces}[int(np.bincount(tl[tl >= 0]).argmax())]
        img_err.append(angle_diff_deg(t.row_angle_deg, tt.row_angle_deg))
        und_err.append(angle_diff_deg(t.row_angle_undistorted_deg, tt.row_angle_deg))
    assert und_err and max(und_err) < 0.15
    assert np.mean(und_err) <= np.mean(img_err)


def test_pair_dimers_equals_brute_force_mutual_nearest_neighbours() -> None:
    rng = np.random.default_rng(11)
    for _ in range(5):
        xy = rng.uniform(0, 6, (400, 2))
        d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
        np.fill_diagonal(d, np.inf)
        nn = d.argmin(axis=1)
        i = np.arange(len(xy))
        ok = (nn[nn] == i) & (i < nn) & (np.abs(d[i, nn] - DIMER_ATOM_SEPARATION_NM) < 0.08)
        want = np.stack([i[ok], nn[ok]], axis=1)
        assert np.array_equal(pp.pair_dimers(xy, 0.08), want)


def _atom_lattice(angle_deg: float, half_nm: float, stretch: float = 0.0) -> np.ndarray:
    """Dimer atoms (N, 2) nm of rows at ``angle_deg`` in a square of half-width ``half_nm``, the whole lattice
    stretched by (1 + ``stretch``) along x (a drift-like distortion)."""
    a = math.radians(angle_deg)
    u, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    i, k, side = np.meshgrid(np.arange(-80, 81), np.arange(-40, 41), [-1, 1], indexing="ij")
    along = i.ravel()[:, None] * SURFACE_LATTICE_NM
    across = (k.ravel() * ROW_SPACING_NM + 0.3 + side.ravel() * DIMER_ATOM_SEPARATION_NM / 2)[:, None]
    xy = along * u + across * n
    xy[:, 0] *= 1.0 + stretch
    return xy[(np.abs(xy) < half_nm).all(axis=1)]


@pytest.mark.parametrize("angle, stretch", [(0.0, 0.0), (33.0, 0.0), (90.0, 0.03), (121.0, -0.04)])
def test_lattice_smoothing_averages_position_noise_away(angle: float, stretch: float) -> None:
    true = _atom_lattice(angle, 8.0, stretch)
    noisy = true + np.random.default_rng(3).normal(0.0, 0.04, true.shape)
    ang = np.full(len(true), angle)
    out = pp.lattice_smooth_atoms(noisy, np.zeros(len(true), int), ang, 0.6, 0.12)
    inner = (np.abs(true) < 6.0).all(axis=1)  # the edge has neighbours on one side only

    def rms(q: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.sum((q[inner] - true[inner]) ** 2, axis=1))))

    # about 40 same-side neighbours in the Gaussian: the noise falls by more than half, the lattice (stretched
    # or not) is not pulled off its true positions
    assert rms(out) < 0.5 * rms(noisy)
    assert np.abs((out - true)[inner].mean(axis=0)).max() < 0.005


def test_lattice_smoothing_leaves_off_lattice_and_unassigned_atoms() -> None:
    true = _atom_lattice(20.0, 5.0)
    xy = true.copy()
    far = int(np.argmin(np.hypot(*true.T)))
    xy[far] += [0.2, 0.0]  # 0.2 nm off its site: not the lattice's atom (a defect rim, an anomaly)
    group = np.zeros(len(xy), int)
    group[:5] = -1
    ang = np.full(len(xy), 20.0)
    ang[5:10] = np.nan
    out = pp.lattice_smooth_atoms(xy, group, ang, 0.6, 0.12)
    assert np.array_equal(out[far], xy[far])
    assert np.array_equal(out[:10], xy[:10])
    # the exact lattice around it stays within what the one outlier's weight (~1/40) pulls
    assert np.abs(out - xy)[np.arange(len(xy)) != far].max() < 0.01


def test_lattice_smoothing_keeps_terraces_apart() -> None:
    # two terraces with rows at 90 deg, side by side: each atom is smoothed with its own terrace only, so an
    # exact lattice on both stays exact up to the Gaussian's reach across the boundary
    left, right = _atom_lattice(0.0, 6.0), _atom_lattice(90.0, 6.0) + [12.5, 0.0]
    xy = np.concatenate([left, right])
    group = np.r_[np.zeros(len(left), int), np.ones(len(right), int)]
    ang = np.r_[np.zeros(len(left)), np.full(len(right), 90.0)]
    out = pp.lattice_smooth_atoms(xy, group, ang, 0.6, 0.12)
    assert np.abs(out - xy).max() < 1e-3



def test_lattice_smoothing_of_many_terraces_on_grids_of_their_own() -> None:
    # a frame cut into very many terraces (or a huge one): each group on a grid of its own extent gives the
    # same sums as one grid with a channel per group, and no channel limit (OpenCV 5 blurs at most 128)
    rng = np.random.default_rng(4)
    ij = rng.integers(6, 46, (3000, 2))  # >= the blur's reach from the low edge, as lattice_smooth_atoms pads
    group = rng.integers(-1, 30, 3000)
    parts = rng.normal(size=(3000, 4))
    one_grid = pp._blurred_sums(ij, group, parts, 1.5)
    own_grids = pp._blurred_sums(ij, group, parts, 1.5, max_values=0)
    np.testing.assert_allclose(own_grids, one_grid, rtol=1e-4, atol=1e-4)
    assert np.all(own_grids[group < 0] == 0) and np.abs(one_grid[group >= 0]).max() > 0.1
    true = _atom_lattice(10.0, 6.0)
    out = pp.lattice_smooth_atoms(true, np.arange(len(true)) % 200, np.full(len(true), 10.0), 0.6, 0.16)
    assert out.shape == true.shape


def test_keep_separated_keeps_the_stronger_of_close_points() -> None:
    xy = np.array([[0.0, 0.0], [0.05, 0.0], [1.0, 1.0], [1.08, 1.0], [1.16, 1.0], [3.0, 3.0]])
    score = np.array([0.5, 0.9, 0.9, 0.4, 0.8, 0.1])
    keep = pp.keep_separated(xy, score, 0.1)
    # 0 and 1: the stronger (1) stays; the chain 2-3-4 (0.08 apart) keeps its ends 2 and 4; 5 is alone
    assert keep.tolist() == [False, True, True, False, True, True]
    assert pp.keep_separated(xy, score, 0.0).all() and pp.keep_separated(xy[:1], score[:1], 0.1).all()
