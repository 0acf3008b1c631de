"""Image quality against simulator truth: tip-change lines and double-tip suspicion (stm_feedback/quality.py).

Seeded frames of the "clean" preset with one artefact switched on and the same frames without it. Not every
seed passes: the suite-level rates (hard, realistic, clean) are measured by running this file as a script
(numbers and commands in docs/analysis-schema.md, quality section).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from stm_feedback.config import Settings
from stm_feedback.errors import InputError
from stm_feedback.maps import NetworkMaps
from stm_feedback.pipeline import Pipeline
from stm_feedback.quality import double_tip_pairs, double_tip_suspected, ghost_copies, tip_change_lines
from tests.test_pipeline_oracle import oracle_maps, simulate

TIP_CHANGE = {"p_tip_change": 1.0, "tip_change_dz_nm": (0.04, 0.1)}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(Settings())


def _analyze(pipe: Pipeline, f):  # noqa: ANN001, ANN202
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    return pipe.analyze_maps(f.image_nm, maps, f.pixel_size_nm, f.bias_v)


@pytest.mark.parametrize("seed", [1_000_301, 1_000_302, 1_000_303])
def test_tip_change_line_found_where_truth_has_it(pipe: Pipeline, seed: int) -> None:
    f = simulate(seed, 192, 0.1, "clean", **TIP_CHANGE)
    assert f.truth.tip_change_lines, "the override must produce a tip change"
    a = _analyze(pipe, f)
    first = f.truth.tip_change_lines[0]
    assert any(abs(k - first) <= 3 for k in a.quality.tip_change_lines), (first, a.quality.tip_change_lines)
    assert len(a.quality.tip_change_lines) == 1, a.quality.tip_change_lines
    assert any("tip change" in n for n in a.quality.notes)


@pytest.mark.parametrize("seed", [1_000_300, 1_000_301, 1_000_302])
def test_no_tip_change_lines_on_clean_frames(pipe: Pipeline, seed: int) -> None:
    f = simulate(seed, 192, 0.1, "clean")
    assert not f.truth.tip_change_lines
    assert _analyze(pipe, f).quality.tip_change_lines == []


def test_tip_change_ignores_steps_and_tilt() -> None:
    """A terrace step, a tilted plane along y and per-line offsets are not tip changes; a disturbed transition
    line followed by a new height level is, and is reported at its first line."""
    h, w, s = 160, 120, 0.1
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    labels = np.where(xx + 0.3 * yy < 70, 0, 1).astype(np.int32)
    z = 0.136 * labels + 0.02 * np.cos(2 * np.pi * yy * s / 0.768) + rng.normal(0, 0.005, (h, w))
    assert tip_change_lines(z, labels, s) == []
    tilted = z + np.tan(np.radians(1.5)) * yy * s + rng.normal(0, 0.003, (h, 1))  # + line offsets
    assert tip_change_lines(tilted, labels, s) == []
    changed = tilted.copy()
    changed[90:] += 0.04
    changed[90] += np.cumsum(rng.normal(0, 0.08, w)) / np.sqrt(w)  # the feedback wanders on the change line
    assert tip_change_lines(changed, labels, s) == [90]
    wander_only = tilted.copy()
    wander_only[90] += np.cumsum(rng.normal(0, 0.01, w)) / np.sqrt(w)  # small wander, no new level: no change
    assert tip_change_lines(wander_only, labels, s) == []


def _ghost_maps(f, offset_px: np.ndarray) -> NetworkMaps:  # noqa: ANN001
    """Oracle maps whose defect footprints also appear shifted by ``offset_px``, eroded by one pixel (what a
    detector sees when a second apex, lower by dz, images every defect twice: less of the copy rises above
    the lattice)."""
    m = oracle_maps(f.image_nm, f.truth, f.bias_v)
    dx, dy = (int(round(v)) for v in offset_px)
    for name in ("protrusion_prob", "depression_prob"):
        p = getattr(m, name)
        ghost = np.roll(np.roll(ndimage.grey_erosion(p, size=(3, 3)), dy, axis=0), dx, axis=1)
        setattr(m, name, np.maximum(p, ghost))
    return m


@pytest.mark.parametrize("seed", [1_000_310, 1_000_312])
def test_double_tip_suspected_from_repeated_defects(pipe: Pipeline, seed: int) -> None:
    """Ghost copies 2 nm away (closer ones merge with large footprints into one blob and are not seen)."""
    f = simulate(seed, 256, 0.1, "realistic", p_double=0.0, p_tip_change=0.0)
    a = _analyze(pipe, f)
    assert len(a.defects) >= 6, "the rule needs >= 3 pairs: pick a frame with enough defects"
    assert not a.quality.double_tip_suspected
    a = pipe.analyze_maps(f.image_nm, _ghost_maps(f, np.array([18.0, 9.0])), 0.1, f.bias_v)
    assert a.quality.double_tip_suspected
    assert any("double tip" in n for n in a.quality.notes)


def test_double_tip_rule_on_points() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (12, 2))
    kinds = ["protrusion"] * 6 + ["depression"] * 6
    assert not double_tip_suspected(xy, kinds, 0.1)
    twice = np.concatenate([xy, xy + [10.0, 5.0]])  # ghosts 1.1 nm away
    assert double_tip_suspected(twice, kinds + kinds, 0.1)
    # pairs of different kinds at the offset do not count
    assert not double_tip_suspected(twice, kinds + kinds[::-1], 0.1)


def test_double_tip_rule_counts_protrusions_only() -> None:
    """z = max over the two apices copies raised features; repeated depressions are not a double tip."""
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 200, (8, 2))
    twice = np.concatenate([xy, xy + [10.0, 5.0]])
    assert double_tip_suspected(twice, ["protrusion"] * 16, 0.1)
    assert not double_tip_suspected(twice, ["depression"] * 16, 0.1)
    assert double_tip_suspected(twice, ["depression"] * 16, 0.1, copied_kinds=("protrusion", "depression"))


def test_double_tip_rule_ignores_lattice_neighbours() -> None:
    """Islands of 2-4 dimers seen as one blob per dimer repeat at the 0.384 nm dimer pitch by chance."""
    rng = np.random.default_rng(3)
    starts = rng.uniform(0, 200, (8, 2))
    pitch_px = np.array([3.84, 0.0])  # one dimer along the row at 0.1 nm/px
    islands = np.concatenate([starts + k * pitch_px for k in range(3)])
    assert not double_tip_suspected(islands, ["protrusion"] * len(islands), 0.1)
    # the old 0.3 nm minimum offset flagged them
    assert double_tip_suspected(islands, ["protrusion"] * len(islands), 0.1, min_offset_nm=0.3)


def test_double_tip_rule_rejects_mismatched_kinds() -> None:
    with pytest.raises(InputError):
        double_tip_suspected(np.zeros((4, 2)), ["protrusion"] * 3, 0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_helper_is_np_median_with_its_dtype(dtype: type) -> None:
    """quality._median (fast_median) gives np.median's value and scalar type, so the float32 robust
    z-scores after it are computed in float32 exactly as before; sizes odd and even, ties included."""
    from stm_feedback.quality import _median

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 253, 254, 5000):
        for v in (rng.normal(size=n), rng.integers(0, 3, n) * 0.5):
            v = v.astype(dtype)
            got, want = _median(v), np.median(v)
            assert got == want and type(got) is type(want)
            assert type(1.4826 * got) is type(1.4826 * want)


def test_double_tip_pairs_are_oriented_along_the_common_offset() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (8, 2))
    twice = np.concatenate([xy, xy - [10.0, 5.0]])  # the copies sit at -offset
    pairs = double_tip_pairs(twice, ["protrusion"] * 16, 0.1)
    assert pairs is not None and len(pairs) == 8
    d = twice[pairs[:, 1]] - twice[pairs[:, 0]]
    np.testing.assert_allclose(d, np.tile(d[:1], (8, 1)))  # one orientation for every pair
    np.testing.assert_allclose(np.abs(d[0]), [10.0, 5.0])
    assert double_tip_pairs(xy, ["protrusion"] * 8, 0.1) is None


def test_ghost_copies_are_the_smaller_side() -> None:
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    # the second is smaller in 3 pairs (a NaN area counts as 0), the first in one, by little
    area = np.array([1.0, 0.5, 2.0, 0.4, 1.5, np.nan, 0.8, 0.9])
    np.testing.assert_array_equal(ghost_copies(pairs, area), [1, 3, 5, 7])
    np.testing.assert_array_equal(ghost_copies(pairs[:, ::-1], area), [1, 3, 5, 7])
    assert len(ghost_copies(np.empty((0, 2), int), area)) == 0


def test_ghost_copies_weigh_each_pair_relative_to_its_size() -> None:
    """One large island whose copy is much smaller in nm^2 does not outvote three small features whose
    copies are relatively smaller: the sum is over relative differences."""
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    area = np.array([10.0, 14.0, 0.5, 0.3, 0.5, 0.3, 0.5, 0.3])  # island: first smaller by 4 nm^2 (17 %)
    np.testing.assert_array_equal(ghost_copies(pairs, area), [1, 3, 5, 7])


def test_double_tip_ghosts_are_not_reported() -> None:
    """On a double-tip frame the faint copies (no height in the image) are dropped from the defect list and
    the real protrusions stay; with drop_double_tip_ghosts off every copy is reported."""
    from stm_feedback import postprocess as pp
    from stm_feedback.config import Settings

    f = simulate(1_000_310, 256, 0.1, "realistic", p_double=0.0, p_tip_change=0.0)
    maps = _ghost_maps(f, np.array([18.0, 9.0]))
    on = Pipeline(Settings(), params=pp.PostprocessParams(drop_double_tip_ghosts=True))
    off = Pipeline(Settings(), params=pp.PostprocessParams(drop_double_tip_ghosts=False))
    a_on = on.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    a_off = off.analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    assert a_on.quality.double_tip_suspected and a_off.quality.double_tip_suspected
    truth = np.array([[d.x_px, d.y_px] for d in f.truth.defects if d.kind == "protrusion"])

    def prot(a):  # noqa: ANN001, ANN202
        return np.array([[d.x_px, d.y_px] for d in a.defects if d.kind == "protrusion"])

    def near_truth(xy):  # noqa: ANN001, ANN202
        return np.min(np.hypot(*(xy[:, None, :] - truth[None, :, :]).transpose(2, 0, 1)), axis=1) < 4.0

    p_on, p_off = prot(a_on), prot(a_off)
    assert len(p_on) < len(p_off)
    assert near_truth(p_on).sum() == near_truth(p_off).sum()  # no real protrusion lost
    assert (~near_truth(p_on)).sum() < (~near_truth(p_off)).sum()
    assert any("ghost" in n for n in a_on.quality.notes)
    assert len(a_on.defect_features) == len(a_on.defects)


if __name__ == "__main__":  # measurement for docs/analysis-schema.md
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="hard")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--first-seed", type=int, default=1_000_000)
    ap.add_argument("--force-tip-change", action="store_true", help="override p_tip_change=1, dz 0.04-0.1 nm")
    ap.add_argument(
        "--maps",
        choices=("oracle", "nets"),
        default="oracle",
        help="defects and atoms from the truth (oracle) or from the trained networks (nets: needs models/)",
    )
    args = ap.parse_args()
    pipe_ = Pipeline(Settings())
    keys = ("frames", "tip_change_frames", "found", "false_lines", "double_truth", "double_flagged")
    res = dict.fromkeys((*keys, "double_true_pos", "double_false_pos"), 0)
    for seed in range(args.first_seed, args.first_seed + args.n):
        f = simulate(seed, 256, None, args.preset, **(TIP_CHANGE if args.force_tip_change else {}))
        if args.maps == "nets":
            q = pipe_.analyze(f.image_nm, f.pixel_size_nm, f.bias_v).quality
        else:
            q = _analyze(pipe_, f).quality
        first = f.truth.tip_change_lines[0] if f.truth.tip_change_lines else None
        hit = [k for k in q.tip_change_lines if first is not None and abs(k - first) <= 3]
        res["frames"] += 1
        res["tip_change_frames"] += first is not None
        res["found"] += bool(hit)
        res["false_lines"] += len(q.tip_change_lines) - len(hit)
        double = bool(f.truth.params.get("double_tip"))
        res["double_truth"] += double
        res["double_flagged"] += q.double_tip_suspected
        res["double_true_pos"] += double and q.double_tip_suspected
        res["double_false_pos"] += (not double) and q.double_tip_suspected
    print(res)
