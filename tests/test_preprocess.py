"""Input handling of the networks: validation, normalisation, resampling and padding round trips, polarity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from stm_feedback import preprocess
from stm_feedback.errors import InputError
from stm_feedback.preprocess import (
    crop_padding,
    estimate_rows_dark,
    level_plane_lines,
    map_coords,
    normalize_frame,
    pad_to_multiple,
    resampled_shape,
    resize,
    row_band,
    step_jumps,
    validate_frame,
)


def _blobs(shape: tuple[int, int], xy: np.ndarray, sigma_px: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape, np.float32)
    for x, y in xy:
        out += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma_px**2)).astype(np.float32)
    return out


@pytest.mark.parametrize(
    "image, px, bias",
    [
        (np.zeros((4, 32, 32)), 0.1, None),  # wrong ndim
        (np.zeros(32), 0.1, None),
        (np.zeros((0, 32)), 0.1, None),  # empty
        (np.zeros((4, 32)), 0.1, None),  # too small
        (np.full((32, 32), np.nan), 0.1, None),  # non-finite
        (np.zeros((32, 32)), 0.0, None),  # absurd pixel sizes
        (np.zeros((32, 32)), 50.0, None),
        (np.zeros((32, 32)), float("nan"), None),
        (np.zeros((32, 32)), 0.1, 0.0),  # zero bias
        (np.zeros((32, 32), complex), 0.1, None),
        ([[0.0] * 32] * 32, 0.1, None),  # not an array
    ],
)
def test_validate_frame_rejects_bad_input(image: object, px: float, bias: float | None) -> None:
    with pytest.raises(InputError):
        validate_frame(image, px, bias)  # type: ignore[arg-type]


def test_validate_frame_accepts_ints_and_returns_float32() -> None:
    out = validate_frame(np.arange(64 * 48, dtype=np.int16).reshape(64, 48), 0.1, -2.0)
    assert out.dtype == np.float32 and out.shape == (64, 48)


def test_levelling_removes_plane_and_line_offsets() -> None:
    rng = np.random.default_rng(0)
    h, w = 64, 80
    yy, xx = np.mgrid[0:h, 0:w]
    lattice = 0.03 * np.cos(2 * np.pi * xx / 7.68)
    img = lattice + 0.01 * xx + 0.02 * yy + rng.normal(0, 0.05, h)[:, None]
    lev = level_plane_lines(img.astype(np.float32), smooth_px=4.0)
    resid = lev - lattice
    assert np.ptp(resid) < 0.02  # plane (1.4 nm of tilt) and line offsets gone


def test_levelling_keeps_rows_parallel_to_the_scan_lines() -> None:
    """Rows along x (the scan lines) make the corrugation a per-line offset: keep it, remove the jitter."""
    rng = np.random.default_rng(2)
    h, w, px = 256, 96, 0.1
    yy, xx = np.mgrid[0:h, 0:w]
    rows = 0.03 * np.cos(2 * np.pi * yy * px / 0.768)  # rows along x, 0.768 nm apart
    jitter = rng.normal(0, 0.02, h)[:, None]
    img = (rows + 0.01 * yy + jitter).astype(np.float32)
    lev = level_plane_lines(img, smooth_px=4.0, pixel_size_nm=px)
    profile = lev.mean(axis=1)
    corr = np.corrcoef(profile, rows[:, 0])[0, 1]
    assert corr > 0.75  # the old Gwyddion-style levelling gave ~0: the rows were erased
    # the jitter outside the row band is removed: residual far below the 0.02 nm jitter
    resid = profile - rows[:, 0] - (profile - rows[:, 0]).mean()
    assert np.std(resid) < 0.6 * 0.02
    # only jitter (rows oblique to the lines): nothing is kept, the levelling is the plain Gwyddion-style one
    for seed in range(20):
        white = np.random.default_rng(seed).normal(0, 0.02, h)
        assert not np.any(row_band(white, px)) and not np.any(row_band(white.cumsum(), px))  # jitter, wander
    # without a pixel size there is no band to keep (and the old behaviour is unchanged)
    assert abs(np.corrcoef(level_plane_lines(img, 4.0).mean(axis=1), rows[:, 0])[0, 1]) < 0.5


@pytest.mark.parametrize("step_nm", [0.136, -0.272])
def test_levelling_keeps_a_step_along_the_scan_lines(step_nm: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step edge parallel to the scan lines is a per-line offset: the terraces must keep their height."""
    rng = np.random.default_rng(3)
    h, w, px = 200, 120, 0.1
    yy, xx = np.mgrid[0:h, 0:w]
    edge = 117 + np.round(2 * np.sin(np.arange(w) / 7.0)).astype(int)  # rough (kinks over +-2 lines)
    lower = yy >= edge[None, :]
    # single-height step: the dimer rows (0.768 nm) run along y above it and along x below it
    rows = np.where(lower, np.cos(2 * np.pi * yy * px / 0.768), np.cos(2 * np.pi * xx * px / 0.768))
    img = (0.02 * rows + step_nm * lower).astype(np.float32)
    img += rng.normal(0, 0.003, h).cumsum()[:, None].astype(np.float32)  # line-offset wander
    monkeypatch.setattr(preprocess, "KEEP_STEP_JUMPS", True)
    lev = level_plane_lines(img, smooth_px=4.0, pixel_size_nm=px)
    jump = np.median(lev[122:132]) - np.median(lev[102:112])
    assert jump == pytest.approx(step_nm, abs=0.03)
    # the same jump with rows that do not turn (a tip change, offset wander) is levelled away as before
    flat = (0.02 * np.cos(2 * np.pi * xx * px / 0.768) + step_nm * lower).astype(np.float32)
    lev_flat = level_plane_lines(flat, smooth_px=4.0, pixel_size_nm=px)
    np.testing.assert_allclose(lev_flat, level_plane_lines(flat, smooth_px=4.0), atol=1e-6)
    ramp = np.clip((np.arange(h) - 114) / 6.0, 0, 1) * step_nm  # the edge spread over 6 lines
    prof = step_jumps(ramp, px)
    assert len(np.flatnonzero(np.diff(prof))) == 1 and prof[-1] == pytest.approx(step_nm)  # one jump
    assert 114 <= np.flatnonzero(np.diff(prof))[0] + 1 <= 120
    # a jump within one line (a tip change) is left to the levelling
    assert not np.any(step_jumps(np.where(np.arange(h) >= 117, step_nm, 0.0), px))
    # small sustained offsets (scan artefacts) are still removed
    small = np.where(np.arange(h) >= 117, 0.03, 0.0)
    assert not np.any(step_jumps(small, px))


def test_normalisation_is_per_frame_and_affine_invariant() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (50, 70)).astype(np.float32)
    a = normalize_frame(img)
    b = normalize_frame(3.5 * img + 10.0)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert -0.5 <= a.min() and a.max() <= 1.5
    assert np.all(normalize_frame(np.zeros((20, 20), np.float32)) == 0)


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (1, 9), (100, 3)])
@pytest.mark.parametrize("multiple", [2, 8])
def test_pad_crop_round_trip_odd_sizes(shape: tuple[int, int], multiple: int) -> None:
    a = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    p, pad = pad_to_multiple(a, multiple)
    assert p.shape[0] % multiple == 0 and p.shape[1] % multiple == 0
    assert p.shape[0] >= shape[0] and p.shape[1] >= shape[1]
    np.testing.assert_array_equal(crop_padding(p, pad), a)
    np.testing.assert_array_equal(crop_padding(p[None], pad)[0], a)  # leading channel axis


def test_pad_rejects_bad_multiple() -> None:
    with pytest.raises(InputError):
        pad_to_multiple(np.zeros((8, 8)), 0)


@pytest.mark.parametrize("from_px, to_px", [(0.05, 0.1), (0.2, 0.1), (0.07, 0.2), (0.13, 0.1)])
def test_resampling_round_trip_preserves_coordinates(from_px: float, to_px: float) -> None:
    """Peaks keep their positions (< 0.2 px) through resampling there, and the mapped coordinates predict
    where they land in the resampled grid."""
    rng = np.random.default_rng(3)
    shape = (97, 131)
    sigma_px = 0.25 / from_px  # a 0.25 nm blob, resolvable at every pixel size here
    gx, gy = np.meshgrid(np.arange(3), np.arange(2))  # well separated (>= 8 sigma), sub-pixel jittered
    xy = np.column_stack([20 + 40 * gx.ravel(), 25 + 40 * gy.ravel()]) + rng.uniform(-0.5, 0.5, (6, 2))
    img = _blobs(shape, xy, sigma_px)
    new_shape = resampled_shape(shape, from_px, to_px)
    there = resize(img, new_shape)
    back = resize(there, shape, antialias=False)

    def centroids(a: np.ndarray, pts: np.ndarray, r: float) -> np.ndarray:
        out = []
        ri = int(np.ceil(r))
        for x, y in pts:  # symmetric window about the nearest pixel, background-free blobs
            x0, y0 = int(round(x)) - ri, int(round(y)) - ri
            cy, cx = ndimage.center_of_mass(a[y0 : y0 + 2 * ri + 1, x0 : x0 + 2 * ri + 1])
            out.append((cx + x0, cy + y0))
        return np.array(out)

    mapped = map_coords(xy, shape, new_shape)
    r_new = 3 * sigma_px * new_shape[1] / shape[1]
    got_there = centroids(there, mapped, r_new)
    np.testing.assert_array_less(np.abs(got_there - mapped), 0.2)
    got_back = centroids(back, xy, 3 * sigma_px)
    np.testing.assert_array_less(np.abs(got_back - xy), 0.2)


def test_polarity_estimate_from_atom_map() -> None:
    """Atom-map peaks on bright spots = filled (rows not dark); on dark spots = empty; no peaks = unknown."""
    rng = np.random.default_rng(4)
    shape = (64, 64)
    xy = np.column_stack([rng.uniform(5, 59, 30), rng.uniform(5, 59, 30)])
    atoms = _blobs(shape, xy, 1.0)
    img = atoms + rng.normal(0, 0.05, shape).astype(np.float32)
    assert estimate_rows_dark(img, atoms, window_px=5) is False
    assert estimate_rows_dark(1.0 - img, atoms, window_px=5) is True
    assert estimate_rows_dark(img, np.zeros(shape, np.float32)) is None
