"""The simulator's physics measured from rendered images (not restated parameters), truth consistency,
determinism, the virtual instrument and the CLI. Small frames, fixed seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from simulator.config import SimConfig
from simulator.frame import simulate_frame
from simulator.instrument import SimulatedSTM
from simulator.lattice import terrace_lattice
from simulator.preview import level_plane
from stm_feedback.cli import app
from stm_feedback.errors import InputError
from stm_feedback.physics import ROW_SPACING_NM, STEP_HEIGHT_NM, SURFACE_LATTICE_NM


def _clean(n_steps: int, **kw: object) -> SimConfig:
    return replace(SimConfig.preset("clean"), n_steps=(n_steps, n_steps), **kw)


def _spectrum_peak(
    z: np.ndarray, weight: np.ndarray, pixel_size_nm: float, period_nm: tuple[float, float], direction=None
) -> tuple[float, float]:
    """(period_nm, wave-vector angle_deg mod 180) of the strongest Fourier peak with a period in the given
    range, optionally within 20 deg of a direction (deg). Hann-windowed, zero-padded to 1024 (fine bins)."""
    h, w = z.shape
    win = np.outer(np.hanning(h), np.hanning(w)) * weight
    zz = (z - (z * win).sum() / win.sum()) * win
    n = 1024
    p = np.abs(np.fft.fftshift(np.fft.fft2(zz, (n, n)))) ** 2
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_size_nm))
    fy, fx = np.meshgrid(f, f, indexing="ij")
    fr = np.hypot(fx, fy)
    ok = (fr > 1 / period_nm[1]) & (fr < 1 / period_nm[0])
    if direction is not None:
        ang = np.degrees(np.arctan2(fy, fx)) % 180
        d = np.abs((ang - direction + 90) % 180 - 90)
        ok &= d < 20
    k = np.argmax(np.where(ok, p, 0))
    return 1.0 / fr.flat[k], float(np.degrees(np.arctan2(fy.flat[k], fx.flat[k])) % 180)


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


def test_lattice_registry_from_diamond() -> None:
    t0, t1, t2 = (terrace_lattice(n) for n in range(3))
    assert _angle_diff(t0.row_angle_sample_deg, t1.row_angle_sample_deg) == pytest.approx(90.0)
    assert _angle_diff(t0.row_angle_sample_deg, t2.row_angle_sample_deg) == pytest.approx(0.0)
    shift = float((t2.origin_nm - t0.origin_nm) @ t0.bond_dir) % ROW_SPACING_NM
    assert min(shift, ROW_SPACING_NM - shift) == pytest.approx(ROW_SPACING_NM / 4, abs=1e-6)
    assert t1.height_nm - t0.height_nm == pytest.approx(STEP_HEIGHT_NM)


@pytest.mark.parametrize("seed", [11, 12])
def test_fft_periods_on_clean_frames(seed: int) -> None:
    f = simulate_frame(seed, 256, 0.1, _clean(0), bias_v=-2.0)
    z = level_plane(f.image_nm.astype(np.float64))
    ok = (f.truth.defect_instances == 0).astype(float)
    row_p, row_k = _spectrum_peak(z, ok, 0.1, (0.6, 1.0))
    assert row_p == pytest.approx(ROW_SPACING_NM, rel=0.02)
    # rows run perpendicular to the row-period wave vector; truth agrees
    row_dir = (row_k + 90) % 180
    assert _angle_diff(row_dir, f.truth.terraces[0].row_angle_deg) < 2.0
    along_p, _ = _spectrum_peak(z, ok, 0.1, (0.3, 0.45), direction=row_dir)
    assert along_p == pytest.approx(SURFACE_LATTICE_NM, rel=0.02)


def _one_step_frame(seed: int):
    f = simulate_frame(seed, 256, 0.1, _clean(1, density_scale=(0.0, 0.0)), bias_v=-2.0)
    labels = f.truth.terrace_labels
    ids = [t.id for t in f.truth.terraces]
    assert len(ids) == 2 and min((labels == i).sum() for i in ids) > 3000, "test needs two big terraces"
    return f, ids


@pytest.mark.parametrize("seed", [3, 8])
def test_step_height_and_rotation(seed: int) -> None:
    f, (lo, hi) = _one_step_frame(seed)
    z = f.image_nm.astype(np.float64)
    lab = f.truth.terrace_labels
    yy, xx = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
    use = lab >= 0
    a = np.c_[xx[use], yy[use], np.ones(use.sum()), (lab[use] == hi).astype(float)]
    coef, *_ = np.linalg.lstsq(a, z[use], rcond=None)
    assert coef[3] == pytest.approx(STEP_HEIGHT_NM, rel=0.05)
    # rows rotate by 90 deg across the step: measured on each terrace separately
    zl = level_plane(z) - coef[3] * (lab == hi)
    angles = [_spectrum_peak(zl, (lab == t).astype(float), 0.1, (0.6, 1.0))[1] for t in (lo, hi)]
    assert _angle_diff(angles[0], angles[1]) == pytest.approx(90.0, abs=3.0)


def test_truth_masks_match_image() -> None:
    cfg = _clean(0, density_scale=(2.0, 2.0))
    checked = agree = 0
    for seed in (21, 22):
        f = simulate_frame(seed, 192, 0.1, cfg, bias_v=-2.0)
        z = level_plane(f.image_nm.astype(np.float64))
        inst = f.truth.defect_instances
        for d in f.truth.defects:
            m = inst == d.id
            if m.sum() < 4:
                continue
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min() - 6, ys.max() + 7, xs.min() - 6, xs.max() + 7
            if y0 < 0 or x0 < 0 or y1 > z.shape[0] or x1 > z.shape[1]:
                continue
            box = np.zeros_like(m)
            box[y0:y1, x0:x1] = True
            ring = box & (inst == 0)
            inside = z[m].mean() - z[ring].mean()
            checked += 1
            agree += (inside > 0) if d.kind == "protrusion" else (inside < 0)
    assert checked >= 10
    assert agree / checked >= 0.9
    # atoms sit on bright rows: the image is higher at atoms than half a row period away (troughs)
    t = f.truth
    ang = np.radians(t.terraces[0].row_angle_deg)
    nvec = np.array([-np.sin(ang), np.cos(ang)]) * (0.5 * ROW_SPACING_NM / 0.1)
    good = (t.atom_resolved) & (
        inst[
            np.round(t.atoms_xy_px[:, 1]).astype(int).clip(0, 191),
            np.round(t.atoms_xy_px[:, 0]).astype(int).clip(0, 191),
        ]
        == 0
    )
    at = t.atoms_xy_px[good]
    tr = np.clip(np.round(at + nvec), 0, 191).astype(int)
    ai = np.round(at).astype(int).clip(0, 191)
    assert z[ai[:, 1], ai[:, 0]].mean() > z[tr[:, 1], tr[:, 0]].mean() + 0.01


def test_empty_state_inverts_row_contrast() -> None:
    diffs = {}
    for bias in (-2.0, 1.5):
        f = simulate_frame(31, 128, 0.1, _clean(0, density_scale=(0.0, 0.0)), bias_v=bias)
        z = level_plane(f.image_nm.astype(np.float64))
        t = f.truth
        ang = np.radians(t.terraces[0].row_angle_deg)
        nvec = np.array([-np.sin(ang), np.cos(ang)]) * (0.5 * ROW_SPACING_NM / 0.1)
        c = np.round(t.dimers_xy_px).astype(int).clip(0, 127)
        tr = np.round(t.dimers_xy_px + nvec).astype(int).clip(0, 127)
        diffs[bias] = z[c[:, 1], c[:, 0]].mean() - z[tr[:, 1], tr[:, 0]].mean()
    assert diffs[-2.0] > 0.005 and diffs[1.5] < -0.005


def test_determinism_and_params_json() -> None:
    for preset in ("clean", "realistic", "hard", "training"):
        a = simulate_frame(5, (48, 72), None if preset == "training" else 0.1, SimConfig.preset(preset))
        b = simulate_frame(5, (48, 72), None if preset == "training" else 0.1, SimConfig.preset(preset))
        assert a.image_nm.shape == (48, 72) and a.image_nm.dtype == np.float32
        assert np.array_equal(a.image_nm, b.image_nm)
        assert np.array_equal(a.truth.atoms_xy_px, b.truth.atoms_xy_px)
        assert np.isfinite(a.image_nm).all()
        assert a.truth.defect_instances.shape == (48, 72)
        ids = set(np.unique(a.truth.defect_instances).tolist()) - {0}
        assert ids == {d.id for d in a.truth.defects}
        json.dumps(a.truth.params)
    c = simulate_frame(6, (48, 72), 0.1, SimConfig.preset("clean"))
    assert not np.array_equal(a.image_nm, c.image_nm)


def test_bad_input_is_typed() -> None:
    with pytest.raises(InputError):
        simulate_frame(0, 4)
    with pytest.raises(InputError):
        simulate_frame(0, 64, pixel_size_nm=float("nan"))
    with pytest.raises(InputError):
        SimConfig.preset("nope")
    with pytest.raises(InputError):
        SimulatedSTM(seed=0).set_frame(1e6, 0.0, 10.0, 64)


def test_write_then_rescan_shows_bright_bare_dimers() -> None:
    stm = SimulatedSTM(seed=3, config=SimConfig.preset("clean"))
    stm.set_frame(10.0, 20.0, 12.8, 128)
    f1 = stm.scan()
    t = f1.truth
    k = int(np.argmin(((t.dimers_xy_px - 64.0) ** 2).sum(1)))
    same = np.nonzero((t.dimer_row == t.dimer_row[k]) & (t.dimer_terrace == t.dimer_terrace[k]))[0]
    same = same[np.argsort(((t.dimers_xy_px[same] - t.dimers_xy_px[k]) ** 2).sum(1))][:3]
    bared = stm.depassivate_px(t.dimers_xy_px[same])
    assert len(bared) == 3
    f2 = stm.scan()
    t2 = f2.truth
    expect_px = stm.sample_to_frame_px(bared)
    bare_px = t2.dimers_xy_px[t2.dimer_bare]
    assert len(bare_px) == 3
    dist = np.linalg.norm(bare_px[:, None, :] - expect_px[None, :, :], axis=2).min(axis=1)
    assert dist.max() < 0.05
    assert any(d.cls == "litho_patch" for d in t2.defects)
    # brighter at the written dimers than the same sample spots were before (plane-levelled images)
    z1, z2 = level_plane(f1.image_nm.astype(np.float64)), level_plane(f2.image_nm.astype(np.float64))
    p1 = np.round(t.dimers_xy_px[same]).astype(int)
    p2 = np.round(expect_px).astype(int)
    assert (z2[p2[:, 1], p2[:, 0]] - z1[p1[:, 1], p1[:, 0]]).min() > 0.05


def test_rescan_same_defects_shifted_by_drift_only() -> None:
    cfg = replace(SimConfig.preset("realistic"), drift_nm_per_min=(1.0, 1.0), p_unresolved=0.0, p_jitter=0.0)
    stm = SimulatedSTM(seed=4, config=cfg)
    stm.set_frame(-30.0, 40.0, 16.0, 96)  # 0.167 nm/px
    a = stm.scan().truth
    xy_a = np.array([[d.x_px, d.y_px] for d in a.defects])
    sample = stm.frame_to_sample_nm(xy_a)  # where on the sample the first scan saw them
    b = stm.scan().truth
    assert b.params["t0_s"] > a.params["t0_s"]
    predicted = stm.sample_to_frame_px(sample)  # where drift has carried them in the second scan
    inner = [k for k, p in enumerate(predicted) if (p > 10).all() and (p < 86).all()]
    assert len(inner) >= 2, "test needs defects in the frame"
    xy_b = np.array([[e.x_px, e.y_px] for e in b.defects])
    for k in inner:
        dist = np.linalg.norm(xy_b - predicted[k], axis=1)
        m = int(np.argmin(dist))
        assert dist[m] < 0.05 and b.defects[m].cls == a.defects[k].cls
    moved = np.linalg.norm(predicted[inner] - xy_a[inner], axis=1)
    assert moved.min() > 0.5  # drift and creep visibly moved them between scans


def test_scan_lines_stream_in_order_with_times() -> None:
    stm = SimulatedSTM(seed=1, config=SimConfig.preset("clean"))
    stm.set_frame(0.0, 0.0, 6.4, 32)
    lines = list(stm.scan_lines())
    assert [ln.index for ln in lines] == list(range(32))
    t = np.concatenate([ln.t_s for ln in lines])
    assert np.all(np.diff(t) > 0)
    assert np.array_equal(np.stack([ln.z_nm for ln in lines]), stm.last_frame.image_nm)


def test_cli_writes_frames(tmp_path) -> None:
    r = CliRunner().invoke(
        app,
        ["simulate", "--out", str(tmp_path), "--n", "2", "--size", "40", "--seed", "9", "--preset", "clean"],
    )
    assert r.exit_code == 0, r.output
    for k in (9, 10):
        for ext in (".npy", ".json", ".npz", ".meta.json", ".png"):
            assert (tmp_path / f"sim_clean_{k:07d}{ext}").exists()
    z = np.load(tmp_path / "sim_clean_0000009.npy")
    assert z.dtype == np.float32 and z.shape == (40, 40)
    meta = json.loads((tmp_path / "sim_clean_0000009.meta.json").read_text())
    assert meta["pixel_size_nm"] == pytest.approx(0.1) and meta["bias_v"] < 0
